"""The stage-2 GRPO update: one pure, jitted, donated step over the mesh.

A batch holds N = Q * G rollouts, each a right-padded row of prompt +
sampled reasoning + `<|embed_token|>`:

  tokens     [N, T] int32   ids
  lengths    [N]    int32   real tokens per row
  mask       [N, T] float   1 at the positions of sampled response tokens
                            (the prompt, padding and an embed token appended
                            to a rollout that never emitted it are 0)
  old_logp   [N, T-1] f32   log-probabilities of tokens[:, 1:] under the
                            parameters that sampled them (`logprobs`)
  advantages [N]    f32     group-normalised rewards (`losses.group_advantages`)
  embed_pos  [N]    int32   position of `<|embed_token|>` in each row
  docs       [N, K, D] f32  the gold document's stored embedding first, then
                            index negatives (constants: no gradient reaches
                            the index)

The loss is `losses.grpo` (clipped importance ratio, token-level mean, k3 KL
to the frozen reference with weight beta) plus, with `aux_weight`, InfoNCE of
the rollout's embedding (the final hidden state at `<|embed_token|>`,
recomputed here so gradients reach it) against `docs`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from search_r3_jax.training import losses as losses_lib
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.core.encoding import hidden_at, right_padded_forward
from search_r3_jax.core import sharding as shd
from search_r3_jax.training.train_state import TrainState, gradient_step

BATCH_KEYS = ("tokens", "lengths", "mask", "old_logp", "advantages",
              "embed_pos", "docs")
_BATCH_NDIMS = (2, 1, 2, 2, 1, 1, 3)


def _forward(graphdef, params, tokens, lengths):
  return right_padded_forward(nnx.merge(graphdef, params), tokens, lengths)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def logprobs(graphdef, params, tokens: jax.Array, lengths: jax.Array
             ) -> jax.Array:
  """[N, T-1] log p(tokens[:, t] | prefix) under `params` (the old policy's
  log-probabilities before several inner epochs)."""
  logits, _, _ = _forward(graphdef, params, tokens, lengths)
  return losses_lib.token_logprobs(logits, tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def policy_outputs(graphdef, params, tokens: jax.Array, lengths: jax.Array,
                   embed_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One forward pass of the sampling policy over a GRPO batch: the [N, T-1]
  old log-probabilities and the [N, D] L2-normalised embeddings at
  `embed_pos` (what the rollouts are searched and rewarded with)."""
  logits, hidden, _ = _forward(graphdef, params, tokens, lengths)
  emb = hidden_at(hidden, embed_pos).astype(jnp.float32)
  emb = l2_normalize(emb)
  return losses_lib.token_logprobs(logits, tokens), emb


def grpo_losses(graphdef, params, ref_params, batch: Mapping[str, jax.Array],
                cfg: Mapping) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts.

  Args:
    cfg: `clip_eps`, `beta` (KL weight; 0 skips the reference), `aux_weight`
      (0 skips the auxiliary InfoNCE), `tau`.
  """
  tokens, lengths = batch["tokens"], batch["lengths"]
  logits, hidden, _ = _forward(graphdef, params, tokens, lengths)
  logp = losses_lib.token_logprobs(logits, tokens)
  mask = batch["mask"][:, 1:]
  beta = float(cfg["beta"])
  if beta:
    ref_logits, _, _ = _forward(graphdef, ref_params, tokens, lengths)
    ref_logp = jax.lax.stop_gradient(
        losses_lib.token_logprobs(ref_logits, tokens))
  else:
    ref_logp = jax.lax.stop_gradient(logp)
  parts = losses_lib.grpo_terms(logp, batch["old_logp"], ref_logp, mask,
                                batch["advantages"],
                                clip_eps=float(cfg["clip_eps"]), beta=beta)
  total = parts["loss"]
  aux_weight = float(cfg.get("aux_weight", 0.0))
  if aux_weight:
    pos = batch["embed_pos"]
    q_emb = hidden_at(hidden, pos)
    docs = jax.lax.stop_gradient(batch["docs"])
    parts["aux_infonce"] = losses_lib.get("infonce")(
        q_emb, docs, tau=float(cfg["tau"]), in_batch=False)
    total = total + aux_weight * parts["aux_infonce"]
  parts["response_tokens"] = jnp.sum(mask)
  return total, parts


def make_grpo_step(graphdef, tx, schedule, cfg: Mapping, mesh: Mesh,
                   state_shardings, batch_size: int):
  """The jitted `(state, batch) -> (state, metrics)` update.

  The state is donated; batch arrays are split over the mesh's batch axes.
  Call it once per inner epoch with the same batch (`old_logp` fixed).
  """
  cfg = dict(cfg)

  def step(state: TrainState, batch):
    def loss_fn(params):
      return grpo_losses(graphdef, params, state.ref_params, batch, cfg)

    return gradient_step(state, loss_fn, tx, schedule)

  batch_shardings = {
      k: shd.batch_sharding(mesh, nd, batch_size=batch_size)
      for k, nd in zip(BATCH_KEYS, _BATCH_NDIMS)
  }
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,)), batch_shardings
