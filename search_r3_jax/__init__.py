"""search_r3_jax: Search-R3 in JAX/Flax — an LLM that reasons about a query
and emits its own retrieval embedding at `<|embed_token|>`."""

from search_r3_jax.api import SearchR3
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.prompts import EMBED_TOKEN, PromptConfig

__all__ = ["SearchR3", "ModelConfig", "PromptConfig", "EMBED_TOKEN"]
__version__ = "0.1.0"
