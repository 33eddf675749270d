"""HF-named tensors -> sharded parameters of `model.Decoder`.

Each parameter is assembled on the host in the model's layout (stacked over
layers, `[in, ..., out]`) and handed to `jax.make_array_from_callback`, so
every device receives only its own shard: parameters land directly in sharded
arrays, never on one device first.
"""

from __future__ import annotations

import re

from flax import nnx
import jax
from jax.sharding import Mesh
import ml_dtypes
import numpy as np

from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.weights.common import Checkpoint
from search_r3_jax.core.weights.common import WeightsError

# Tensors that carry no parameters of ours (recomputed buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

# our block parameter -> (HF suffix under model.layers.{i}., converter).
_BLOCK_MAP = {
    "attn_norm": ("input_layernorm.weight", lambda w, c: w),
    "mlp_norm": ("post_attention_layernorm.weight", lambda w, c: w),
    "wq": (
        "self_attn.q_proj.weight",
        lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
    ),
    "wk": (
        "self_attn.k_proj.weight",
        lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
    ),
    "wv": (
        "self_attn.v_proj.weight",
        lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
    ),
    "wo": (
        "self_attn.o_proj.weight",
        lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    ),
    "bq": (
        "self_attn.q_proj.bias",
        lambda w, c: w.reshape(c.num_heads, c.head_dim),
    ),
    "bk": (
        "self_attn.k_proj.bias",
        lambda w, c: w.reshape(c.num_kv_heads, c.head_dim),
    ),
    "bv": (
        "self_attn.v_proj.bias",
        lambda w, c: w.reshape(c.num_kv_heads, c.head_dim),
    ),
    "w_gate": ("mlp.gate_proj.weight", lambda w, c: w.T),
    "w_up": ("mlp.up_proj.weight", lambda w, c: w.T),
    "w_down": ("mlp.down_proj.weight", lambda w, c: w.T),
}


# our block parameter -> its HF tensor (the inverse of `_BLOCK_MAP`'s
# converters; our attention weights are [in, heads, head_dim] / [heads,
# head_dim, out], the rest [in, out]).
_BLOCK_INVERSE = {
    "attn_norm": lambda w: w,
    "mlp_norm": lambda w: w,
    "wq": lambda w: w.reshape(w.shape[0], -1).T,
    "wk": lambda w: w.reshape(w.shape[0], -1).T,
    "wv": lambda w: w.reshape(w.shape[0], -1).T,
    "wo": lambda w: w.reshape(-1, w.shape[-1]).T,
    "bq": lambda w: w.reshape(-1),
    "bk": lambda w: w.reshape(-1),
    "bv": lambda w: w.reshape(-1),
    "w_gate": lambda w: w.T,
    "w_up": lambda w: w.T,
    "w_down": lambda w: w.T,
}


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
  """The model's parameters as float32 host arrays under HF names (what
  `host_params` reads, in reverse), the padded vocabulary rows included."""
  c = model.cfg
  host = lambda p: np.asarray(jax.device_get(p[...]), np.float32)
  out = {
      "model.embed_tokens.weight": host(model.embed),
      "model.norm.weight": host(model.final_norm),
  }
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = host(model.lm_head).T
  for name, param in model.blocks.items():
    if name not in _BLOCK_MAP:
      raise WeightsError(f"no HF name for block parameter {name!r}")
    stacked = host(param)
    suffix, inverse = _BLOCK_MAP[name][0], _BLOCK_INVERSE[name]
    for i in range(c.num_layers):
      out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(
          inverse(stacked[i])
      )
  return out


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract state) of a Decoder, without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def init_model(
    cfg: ModelConfig,
    mesh: Mesh,
    seed: int = 0,
    rules: shd.Rules = shd.DEFAULT_RULES,
) -> Decoder:
  """A randomly initialised Decoder whose parameters are created sharded."""
  graphdef, abstract = abstract_model(cfg)
  shardings = shd.state_shardings(abstract, mesh, rules)

  @jax.jit
  def init():
    state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))
    return jax.lax.with_sharding_constraint(state, shardings)

  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def _np_dtype(cfg: ModelConfig):
  return (
      ml_dtypes.bfloat16
      if cfg.param_dtype == "bfloat16"
      else np.dtype(cfg.param_dtype)
  )


def _fetch(ckpt: Checkpoint, name: str, expect: tuple) -> np.ndarray:
  if name not in ckpt.tensor_names:
    raise WeightsError(f"{ckpt.source}: tensor {name!r} is missing")
  w = np.asarray(ckpt.get_tensor(name), dtype=np.float32)
  if tuple(w.shape) != tuple(expect):
    raise WeightsError(
        f"{ckpt.source}: tensor {name!r} has shape "
        f"{tuple(w.shape)}, the config implies {tuple(expect)}"
    )
  return w


def host_params(
    ckpt: Checkpoint, cfg: ModelConfig, source_vocab: int
) -> dict[tuple, np.ndarray]:
  """Reads every parameter into host numpy arrays keyed by nnx path.

  Args:
    ckpt: the checkpoint.
    cfg: the target config; `cfg.vocab_size` may exceed `source_vocab`, in
      which case new rows get the mean of the existing ones.
    source_vocab: rows of the checkpoint's embedding (and head).
  """
  c = cfg
  used = set()

  def get(name, expect):
    used.add(name)
    return _fetch(ckpt, name, expect)

  def grow(w):  # [V_src, D] -> [V, D]
    if c.vocab_size == source_vocab:
      return w
    extra = np.broadcast_to(
        w.mean(0, keepdims=True), (c.vocab_size - source_vocab, w.shape[1])
    )
    return np.concatenate([w, extra], 0)

  out = {}
  out[("embed",)] = grow(
      get("model.embed_tokens.weight", (source_vocab, c.hidden_size))
  )
  out[("final_norm",)] = get("model.norm.weight", (c.hidden_size,))
  if not c.tie_word_embeddings:
    out[("lm_head",)] = grow(
        get("lm_head.weight", (source_vocab, c.hidden_size))
    ).T
  elif "lm_head.weight" in ckpt.tensor_names:
    used.add("lm_head.weight")  # a tied copy some exporters keep
  hf_shapes = {
      "attn_norm": (c.hidden_size,),
      "mlp_norm": (c.hidden_size,),
      "wq": (c.num_heads * c.head_dim, c.hidden_size),
      "wk": (c.num_kv_heads * c.head_dim, c.hidden_size),
      "wv": (c.num_kv_heads * c.head_dim, c.hidden_size),
      "wo": (c.hidden_size, c.num_heads * c.head_dim),
      "bq": (c.num_heads * c.head_dim,),
      "bk": (c.num_kv_heads * c.head_dim,),
      "bv": (c.num_kv_heads * c.head_dim,),
      "w_gate": (c.intermediate_size, c.hidden_size),
      "w_up": (c.intermediate_size, c.hidden_size),
      "w_down": (c.hidden_size, c.intermediate_size),
  }
  names = [
      "attn_norm",
      "mlp_norm",
      "wq",
      "wk",
      "wv",
      "wo",
      "w_gate",
      "w_up",
      "w_down",
  ] + (["bq", "bk", "bv"] if c.attention_bias else [])
  for ours in names:
    suffix, conv = _BLOCK_MAP[ours]
    out[("blocks", ours)] = np.stack(
        [
            conv(get(f"model.layers.{i}.{suffix}", hf_shapes[ours]), c)
            for i in range(c.num_layers)
        ]
    )
  unexpected = sorted(
      n for n in ckpt.tensor_names if n not in used and not _IGNORED.match(n)
  )
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise WeightsError(
        f"{ckpt.source}: tensors not used by a {c.arch} model with "
        f"{c.num_layers} layers: {unexpected[:5]}{more}"
    )
  return out


def set_rows(params: dict, rows: dict[int, str]) -> None:
  """Re-initialises embedding (and untied head) rows, e.g. a new token's.

  Args:
    rows: token id -> "mean" (the mean of all rows).
  """
  for token_id, how in rows.items():
    if how != "mean":
      raise ValueError(f"unknown row init {how!r}")
    emb = params[("embed",)]
    emb[token_id] = emb.mean(0)
    if ("lm_head",) in params:
      head = params[("lm_head",)]
      head[:, token_id] = head.mean(1)


def model_from_host(
    params: dict,
    cfg: ModelConfig,
    mesh: Mesh,
    rules: shd.Rules = shd.DEFAULT_RULES,
) -> Decoder:
  """Places host parameters straight into sharded arrays and builds the model."""
  graphdef, abstract = abstract_model(cfg)
  shardings = shd.state_shardings(abstract, mesh, rules)
  dtype = _np_dtype(cfg)
  flat = []
  for path, sharding_var in nnx.to_flat_state(shardings):
    if path not in params:
      raise WeightsError(f"no value for parameter {'/'.join(path)}")
    host = np.ascontiguousarray(params[path], dtype=dtype)
    sharding = sharding_var.get_value()
    arr = jax.make_array_from_callback(
        host.shape, sharding, lambda idx, h=host: h[idx]
    )
    flat.append((path, sharding_var.replace(arr)))
  state = nnx.from_flat_state(flat)
  return nnx.merge(graphdef, state)
