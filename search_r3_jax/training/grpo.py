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
import numpy as np

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


def response_logprobs(
    model,
    hidden: jax.Array,
    targets: jax.Array,
    mask: Optional[jax.Array],
    window: int,
    temperature: float = 1.0,
    valid_vocab: Optional[int] = None,
    chunk: int = 0,
) -> jax.Array:
  """[N, T-1] log-probabilities of `targets[:, 1:]` from the final hidden
  states [N, T, D], the output head applied only over each row's response.

  A GRPO row is prompt + at most `window` sampled tokens (`mask` 1 on
  them, contiguous), and only those positions enter the objective. Each
  row's log-probabilities are taken over the `window` positions from the
  one before its first masked token; every other position gets 0 (the mask
  is 0 there). For SmolLM2-135M the output head is a fifth of a forward, so
  skipping the prompt's logits saves most of that. `window=0`, no mask, or
  a window as long as the row: every position, as `hidden_logprobs`.
  """
  t = hidden.shape[1] - 1
  if not window or mask is None or window >= t:
    return encoding.hidden_logprobs(
        model, hidden, targets, temperature, valid_vocab, chunk
    )
  # logp[:, i] scores targets[:, i + 1]: the first response token at
  # position p is scored at index p - 1. The window is moved back where
  # it would run past the row (every masked index stays inside it).
  start = jnp.argmax(mask[:, 1:] > 0, axis=1)
  start = jnp.minimum(start, t - window)
  pos = start[:, None] + jnp.arange(window + 1)[None, :]  # [N, W + 1]
  h = jnp.take_along_axis(hidden, pos[..., None], axis=1)
  tg = jnp.take_along_axis(targets, pos, axis=1)
  lp = encoding.hidden_logprobs(model, h, tg, temperature, valid_vocab, chunk)
  # Back to row positions by a per-row gather (a scatter would not keep the
  # rows' split over the batch axes): index i holds lp[i - start] inside
  # the window, 0 outside it.
  offset = jnp.arange(t)[None, :] - start[:, None]  # [N, T-1]
  inside = (offset >= 0) & (offset < window)
  picked = jnp.take_along_axis(lp, jnp.clip(offset, 0, window - 1), axis=1)
  return jnp.where(inside, picked, 0.0).astype(lp.dtype)


def check_window(mask: np.ndarray, window: int) -> None:
  """Raises if a row's masked (response) positions do not fit in `window`
  positions from its first: `response_logprobs` would drop them."""
  if not window:
    return
  m = np.asarray(mask)[:, 1:] > 0
  has = m.any(axis=1)
  first = np.argmax(m, axis=1)
  last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
  span = np.where(has, last - first + 1, 0)
  if span.max(initial=0) > window:
    row = int(np.argmax(span))
    raise ValueError(
        f"GRPO batch row {row} has a response of {int(span[row])} positions,"
        f" more than the log-probability window of {window} (the sampler's"
        " max_new_tokens)"
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "temperature",
        "valid_vocab",
        "logprob_chunk",
        "response_window",
    ),
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
    mask: Optional[jax.Array] = None,
    response_window: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """One forward pass of the sampling policy over a GRPO batch: the [N, T-1]
  old log-probabilities and the [N, D] L2-normalised embeddings at
  `embed_pos` (what the rollouts are searched and rewarded with).

  The log-probabilities are those of the distribution the sampler drew the
  rollouts from: softmax(logits / temperature) over the first `valid_vocab`
  columns. Taken from the unscaled logits, the importance ratio, and so the
  gradient, would belong to another policy at any temperature but 1.
  `logprob_chunk` positions of logits at a time (0: all at once). With
  `mask` and `response_window`, only the response's positions are scored
  (`response_logprobs`; 0 elsewhere).
  """
  model = nnx.merge(graphdef, params)
  _, hidden, _ = right_padded_forward(
      model, tokens, lengths, return_logits=False
  )
  emb = l2_normalize(hidden_at(hidden, embed_pos).astype(jnp.float32))
  logp = response_logprobs(
      model,
      hidden,
      tokens if targets is None else targets,
      mask,
      response_window,
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
      at a time; `response_window` (0: off), the sampler's budget, scores
      only each row's response positions (`response_logprobs`).
  """
  tokens, lengths = batch["tokens"], batch["lengths"]
  targets = batch.get("targets", tokens)
  temperature = float(cfg.get("temperature", 1.0))
  valid_vocab = cfg.get("valid_vocab")

  chunk = int(cfg.get("logprob_chunk", 0))
  window = int(cfg.get("response_window", 0))

  def logprobs_of(p):
    # Full-vocabulary logits `chunk` positions at a time (0: all at once).
    model = nnx.merge(graphdef, p)
    _, hidden, _ = right_padded_forward(
        model, tokens, lengths, return_logits=False
    )
    logp = response_logprobs(
        model,
        hidden,
        targets,
        batch["mask"],
        window,
        temperature,
        valid_vocab,
        chunk,
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
