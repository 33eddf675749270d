"""Jitted forward passes used for encoding and scoring: pure functions of
(graphdef, state, batch), so the same code serves the API and training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _right_padded_inputs(tokens, lengths):
  t = tokens.shape[1]
  valid = jnp.arange(t)[None, :] < lengths[:, None]
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  return positions, valid


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed_last(graphdef, state, tokens: jax.Array,
               lengths: jax.Array) -> jax.Array:
  """L2-normalized final hidden state at each row's last token.

  Args:
    tokens: [B, T] right-padded ids whose last real token is the embed token.
    lengths: [B] number of real tokens per row (>= 1).
  Returns:
    [B, D] float32 unit vectors.
  """
  model = nnx.merge(graphdef, state)
  positions, valid = _right_padded_inputs(tokens, lengths)
  _, hidden, _ = model(tokens, positions, valid, return_logits=False)
  idx = jnp.maximum(lengths - 1, 0)
  h = jnp.take_along_axis(hidden, idx[:, None, None], 1)[:, 0]
  h = h.astype(jnp.float32)
  return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def forward_logits(graphdef, state, tokens: jax.Array,
                   lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Logits [B, T, V] float32 and final hidden [B, T, D] of a right-padded
  batch (positions past `lengths` hold padding)."""
  model = nnx.merge(graphdef, state)
  positions, valid = _right_padded_inputs(tokens, lengths)
  logits, hidden, _ = model(tokens, positions, valid)
  return logits, hidden
