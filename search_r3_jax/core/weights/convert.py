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
  """The tensor in the file's dtype (a view, for memory-mapped files)."""
  if name not in ckpt.tensor_names:
    raise WeightsError(f"{ckpt.source}: tensor {name!r} is missing")
  w = np.asarray(ckpt.get_tensor(name))
  if tuple(w.shape) != tuple(expect):
    raise WeightsError(
        f"{ckpt.source}: tensor {name!r} has shape "
        f"{tuple(w.shape)}, the config implies {tuple(expect)}"
    )
  if w.dtype.kind not in "fV" and w.dtype != ml_dtypes.bfloat16:
    raise WeightsError(
        f"{ckpt.source}: tensor {name!r} has dtype {w.dtype}, not a float"
    )
  return w


class HostParam:
  """A parameter of the model's layout, assembled from checkpoint tensors
  only where it is indexed: `param[idx]` reads, converts and returns just
  that slice (in the file's dtype where no arithmetic is needed), so a
  device's shard is read without the whole parameter, or a whole file,
  ever being in host memory."""

  shape: tuple[int, ...]

  def __getitem__(self, idx) -> np.ndarray:
    raise NotImplementedError

  def __array__(self, dtype=None, copy=None):
    del copy
    out = self[tuple(slice(None) for _ in self.shape)]
    return out if dtype is None else out.astype(dtype)


class _Stacked(HostParam):
  """`layers[i]()` is layer i's tensor in our layout; the parameter stacks
  them on a leading layer axis (or is the single tensor, `stack=False`)."""

  def __init__(self, layers, shape, stack: bool = True):
    self.layers, self.shape, self.stack = layers, tuple(shape), stack

  def __getitem__(self, idx):
    idx = tuple(idx)
    if not self.stack:
      return np.asarray(self.layers[0]()[idx])
    picked = range(len(self.layers))[idx[0]]
    return np.stack([np.asarray(self.layers[i]()[idx[1:]]) for i in picked])


class _Rows(HostParam):
  """A [V_src, D] embedding grown to `vocab` rows, the new rows (and any
  row set by `set_mean`) the float32 mean of the source rows; `transpose`
  makes it the [D, V] output head."""

  def __init__(self, base: np.ndarray, vocab: int, transpose: bool = False):
    self.base, self.vocab, self.transpose = base, int(vocab), transpose
    d = base.shape[1]
    self.shape = (d, self.vocab) if transpose else (self.vocab, d)
    self.overrides: set[int] = set()
    self._mean = None

  def mean(self) -> np.ndarray:
    if self._mean is None:
      total = np.zeros((self.base.shape[1],), np.float64)
      for i in range(0, self.base.shape[0], 8192):
        total += self.base[i : i + 8192].astype(np.float64).sum(0)
      self._mean = (total / self.base.shape[0]).astype(np.float32)
    return self._mean

  def set_mean(self, row: int) -> None:
    self.overrides.add(int(row))

  def __getitem__(self, idx):
    rows_idx, cols_idx = (idx[1], idx[0]) if self.transpose else idx
    ids = np.arange(self.vocab)[rows_idx]
    n_src = self.base.shape[0]
    needs_mean = bool(self.overrides) or ids.size and ids.max() >= n_src
    if not needs_mean:
      out = np.asarray(self.base[rows_idx][:, cols_idx])
    else:
      out = np.empty((ids.size, self.base.shape[1]), np.float32)
      src = ids < n_src
      out[src] = self.base[ids[src]]
      out[~src] = self.mean()
      for r in self.overrides:
        out[ids == r] = self.mean()
      out = out[:, cols_idx]
    return out.T if self.transpose else out


def host_params(
    ckpt: Checkpoint, cfg: ModelConfig, source_vocab: int
) -> dict[tuple, np.ndarray | HostParam]:
  """Every parameter keyed by nnx path, as a `HostParam` read on demand
  (tensor by tensor, slice by slice) where the checkpoint's tensors are
  memory-mapped (`ckpt.lazy_tensors`), else as host numpy arrays.

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

  out = {}
  out[("embed",)] = _Rows(
      get("model.embed_tokens.weight", (source_vocab, c.hidden_size)),
      c.vocab_size,
  )
  norm = get("model.norm.weight", (c.hidden_size,))
  out[("final_norm",)] = _Stacked([lambda: norm], norm.shape, stack=False)
  if not c.tie_word_embeddings:
    out[("lm_head",)] = _Rows(
        get("lm_head.weight", (source_vocab, c.hidden_size)),
        c.vocab_size,
        transpose=True,
    )
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
    hf = [f"model.layers.{i}.{suffix}" for i in range(c.num_layers)]
    # Every tensor is checked (name, shape) now; its bytes are read later.
    first = conv(get(hf[0], hf_shapes[ours]), c)
    for name in hf[1:]:
      get(name, hf_shapes[ours])
    out[("blocks", ours)] = _Stacked(
        [
            lambda n=name, s=hf_shapes[ours], f=conv: f(_fetch(ckpt, n, s), c)
            for name in hf
        ],
        (c.num_layers,) + first.shape,
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
  if not getattr(ckpt, "lazy_tensors", False):
    # Tensors computed on each read (a dequantized GGUF): read each once.
    out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  return out


def set_rows(params: dict, rows: dict[int, str]) -> None:
  """Re-initialises embedding (and untied head) rows, e.g. a new token's.

  Args:
    rows: token id -> "mean" (the mean of all rows).
  """
  for token_id, how in rows.items():
    if how != "mean":
      raise ValueError(f"unknown row init {how!r}")
    for key in (("embed",), ("lm_head",)):
      p = params.get(key)
      if isinstance(p, _Rows):
        p.set_mean(token_id)
      elif p is not None and key == ("embed",):
        p[token_id] = p.mean(0)
      elif p is not None:
        p[:, token_id] = p.mean(1)


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
    host = params[path]
    sharding = sharding_var.get_value()
    # Each device's shard is read (and cast) on its own.
    arr = jax.make_array_from_callback(
        tuple(host.shape),
        sharding,
        lambda idx, h=host: np.ascontiguousarray(h[idx], dtype=dtype),
    )
    flat.append((path, sharding_var.replace(arr)))
  state = nnx.from_flat_state(flat)
  return nnx.merge(graphdef, state)
