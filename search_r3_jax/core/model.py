"""The decoder: one Flax NNX module for the Llama (SmolLM2) and Qwen2 families.

Block parameters are stacked along a leading `layers` axis so the blocks run
under `lax.scan` (one compiled block, fast compiles on TPU and CPU alike); the
block itself is a pure function of its parameters, which keeps the KV cache
and the scan explicit. Linear weights are stored `[in, ..., out]` with logical
axis names on every parameter (see `sharding.py`).

Shapes use one-letter suffixes: B batch, T query length, S key length (cache
size), D model width, N query heads, K kv heads, G = N / K, H head width,
F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

from flax import nnx
import jax
import jax.numpy as jnp

from search_r3_jax.core.config import ModelConfig


class QuantizedWeights(Protocol):
  """What the decoder needs of packed weights (`quantized.QuantizedWeights`,
  which also builds the CPU kernels: the model itself never imports them)."""

  mats: dict
  max_rows: int

  def width(self, name: str) -> int:
    ...

  def matmul(self, x: jax.Array, name: str, layer=0) -> jax.Array:
    ...


# Large negative used instead of -inf so fully masked rows (left padding)
# give a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# name -> (shape function of cfg, logical axes, init kind); the leading
# `layers` axis is added for every block parameter.
_BLOCK_PARAMS = {
    "attn_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "wq": (
        lambda c: (c.hidden_size, c.num_heads, c.head_dim),
        ("embed", "heads", "head_dim"),
        "normal",
    ),
    "wk": (
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "normal",
    ),
    "wv": (
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "normal",
    ),
    "wo": (
        lambda c: (c.num_heads, c.head_dim, c.hidden_size),
        ("heads", "head_dim", "embed"),
        "normal",
    ),
    "mlp_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "w_gate": (
        lambda c: (c.hidden_size, c.intermediate_size),
        ("embed", "mlp"),
        "normal",
    ),
    "w_up": (
        lambda c: (c.hidden_size, c.intermediate_size),
        ("embed", "mlp"),
        "normal",
    ),
    "w_down": (
        lambda c: (c.intermediate_size, c.hidden_size),
        ("mlp", "embed"),
        "normal",
    ),
}
_BIAS_PARAMS = {
    "bq": (lambda c: (c.num_heads, c.head_dim), ("heads", "head_dim"), "zeros"),
    "bk": (
        lambda c: (c.num_kv_heads, c.head_dim),
        ("kv_heads", "head_dim"),
        "zeros",
    ),
    "bv": (
        lambda c: (c.num_kv_heads, c.head_dim),
        ("kv_heads", "head_dim"),
        "zeros",
    ),
}


def block_param_specs(cfg: ModelConfig) -> dict:
  """name -> (shape, logical axes, init) for the stacked block parameters."""
  specs = dict(_BLOCK_PARAMS)
  if cfg.attention_bias:
    specs.update(_BIAS_PARAMS)
  return {
      k: ((cfg.num_layers,) + f(cfg), ("layers",) + ax, init)
      for k, (f, ax, init) in specs.items()
  }


class KVCache(NamedTuple):
  """Static-size key/value cache, `[L, B, S, K, H]` each."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, size: int) -> "KVCache":
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return w.astype(x.dtype) * x32.astype(x.dtype)


def rope_angles(
    positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the RoPE angles, [B, T, 1, H/2] float32 each.

  Computed once per forward and shared by every block.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x: [B, T, n, H]; cos, sin: [B, T, 1, H/2]."""
  half = x.shape[-1] // 2
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention(
    cfg: ModelConfig,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
) -> jax.Array:
  """Grouped-query attention: q [B, T, N, H], k and v [B, S, K, H], mask
  [B, T, S] (True where the query may attend the key) -> [B, T, N, H].

  "einsum" is the reference: the float32 scores of each kv head's G query
  heads as one einsum; "dot_product" is `jax.nn.dot_product_attention`
  (GQA and the mask handled there, its logits and softmax in float32). A
  query whose keys are all masked (left padding) gets uniform weights on
  both paths, never NaN.
  """
  b, t, n, h = q.shape
  if cfg.attention == "dot_product":
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=h**-0.5
    )
  kv_heads = cfg.num_kv_heads
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum(
      "btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32
  )
  scores = scores * (h**-0.5)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  o = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return o.reshape(b, t, n, h)


_REMAT = {
    "full": None,  # nothing saved: the block is recomputed from its input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def block(
    cfg: ModelConfig,
    p: dict,
    x: jax.Array,
    angles: tuple,
    mask: jax.Array,
    cache_kv: Optional[tuple],
    cache_index,
    qw: Optional[QuantizedWeights] = None,
    layer=None,
):
  """One decoder block. Returns (x, (k, v)) where k, v fill the cache slot.

  Args:
    p: this block's parameters (no layers axis).
    x: [B, T, D] activations.
    angles: (cos, sin) from `rope_angles`.
    mask: [B, T, S] bool, True where the query may attend the key.
    cache_kv: (k, v) of shape [B, S, K, H], or None (then S == T).
    cache_index: slot where the T new keys are written.
    qw: packed quantized weights; their groups replace the matching
      float32 projections (same numbers, see `quantized.py`).
    layer: this block's index into `qw`'s stacks.
  """
  dt = cfg.dtype
  b, t, _ = x.shape
  packed = lambda name: qw is not None and name in qw.mats
  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  if packed("qkv"):
    nq = cfg.num_heads * cfg.head_dim
    nk = cfg.num_kv_heads * cfg.head_dim
    qkv = qw.matmul(h, "qkv", layer).astype(dt)
    q = qkv[..., :nq].reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = qkv[..., nq : nq + nk].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = qkv[..., nq + nk :].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  else:
    q = jnp.einsum("btd,dnh->btnh", h, p["wq"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", h, p["wk"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", h, p["wv"].astype(dt))
  if cfg.attention_bias:
    q = q + p["bq"].astype(dt)
    k = k + p["bk"].astype(dt)
    v = v + p["bv"].astype(dt)
  q = rope(q, *angles)
  k = rope(k, *angles)
  if cache_kv is not None:
    ck, cv = cache_kv
    k = jax.lax.dynamic_update_slice(
        ck, k.astype(ck.dtype), (0, cache_index, 0, 0)
    )
    v = jax.lax.dynamic_update_slice(
        cv, v.astype(cv.dtype), (0, cache_index, 0, 0)
    )
  o = attention(cfg, q, k.astype(dt), v.astype(dt), mask)
  if packed("wo"):
    x = x + qw.matmul(o.reshape(b, t, -1), "wo", layer).astype(dt)
  else:
    x = x + jnp.einsum("btnh,nhd->btd", o, p["wo"].astype(dt))
  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  if packed("gate_up"):
    gate_up = qw.matmul(h, "gate_up", layer).astype(dt)
    gate, up = jnp.split(gate_up, 2, axis=-1)
  else:
    gate = jnp.einsum("btd,df->btf", h, p["w_gate"].astype(dt))
    up = jnp.einsum("btd,df->btf", h, p["w_up"].astype(dt))
  act = jax.nn.silu(gate) * up
  if packed("w_down"):
    x = x + qw.matmul(act, "w_down", layer).astype(dt)
  else:
    x = x + jnp.einsum("btf,fd->btd", act, p["w_down"].astype(dt))
  return x, (k, v)


def _init(kind: str, key, shape, dtype):
  if kind == "ones":
    return jnp.ones(shape, dtype)
  if kind == "zeros":
    return jnp.zeros(shape, dtype)
  return 0.02 * jax.random.normal(key, shape, dtype)


class Decoder(nnx.Module):
  """Decoder-only transformer; `__call__` returns logits and final hidden."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.pdtype

    def param(shape, axes, kind):
      # Logical names only: `sharding.state_shardings` resolves them against
      # the mesh, so creation itself never needs a mesh context.
      return nnx.Param(
          _init(kind, rngs.params(), shape, pd),
          out_sharding=axes,
          eager_sharding=False,
      )

    self.embed = param(
        (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal"
    )
    self.blocks = nnx.Dict(
        {
            name: param(shape, axes, kind)
            for name, (shape, axes, kind) in block_param_specs(cfg).items()
        }
    )
    self.final_norm = param((cfg.hidden_size,), ("norm",), "ones")
    if not cfg.tie_word_embeddings:
      self.lm_head = param(
          (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal"
      )

  def head_weight(self) -> jax.Array:
    """Output projection as `[D, V]`."""
    if self.cfg.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits_from_hidden(
      self, hidden: jax.Array, qw: Optional[QuantizedWeights] = None
  ) -> jax.Array:
    """[B, T, D] -> float32 logits [B, T, V]; `qw`'s packed head, when it
    has one, gives the checkpoint's rows and the float32 head the rest."""
    w = self.head_weight().astype(self.cfg.dtype)
    hidden = hidden.astype(self.cfg.dtype)
    if qw is None or "head" not in qw.mats:
      return jnp.einsum(
          "btd,dv->btv", hidden, w, preferred_element_type=jnp.float32
      )
    rows = qw.width("head")
    logits = qw.matmul(hidden, "head")
    if rows < w.shape[1]:
      extra = jnp.einsum(
          "btd,dv->btv", hidden, w[:, rows:], preferred_element_type=jnp.float32
      )
      logits = jnp.concatenate([logits, extra], -1)
    return logits

  def __call__(
      self,
      tokens: jax.Array,
      positions: jax.Array,
      key_valid: jax.Array,
      cache: Optional[KVCache] = None,
      cache_index=0,
      return_logits: bool = True,
      quantized: Optional[QuantizedWeights] = None,
  ):
    """Runs the decoder.

    Args:
      tokens: [B, T] int ids.
      positions: [B, T] RoPE positions.
      key_valid: [B, S] bool, False for padding keys. Without a cache S == T;
        with a cache S is the cache size and it covers every slot.
      cache: optional KVCache; the new keys go to slots
        [cache_index, cache_index + T).
      cache_index: scalar slot index of the first new token.
      return_logits: skip the output head when False (encoding only).
      quantized: packed weights for the CPU kernels; used when the batch
        holds at most `quantized.max_rows` tokens (decode steps).

    Returns:
      (logits [B, T, V] float32 or None, hidden [B, T, D] after the final
      norm, the updated cache or None).
    """
    cfg = self.cfg
    t = tokens.shape[1]
    x = self.embed[...].astype(cfg.dtype)[tokens]
    q_slot = cache_index + jnp.arange(t)
    k_slot = jnp.arange(key_valid.shape[1])
    mask = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]
    params = {name: var[...] for name, var in self.blocks.items()}
    angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    qw = (
        quantized
        if quantized is not None and tokens.size <= quantized.max_rows
        else None
    )

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)

    def body(x, layer):
      p, index = layer
      x, _ = block(cfg, p, x, angles, mask, None, cache_index, qw, index)
      return x, None

    def cached_body(carry, layer):
      # The stacked cache rides in the carry and only the T new slots of
      # this layer are written back, in place: no per-layer copy of the
      # whole cache in or out of the loop.
      x, ck, cv = carry
      p, index = layer
      x, (k, v) = block(
          cfg,
          p,
          x,
          angles,
          mask,
          (ck[index], cv[index]),
          cache_index,
          qw,
          index,
      )
      new = lambda a: jax.lax.dynamic_slice_in_dim(a, cache_index, t, 1)[None]
      at = (index, 0, cache_index, 0, 0)
      ck = jax.lax.dynamic_update_slice(ck, new(k).astype(ck.dtype), at)
      cv = jax.lax.dynamic_update_slice(cv, new(v).astype(cv.dtype), at)
      return (x, ck, cv), None

    if cache is None and cfg.remat != "none":
      # Under scan, CSE across iterations is not a risk (JAX's advice).
      body = jax.checkpoint(
          body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers
      )
    fn, carry = (
        (body, x) if cache is None else (cached_body, (x, cache.k, cache.v))
    )
    if cfg.scan_layers:
      carry, _ = jax.lax.scan(fn, carry, (params, layers))
    else:
      for i in range(cfg.num_layers):
        carry, _ = fn(carry, jax.tree.map(lambda a: a[i], (params, layers)))
    x = carry if cache is None else carry[0]
    hidden = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    logits = self.logits_from_hidden(hidden, qw) if return_logits else None
    new_cache = None if cache is None else KVCache(*carry[1:])
    return logits, hidden, new_cache
