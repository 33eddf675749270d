"""search_r3_jax: Search-R3 in JAX/Flax — an LLM that reasons about a query
and emits its own retrieval embedding at `<|embed_token|>`.

The package has floors that import downwards only:

    api.py, train.py, ...   the face: `SearchR3` and the programs
    training/               losses, rewards, the stage steps, the loop
    retrieval/              index, environment, metrics, evaluation
    data/                   TFDS builders, loader, BM25
    core/                   model, weights, tokenizer, decoding, policy

`SearchR3` is loaded on first use, so that importing a lower floor (say,
`search_r3_jax.training`) does not pull in the face and its CPU kernels.
"""

from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.prompts import PromptConfig

__all__ = ["SearchR3", "ModelConfig", "PromptConfig", "EMBED_TOKEN"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "SearchR3":
    from search_r3_jax.api import SearchR3

    return SearchR3
  raise AttributeError(f"module 'search_r3_jax' has no attribute {name!r}")
