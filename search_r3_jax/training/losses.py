"""Losses as small pure functions, registered by name.

Stage 1 (PAPER.md) sums four of them: next-token cross-entropy on the
response, token-level KL to the frozen initial model, InfoNCE over cosine / τ,
and a triplet margin on cosine distance. Configs pick them by name with a
weight each; `get(name)` finds the function. A loss says what it needs
through its argument names (`logits`, `queries`, `tau`, ...), so the
stage-1 step can run any registered loss the config names.

Every function takes arrays and returns a scalar float32 mean (plus nothing
else), so each can be checked against a hand computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from search_r3_jax.core.encoding import token_logprobs  # noqa: F401 (re-export)
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.training.registry import Registry

LOSSES = Registry("loss")
register = LOSSES.register
get = LOSSES.get


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register("sft")
def next_token_cross_entropy(
    logits: jax.Array, tokens: jax.Array, target_mask: jax.Array
) -> jax.Array:
  """Mean cross-entropy of predicting `tokens[:, t]` from `logits[:, t-1]`.

  Args:
    logits: [B, T, V].
    tokens: [B, T] ids.
    target_mask: [B, T], 1 where token t is a target (the response).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return _masked_mean(nll, target_mask[:, 1:])


@register("kl")
def token_kl(
    logits: jax.Array, ref_logits: jax.Array, kl_mask: jax.Array
) -> jax.Array:
  """Mean over the masked positions of KL(policy ‖ reference), exact over V.

  Stage 1 masks the analysis tokens alone (`Batcher`'s `q_kl_mask`): the
  fixed suffix is taught by the cross-entropy only.

  Position t-1's distribution predicts token t, so the mask is shifted the
  same way as in `next_token_cross_entropy`.

  Args:
    logits, ref_logits: [B, T, V] (the reference without gradient).
    kl_mask: [B, T], 1 where token t is a KL target.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  logq = jax.nn.log_softmax(ref_logits[:, :-1].astype(jnp.float32), -1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
  return _masked_mean(kl, kl_mask[:, 1:])


def _unit(x: jax.Array) -> jax.Array:
  return l2_normalize(x.astype(jnp.float32))


@register("infonce")
def info_nce(
    queries: jax.Array,
    docs: jax.Array,
    tau: float = 0.05,
    in_batch: bool = True,
    doc_groups=None,
) -> jax.Array:
  """InfoNCE over cosine similarity / τ.

  Args:
    queries: [B, D].
    docs: [B, K, D]; docs[i, 0] is query i's positive, docs[i, 1:] its hard
      negatives.
    tau: temperature.
    in_batch: every other query's documents are negatives too.
    doc_groups: optional [B, K] ints naming each document; with `in_batch`,
      another row's copy of query i's positive (same group) is not used as a
      negative for query i (two queries of one page in a batch).
  """
  q, d = _unit(queries), _unit(docs)
  b, k, _ = d.shape
  if in_batch:
    scores = q @ d.reshape(b * k, -1).T / tau  # [B, B*K]
    target = jnp.arange(b) * k
    if doc_groups is not None:
      groups = doc_groups.reshape(b * k)
      same = groups[None, :] == groups[target][:, None]
      own = jnp.arange(b * k)[None, :] == target[:, None]
      scores = jnp.where(same & ~own, -jnp.inf, scores)
  else:
    scores = jnp.einsum("bd,bkd->bk", q, d) / tau
    target = jnp.zeros((b,), jnp.int32)
  logp = jax.nn.log_softmax(scores, -1)
  return -jnp.mean(jnp.take_along_axis(logp, target[:, None], -1))


@register("triplet")
def triplet_margin(
    queries: jax.Array, docs: jax.Array, margin: float = 0.2
) -> jax.Array:
  """Mean over (query, hard negative) of max(0, d(q, pos) - d(q, neg) + m).

  d is the cosine distance 1 - cos.

  Args:
    queries: [B, D].
    docs: [B, K, D] with the positive first and K - 1 >= 1 negatives.
  """
  q, d = _unit(queries), _unit(docs)
  cos = jnp.einsum("bd,bkd->bk", q, d)
  dist = 1.0 - cos
  return jnp.mean(jax.nn.relu(dist[:, :1] - dist[:, 1:] + margin))


# -- stage 2 (GRPO) -----------------------------------------------------------


def grpo_terms(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    clip_eps: float = 0.2,
    beta: float = 1e-3,
) -> dict[str, jax.Array]:
  """The clipped GRPO objective and its parts, per response token.

  For token t of rollout i, with r = exp(logp - old_logp) and A_i the
  rollout's advantage:

    policy = -min(r A_i, clip(r, 1 - eps, 1 + eps) A_i)
    kl     = exp(ref - logp) - (ref - logp) - 1      (k3, >= 0)

  averaged over all response tokens of the batch (a token-level mean).

  Args:
    logp: [N, T] log-probabilities of the taken tokens under the policy.
    old_logp: [N, T] the same under the policy that sampled them.
    ref_logp: [N, T] the same under the frozen reference.
    mask: [N, T], 1 on response tokens.
    advantages: [N].
  Returns:
    {"loss", "policy", "kl", "clip_fraction", "ratio_mean"}: scalars.
  """
  mask = mask.astype(jnp.float32)
  policy, kl, ratio, was_clipped = _grpo_per_token(
      logp, old_logp, ref_logp, advantages, clip_eps
  )
  return {
      "loss": _masked_mean(policy + beta * kl, mask),
      "policy": _masked_mean(policy, mask),
      "kl": _masked_mean(kl, mask),
      "clip_fraction": _masked_mean(was_clipped, mask),
      "ratio_mean": _masked_mean(ratio, mask),
  }


def _grpo_per_token(logp, old_logp, ref_logp, advantages, clip_eps):
  """[N, T] clipped policy term, k3 KL, ratio and clip indicator."""
  ratio = jnp.exp(logp - old_logp)
  adv = advantages.astype(jnp.float32)[:, None]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
  policy = -jnp.minimum(unclipped, clipped)
  d = ref_logp - logp
  kl = jnp.exp(d) - d - 1.0
  return policy, kl, ratio, (clipped < unclipped).astype(jnp.float32)


@register("grpo")
def grpo(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    clip_eps: float = 0.2,
    beta: float = 1e-3,
) -> jax.Array:
  """The GRPO loss (see `grpo_terms`): clipped policy term + β k3 KL,
  a token-level mean over all response tokens of the batch, so a long
  rollout weighs more than a short one (as in DAPO and Dr. GRPO)."""
  return grpo_terms(logp, old_logp, ref_logp, mask, advantages, clip_eps, beta)[
      "loss"
  ]


@register("grpo_seq")
def grpo_sequence_mean(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    advantages: jax.Array,
    clip_eps: float = 0.2,
    beta: float = 1e-3,
) -> jax.Array:
  """The same per-token terms as `grpo`, averaged over each rollout's own
  response tokens first and then over the rollouts (DeepSeekMath's GRPO:
  every rollout weighs the same, whatever its length). A rollout without
  response tokens counts as 0."""
  mask = mask.astype(jnp.float32)
  policy, kl, _, _ = _grpo_per_token(
      logp, old_logp, ref_logp, advantages, clip_eps
  )
  per_row = jnp.sum((policy + beta * kl) * mask, 1) / jnp.maximum(
      jnp.sum(mask, 1), 1.0
  )
  return jnp.mean(per_row)
