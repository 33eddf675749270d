"""Jitted generation: prefill plus a `lax.while_loop` decode over a static KV cache.

Prompts are left-padded to a common length P, so every row writes its n-th new
token to the same cache slot P + n; RoPE positions still count each row's own
tokens. The whole generation (prefill, sampling, the loop, per-row stopping)
is one compiled program: there is no host round trip per token.

A row stops when it samples one of `stop_ids` (eos or `<|embed_token|>`).
With `capture_stop_hidden`, the loop feeds that stop token once more and keeps
its final hidden state: the embedding of a reasoning query is exactly that
state, with no second forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from search_r3_jax.core.model import KVCache

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen. temperature 0 is greedy decoding.

  Attributes:
    temperature: softmax temperature; 0 picks the argmax.
    top_p: nucleus sampling mass (1.0 disables it).
    top_k: keep the k most likely tokens (0 disables it).
  """

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _bisect_threshold(x: jax.Array, enough, iters: int = 40) -> jax.Array:
  """Largest t (per row) such that `enough(x >= t)` holds, by bisection.

  `enough` must be monotone (true for t = min(x), shrinking as t grows).
  Used for top-p without top-k: a few dozen compare-and-sum passes over the
  vocabulary are much cheaper on CPU than sorting it, and
  40 halvings of the value range pin the threshold to the exact token value
  (the kept set is exact unless two logits differ by less than range/2^40).
  Masked entries (<= _NEG / 2) are outside the range and never kept.

  Args:
    x: [B, V] values.
    enough: [B, V] bool mask -> [B] bool.
  Returns:
    [B, 1] thresholds.
  """
  live = x > _NEG / 2
  lo = jnp.min(jnp.where(live, x, jnp.inf), -1, keepdims=True)
  hi = jnp.max(x, -1, keepdims=True) + 1.0  # keeps nothing

  def step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = enough(x >= mid)[:, None]
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iters, step, (lo, hi))
  # Snap to the smallest kept value so `x >= t` is exact.
  return jnp.min(jnp.where(live & (x >= lo), x, jnp.inf), -1, keepdims=True)


def categorical(
    rng: jax.Array, logits: jax.Array, block: int = 128
) -> jax.Array:
  """Draws one index per row from softmax(logits) by two-level inverse CDF.

  Equivalent in distribution to `jax.random.categorical`, but it needs two
  uniforms per row instead of a Gumbel per vocabulary entry: on CPU the
  per-entry random bits cost more than the model's output head. The
  vocabulary is split into blocks; a block is chosen by its mass, then an
  entry within it, so each cumulative sum runs over at most a few hundred
  values (also keeping float32 round-off small).

  Args:
    logits: [B, V]; entries at or below _NEG / 2 have probability zero.
  Returns:
    [B] int32 indices.
  """
  b, v = logits.shape
  nb = -(-v // block)
  x = jnp.pad(logits, ((0, 0), (0, nb * block - v)), constant_values=_NEG)
  p = jnp.exp(x - jnp.max(x, -1, keepdims=True)).reshape(b, nb, block)
  # [B, 2], row-major: row i's draws do not depend on the batch size, so a
  # row samples the same tokens however the batch is padded.
  u = jax.random.uniform(rng, (b, 2), jnp.float32)

  def pick(mass, u):  # mass [B, n] >= 0 with a positive entry per row
    cum = jnp.cumsum(mass, -1)
    i = jnp.sum(cum <= u * cum[:, -1:], -1)
    # u * total may round up to total: fall back to the last positive entry.
    n = mass.shape[-1]
    last = n - 1 - jnp.argmax((mass > 0)[:, ::-1], -1)
    return jnp.minimum(i, last)

  blk = pick(p.sum(-1), u[:, :1])
  inner = jnp.take_along_axis(p, blk[:, None, None], 1)[:, 0]
  return (blk * block + pick(inner, u[:, 1:])).astype(jnp.int32)


def first_argmax(x: jax.Array) -> jax.Array:
  """Index of each row's first maximum ([B, V] -> [B] int32).

  The same as `jnp.argmax` for finite rows (NaN rows give the last index),
  as two plain reductions, which XLA on CPU runs several times faster than
  argmax's paired value-index reduction.
  """
  v = x.shape[-1]
  col = jnp.arange(v, dtype=jnp.int32)
  top = jnp.max(x, -1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(x == top, col, v), -1), v - 1)


def _nucleus(values: jax.Array, top_p: float) -> jax.Array:
  """Keep-mask of the top-p nucleus over values sorted in descending order:
  the shortest prefix holding at least `top_p` of the mass, plus any value
  tied with its last member."""
  probs = jax.nn.softmax(values, -1)
  before = jnp.cumsum(probs, -1) - probs  # mass strictly ahead of each entry
  in_prefix = before < top_p
  cut = jnp.min(jnp.where(in_prefix, values, jnp.inf), -1, keepdims=True)
  return values >= cut


def sample_logits(
    logits: jax.Array, rng: jax.Array, sp: SamplingParams
) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row and its log-probability.

  The log-probability is taken under the distribution the token was drawn
  from before top-k/top-p truncation: softmax(logits / temperature), or the
  plain softmax for greedy decoding.

  With top-k, the k best tokens are taken with `lax.top_k` and top-p and the
  draw run over those k only (a token tied with the k-th is left out, as
  `lax.top_k` breaks ties by index). Top-p alone finds its threshold by
  bisection over the whole vocabulary.

  Args:
    logits: [B, V] float32, padding columns already masked.
  Returns:
    (tokens [B] int32, logprobs [B] float32).
  """
  if sp.temperature == 0.0:
    tok = first_argmax(logits)
    scaled = logits
  else:
    scaled = logits / sp.temperature
    if sp.top_k:
      k = min(sp.top_k, scaled.shape[-1])
      values, index = jax.lax.top_k(scaled, k)
      if sp.top_p < 1.0:
        values = jnp.where(_nucleus(values, sp.top_p), values, _NEG)
      pick = categorical(rng, values)
      tok = jnp.take_along_axis(index, pick[:, None], -1)[:, 0]
    else:
      masked = scaled
      if sp.top_p < 1.0:
        probs = jax.nn.softmax(masked, -1)
        cut = _bisect_threshold(
            masked,
            lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), -1) >= sp.top_p,
        )
        masked = jnp.where(masked >= cut, masked, _NEG)
      tok = categorical(rng, masked)
  tok = tok.astype(jnp.int32)
  picked = jnp.take_along_axis(scaled, tok[:, None], -1)[:, 0]
  return tok, picked - jax.nn.logsumexp(scaled, -1)


class Generation(NamedTuple):
  """What `generate` returns (device arrays; M = max_new_tokens).

  tokens: [B, M] new tokens, `pad_id` after a row's stop token.
  logprobs: [B, M] their log-probabilities, 0 after the stop.
  lengths: [B] number of new tokens, the stop token included.
  stopped: [B] bool, True where the row produced a stop token.
  stop_hidden: [B, D] final hidden state at the stop token (zeros where the
    row did not stop or capture was off).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  stop_hidden: jax.Array


class _Carry(NamedTuple):
  i: jax.Array
  cache: KVCache
  key_valid: jax.Array
  tok: jax.Array  # token fed at step i (the i-th new token)
  gen_done: jax.Array  # row has sampled its stop token
  captured: jax.Array  # row has fed its stop token (capture mode)
  tokens: jax.Array
  logprobs: jax.Array
  hidden: jax.Array
  rng: jax.Array


def _mask_vocab(logits, valid_vocab):
  if valid_vocab >= logits.shape[-1]:
    return logits
  col = jnp.arange(logits.shape[-1])
  return jnp.where(col < valid_vocab, logits, _NEG)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "sampling",
        "stop_ids",
        "valid_vocab",
        "pad_id",
        "capture_stop_hidden",
        "batch_axes",
    ),
)
def generate(
    graphdef,
    state,
    prompt: jax.Array,
    prompt_valid: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_ids: tuple[int, ...],
    valid_vocab: int,
    pad_id: int,
    capture_stop_hidden: bool = False,
    batch_axes=None,
    quantized=None,
) -> Generation:
  """Generates up to `max_new_tokens` tokens for a left-padded batch.

  Args:
    graphdef, state: the model, split with `nnx.split`.
    prompt: [B, P] int32, left-padded.
    prompt_valid: [B, P] bool, False on the padding.
    rng: PRNG key; step i uses `fold_in(rng, i)`.
    max_new_tokens: M.
    sampling: SamplingParams (static: each setting compiles once).
    stop_ids: token ids that end a row.
    valid_vocab: ids at or above this are never sampled (padded vocab rows).
    pad_id: filler for tokens after a row's stop.
    capture_stop_hidden: feed each stop token once more and keep its final
      hidden state (the embedding for reasoning queries).
    batch_axes: mesh axes the batch is split over (a hashable tuple, or
      None); the KV cache is pinned to that split.
    quantized: `QuantizedWeights` packed from the same parameters, for the
      CPU kernels (decode steps and the output head), or None.
  """
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, p = prompt.shape
  m = max_new_tokens
  size = p + m
  plen = prompt_valid.sum(-1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(prompt_valid, -1) - 1, 0)
  key_valid = jnp.concatenate([prompt_valid, jnp.zeros((b, m), bool)], axis=1)
  cache = KVCache.zeros(cfg, b, size)
  if batch_axes is not None:
    spec = jax.sharding.PartitionSpec(None, batch_axes)
    cache = KVCache(*(jax.lax.with_sharding_constraint(c, spec) for c in cache))
  # Logits only at the last slot: with left padding it is every row's last
  # prompt token, and the [B, P, V] logits would cost a vocab-wide matmul.
  _, hidden, cache = model(
      prompt,
      positions,
      key_valid,
      cache,
      0,
      return_logits=False,
      quantized=quantized,
  )
  last = _mask_vocab(
      model.logits_from_hidden(hidden[:, -1:], quantized)[:, 0], valid_vocab
  )
  stop = jnp.asarray(stop_ids, jnp.int32)
  tok0, lp0 = sample_logits(last, jax.random.fold_in(rng, 0), sampling)
  tokens = jnp.full((b, m + 1), pad_id, jnp.int32).at[:, 0].set(tok0)
  logprobs = jnp.zeros((b, m + 1), jnp.float32).at[:, 0].set(lp0)
  is_stop = lambda t: jnp.any(t[:, None] == stop[None, :], -1)
  carry = _Carry(
      i=jnp.zeros((), jnp.int32),
      cache=cache,
      key_valid=key_valid,
      tok=tok0,
      gen_done=is_stop(tok0),
      captured=jnp.zeros((b,), bool),
      tokens=tokens,
      logprobs=logprobs,
      hidden=jnp.zeros((b, cfg.hidden_size), jnp.float32),
      rng=rng,
  )

  # The output head as one contiguous [D, V] array, made once per call rather
  # than transposed from the tied embedding at every step.
  packed_head = quantized is not None and "head" in quantized.mats
  head = (
      None
      if packed_head
      else jax.lax.optimization_barrier(model.head_weight().astype(cfg.dtype))
  )

  def finished(c: _Carry):
    return c.captured if capture_stop_hidden else c.gen_done

  def cond(c: _Carry):
    # Step i feeds token i; token M-1 needs feeding only to capture its state.
    last_step = m if capture_stop_hidden else m - 1
    return (c.i < last_step) & ~jnp.all(finished(c))

  def body(c: _Carry) -> _Carry:
    slot = p + c.i
    key_valid = c.key_valid.at[:, slot].set(True)
    pos = (plen + c.i)[:, None]
    _, hidden, cache = model(
        c.tok[:, None],
        pos,
        key_valid,
        c.cache,
        slot,
        return_logits=False,
        quantized=quantized,
    )
    if packed_head:
      logits = model.logits_from_hidden(hidden, quantized)
    else:
      logits = jnp.einsum(
          "btd,dv->btv",
          hidden.astype(head.dtype),
          head,
          preferred_element_type=jnp.float32,
      )
    feeding_stop = is_stop(c.tok) & ~c.captured
    if not capture_stop_hidden:
      feeding_stop = jnp.zeros_like(feeding_stop)
    hid = jnp.where(
        feeding_stop[:, None], hidden[:, 0].astype(jnp.float32), c.hidden
    )
    # The step that feeds a row's stop token must not emit anything for it.
    done_before = c.gen_done
    nxt, lp = sample_logits(
        _mask_vocab(logits[:, 0], valid_vocab),
        jax.random.fold_in(c.rng, c.i + 1),
        sampling,
    )
    nxt = jnp.where(done_before, pad_id, nxt)
    lp = jnp.where(done_before, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice(c.tokens, nxt[:, None], (0, c.i + 1))
    logprobs = jax.lax.dynamic_update_slice(
        c.logprobs, lp[:, None], (0, c.i + 1)
    )
    return _Carry(
        i=c.i + 1,
        cache=cache,
        key_valid=key_valid,
        tok=jnp.where(done_before, pad_id, nxt),
        gen_done=done_before | is_stop(nxt),
        captured=c.captured | feeding_stop,
        tokens=tokens,
        logprobs=logprobs,
        hidden=hid,
        rng=c.rng,
    )

  c = jax.lax.while_loop(cond, body, carry)
  tokens, logprobs = c.tokens[:, :m], c.logprobs[:, :m]
  stop_mask = jnp.any(tokens[..., None] == stop, -1)
  first_stop = jnp.argmax(stop_mask, -1)
  stopped = jnp.any(stop_mask, -1)
  lengths = jnp.where(stopped, first_stop + 1, m).astype(jnp.int32)
  # Outside the row's length everything is padding.
  col = jnp.arange(m)[None, :]
  inside = col < lengths[:, None]
  tokens = jnp.where(inside, tokens, pad_id)
  logprobs = jnp.where(inside, logprobs, 0.0)
  return Generation(
      tokens,
      logprobs,
      lengths,
      stopped,
      jnp.where(c.captured[:, None], c.hidden, 0.0),
  )
