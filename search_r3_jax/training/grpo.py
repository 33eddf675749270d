"""The stage-2 GRPO update: one pure, jitted, donated step over the mesh.

A batch holds N = Q * G rollouts, each a right-padded row of prompt +
sampled reasoning + `<|embed_token|>`:

  tokens     [N, T] int32   ids
  targets    [N, T] int32   the sampled ids the objective scores: `tokens`,
                            except where a rollout's sampled end-of-turn id
                            was replaced by the embed suffix
                            (`rollouts.grpo_batch`)
  lengths    [N]    int32   real tokens per row
  mask       [N, T] float   1 at the positions of sampled response tokens
                            (the prompt, padding and an embed token appended
                            to a rollout that never emitted it are 0)
  old_logp   [N, T-1] f32   log-probabilities of targets[:, 1:] under the
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
from typing import Mapping, Optional

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from search_r3_jax.core import encoding
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.encoding import hidden_at
from search_r3_jax.core.encoding import right_padded_forward
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.training import losses as losses_lib
from search_r3_jax.training.train_state import gradient_step
from search_r3_jax.training.train_state import TrainState

BATCH_KEYS = (
    "tokens",
    "targets",
    "lengths",
    "mask",
    "old_logp",
    "advantages",
    "embed_pos",
    "docs",
)
_BATCH_NDIMS = (2, 2, 1, 2, 2, 1, 1, 3)


def batch_shapes(n: int, seq_len: int, docs: int, dim: int) -> dict:
  """(shape, dtype) of every array of a GRPO batch of `n` rollouts of
  `seq_len` tokens with `docs` auxiliary documents of dimension `dim`."""
  i32, f32 = jnp.int32, jnp.float32
  return dict(
      tokens=((n, seq_len), i32),
      targets=((n, seq_len), i32),
      lengths=((n,), i32),
      mask=((n, seq_len), f32),
      old_logp=((n, seq_len - 1), f32),
      advantages=((n,), f32),
      embed_pos=((n,), i32),
      docs=((n, docs, dim), f32),
  )


# [N, T-1] log p(tokens[:, t] | prefix) under some parameters (e.g. the old
# policy's before several inner epochs): the core's jitted forward.
logprobs = encoding.logprobs


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "temperature", "valid_vocab", "logprob_chunk"),
)
def policy_outputs(
    graphdef,
    params,
    tokens: jax.Array,
    lengths: jax.Array,
    embed_pos: jax.Array,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
    targets: Optional[jax.Array] = None,
    logprob_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """One forward pass of the sampling policy over a GRPO batch: the [N, T-1]
  old log-probabilities and the [N, D] L2-normalised embeddings at
  `embed_pos` (what the rollouts are searched and rewarded with).

  The log-probabilities are those of the distribution the sampler drew the
  rollouts from: softmax(logits / temperature) over the first `valid_vocab`
  columns. Taken from the unscaled logits, the importance ratio, and so the
  gradient, would belong to another policy at any temperature but 1.
  `logprob_chunk` positions of logits at a time (0: all at once).
  """
  model = nnx.merge(graphdef, params)
  _, hidden, _ = right_padded_forward(
      model, tokens, lengths, return_logits=False
  )
  emb = l2_normalize(hidden_at(hidden, embed_pos).astype(jnp.float32))
  logp = encoding.hidden_logprobs(
      model,
      hidden,
      tokens if targets is None else targets,
      temperature,
      valid_vocab,
      logprob_chunk,
  )
  return logp, emb


def grpo_losses(
    graphdef, params, ref_params, batch: Mapping[str, jax.Array], cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its parts.

  Args:
    cfg: `policy` (a registered loss, default "grpo"), `clip_eps`, `beta`
      (KL weight; 0 skips the reference), `aux_weight` (0 skips the
      auxiliary InfoNCE), `tau`, and the sampler's `temperature` and
      `valid_vocab`: the policy's and the reference's log-probabilities are
      taken under the distribution the rollouts were drawn from;
      `logprob_chunk` (0: off) bounds their logits to that many positions
      at a time.
  """
  tokens, lengths = batch["tokens"], batch["lengths"]
  targets = batch.get("targets", tokens)
  temperature = float(cfg.get("temperature", 1.0))
  valid_vocab = cfg.get("valid_vocab")

  chunk = int(cfg.get("logprob_chunk", 0))

  def logprobs_of(p):
    # Full-vocabulary logits `chunk` positions at a time (0: all at once).
    model = nnx.merge(graphdef, p)
    _, hidden, _ = right_padded_forward(
        model, tokens, lengths, return_logits=False
    )
    logp = encoding.hidden_logprobs(
        model, hidden, targets, temperature, valid_vocab, chunk
    )
    return logp, hidden

  logp, hidden = logprobs_of(params)
  mask = batch["mask"][:, 1:]
  beta = float(cfg["beta"])
  if beta:
    ref_logp = jax.lax.stop_gradient(logprobs_of(ref_params)[0])
  else:
    ref_logp = jax.lax.stop_gradient(logp)
  args = (logp, batch["old_logp"], ref_logp, mask, batch["advantages"])
  hyper = dict(clip_eps=float(cfg["clip_eps"]), beta=beta)
  # The clip fraction, ratio and KL are logged whatever the objective; the
  # objective itself is the registered loss the config names.
  parts = losses_lib.grpo_terms(*args, **hyper)
  parts["loss"] = losses_lib.get(cfg.get("policy", "grpo"))(*args, **hyper)
  total = parts["loss"]
  aux_weight = float(cfg.get("aux_weight", 0.0))
  if aux_weight:
    pos = batch["embed_pos"]
    q_emb = hidden_at(hidden, pos)
    docs = jax.lax.stop_gradient(batch["docs"])
    parts["aux_infonce"] = losses_lib.get("infonce")(
        q_emb, docs, tau=float(cfg["tau"]), in_batch=False
    )
    total = total + aux_weight * parts["aux_infonce"]
  parts["response_tokens"] = jnp.sum(mask)
  return total, parts


def make_grpo_step(
    graphdef,
    tx,
    schedule,
    cfg: Mapping,
    mesh: Mesh,
    state_shardings,
    batch_size: int,
):
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
  return (
      jax.jit(
          step,
          in_shardings=(state_shardings, batch_shardings),
          out_shardings=(state_shardings, replicated),
          donate_argnums=(0,),
      ),
      batch_shardings,
  )
