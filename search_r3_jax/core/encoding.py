"""Jitted forward passes used for encoding and scoring: pure functions of
(graphdef, state, batch), so the same code serves the API and training."""

from __future__ import annotations

import functools
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp

from search_r3_jax.core.ops import l2_normalize


def right_padded_forward(
    model, tokens: jax.Array, lengths: jax.Array, return_logits: bool = True
):
  """`model` over a right-padded batch: rows hold `lengths` real tokens
  from position 0. Returns the model's (logits, hidden, cache)."""
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  valid = positions < lengths[:, None]
  return model(tokens, positions, valid, return_logits=return_logits)


def hidden_at(hidden: jax.Array, pos: jax.Array) -> jax.Array:
  """[B, D] float32: each row's hidden state at position `pos[b]`."""
  h = jnp.take_along_axis(hidden, pos[:, None, None], 1)[:, 0]
  return h.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed_last(
    graphdef, state, tokens: jax.Array, lengths: jax.Array
) -> jax.Array:
  """L2-normalized final hidden state at each row's last token.

  Args:
    tokens: [B, T] right-padded ids whose last real token is the embed token.
    lengths: [B] number of real tokens per row (>= 1).
  Returns:
    [B, D] float32 unit vectors.
  """
  model = nnx.merge(graphdef, state)
  _, hidden, _ = right_padded_forward(
      model, tokens, lengths, return_logits=False
  )
  h = hidden_at(hidden, jnp.maximum(lengths - 1, 0))
  return l2_normalize(h)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_logits(
    graphdef, state, tokens: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Logits [B, T, V] float32 and final hidden [B, T, D] of a right-padded
  batch (positions past `lengths` hold padding)."""
  model = nnx.merge(graphdef, state)
  logits, hidden, _ = right_padded_forward(model, tokens, lengths)
  return logits, hidden


# What the sampler puts in the columns it may not draw (`decoding._NEG`).
_NEG = -1e30


def _picked_logprobs(logits, targets, temperature, valid_vocab):
  """log softmax(logits / temperature)[targets] over the first
  `valid_vocab` columns; logits [..., V], targets [...]."""
  scaled = logits.astype(jnp.float32)
  if temperature != 1.0:
    scaled = scaled / temperature
  if valid_vocab is not None and valid_vocab < scaled.shape[-1]:
    col = jnp.arange(scaled.shape[-1])
    scaled = jnp.where(col < valid_vocab, scaled, _NEG)
  picked = jnp.take_along_axis(scaled, targets[..., None], -1)[..., 0]
  return picked - jax.nn.logsumexp(scaled, -1)


def token_logprobs(
    logits: jax.Array,
    tokens: jax.Array,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
) -> jax.Array:
  """log p(tokens[:, t] | prefix) from `logits[:, t-1]`: [B, T-1] float32,
  under the distribution the sampler draws from at `temperature`:
  softmax(logits / temperature) over the first `valid_vocab` columns (the
  tokenizer's ids; padding rows of the embedding are never drawn)."""
  return _picked_logprobs(
      logits[:, :-1], tokens[:, 1:], temperature, valid_vocab
  )


def hidden_logprobs(
    model,
    hidden: jax.Array,
    tokens: jax.Array,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
    chunk: int = 0,
) -> jax.Array:
  """`token_logprobs` from the final hidden states [B, T, D], the output
  head applied `chunk` positions at a time: the float32 logits of at most
  [B, chunk, V] exist at once, in the forward and (each chunk recomputed
  under `jax.checkpoint`) in the backward. `chunk=0` is the whole
  sequence at once."""
  if not chunk:
    return token_logprobs(
        model.logits_from_hidden(hidden), tokens, temperature, valid_vocab
    )
  h, targets = hidden[:, :-1], tokens[:, 1:]
  b, t, d = h.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets = targets.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(hc, tc):
    return _picked_logprobs(
        model.logits_from_hidden(hc), tc, temperature, valid_vocab
    )

  out = jax.lax.map(lambda a: one(*a), (h, targets))  # [n, B, chunk]
  return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "temperature", "valid_vocab", "chunk"),
)
def logprobs(
    graphdef,
    state,
    tokens: jax.Array,
    lengths: jax.Array,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
    chunk: int = 0,
) -> jax.Array:
  """[B, T-1] log-probabilities of `tokens[:, 1:]` of a right-padded batch
  (see `token_logprobs`; `chunk` as in `hidden_logprobs`)."""
  model = nnx.merge(graphdef, state)
  _, hidden, _ = right_padded_forward(
      model, tokens, lengths, return_logits=False
  )
  return hidden_logprobs(model, hidden, tokens, temperature, valid_vocab, chunk)
