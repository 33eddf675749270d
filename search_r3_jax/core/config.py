"""Model configuration shared by the Llama (SmolLM2) and Qwen2 families.

One frozen dataclass describes every decoder this package runs. It is built
from an HF `config.json` dict (`ModelConfig.from_hf`) or from GGUF metadata
(see `weights/gguf.py`, which produces the same dict), so both loaders meet
here and the model code never looks at file formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

SUPPORTED_ARCHS = ("llama", "qwen2")
# How a block computes attention: "einsum" (the reference: scores as one
# einsum, float32 softmax) or "dot_product" (`jax.nn.dot_product_attention`,
# which takes cuDNN's fused kernel on a GPU where it applies and XLA's
# otherwise).
ATTENTION_IMPLS = ("einsum", "dot_product")
# What a block keeps for the backward pass: everything ("none"), only its
# input ("full": all else is recomputed) or its matmul outputs
# ("dots_saveable").
REMAT_POLICIES = ("none", "full", "dots_saveable")
# The optimizer's state (training/train_state.py): "" the parameters' dtype,
# "float32" moments over float32 master weights, "bfloat16" moments.
OPTIMIZER_STATE_DTYPES = ("", "float32", "bfloat16")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


class ConfigError(ValueError):
  """A configuration that cannot describe a supported model."""


def dtype_of(name: str):
  try:
    return _DTYPES[name]
  except KeyError:
    raise ConfigError(
        f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}"
    ) from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  Attributes:
    arch: "llama" or "qwen2". Qwen2 adds biases to the q/k/v projections.
    vocab_size: rows of the embedding table (may exceed the tokenizer's size:
      the extra rows are padding and are masked out when sampling).
    hidden_size: model width d.
    intermediate_size: SwiGLU width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller).
    head_dim: per-head width.
    rope_theta: RoPE base frequency θ.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: share the embedding table with the output head.
    attention_bias: q/k/v projections carry biases (Qwen2).
    max_position_embeddings: longest context the weights were trained for.
    param_dtype: dtype the parameters are stored in.
    compute_dtype: dtype of activations and matmuls (softmax and norms run in
      float32 regardless).
    scan_layers: run the blocks with `lax.scan` over stacked parameters (fast
      compiles); False unrolls them.
    attention: one of ATTENTION_IMPLS; the KV-cache decode uses the same.
    remat: one of REMAT_POLICIES, applied per block in the forward without
      a KV cache (training); numbers are unchanged, memory traded for
      recomputation.
  """

  arch: str = "llama"
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  max_position_embeddings: int = 8192
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = True
  attention: str = "einsum"
  remat: str = "none"

  def __post_init__(self):
    if self.arch not in SUPPORTED_ARCHS:
      raise ConfigError(
          f"unknown architecture {self.arch!r}; supported: "
          f"{', '.join(SUPPORTED_ARCHS)}"
      )
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    dtype_of(self.param_dtype)
    dtype_of(self.compute_dtype)
    for name, known in (
        ("attention", ATTENTION_IMPLS),
        ("remat", REMAT_POLICIES),
    ):
      if getattr(self, name) not in known:
        raise ConfigError(
            f"{name}={getattr(self, name)!r} is unknown; one of "
            f"{', '.join(known)}"
        )

  @property
  def dtype(self):
    return dtype_of(self.compute_dtype)

  @property
  def pdtype(self):
    return dtype_of(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.attention_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.num_layers * block + self.vocab_size * d + d + head

  @classmethod
  def from_hf(
      cls, hf: Mapping[str, Any], source: str = "config.json", **overrides
  ) -> "ModelConfig":
    """Builds a config from an HF `config.json` dict.

    Args:
      hf: the parsed config.json.
      source: where it came from, used in error messages.
      **overrides: fields to set regardless of the file (e.g. dtypes).

    Raises:
      ConfigError: naming `source` and the offending field.
    """
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHS:
      raise ConfigError(
          f"{source}: unknown architecture model_type={arch!r} "
          f"(architectures={hf.get('architectures')}); supported: "
          f"{', '.join(SUPPORTED_ARCHS)}"
      )

    def need(key):
      if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
      return hf[key]

    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (
        None,
        "default",
    ):
      raise ConfigError(
          f"{source}: rope_scaling={scaling!r} is not supported (only plain "
          "RoPE)"
      )
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if params.get("rope_type", "default") not in (None, "default"):
      raise ConfigError(
          f"{source}: rope_parameters={params!r} is not supported (only plain "
          "RoPE)"
      )
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
      raise ConfigError(
          f"{source}: attention_bias/mlp_bias on a llama model "
          "is not supported"
      )
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads
    kw = dict(
        arch=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=(arch == "qwen2"),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
    )
    kw.update(overrides)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None
