"""Each registered loss against a hand computation in plain numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search_r3_jax.training import advantages
from search_r3_jax.training import losses

RNG = np.random.default_rng(0)


def _log_softmax(row):
  m = max(row)
  return [x - m - math.log(sum(math.exp(y - m) for y in row)) for x in row]


def test_registry():
  assert {"sft", "kl", "infonce", "triplet"} <= set(losses.LOSSES)
  with pytest.raises(KeyError, match="unknown loss 'nope'"):
    losses.get("nope")


def test_next_token_cross_entropy():
  logits = RNG.standard_normal((2, 4, 5)).astype(np.float32)
  tokens = np.array([[1, 2, 3, 4], [0, 4, 1, 2]])
  mask = np.array([[0, 0, 1, 1], [0, 1, 1, 0]])
  total, n = 0.0, 0
  for b in range(2):
    for t in range(1, 4):
      if mask[b, t]:
        total -= _log_softmax(logits[b, t - 1])[tokens[b, t]]
        n += 1
  got = float(losses.get("sft")(logits, tokens, mask))
  assert got == pytest.approx(total / n, rel=1e-5)


def test_token_kl():
  p_logits = RNG.standard_normal((2, 3, 4)).astype(np.float32)
  q_logits = RNG.standard_normal((2, 3, 4)).astype(np.float32)
  mask = np.array([[0, 1, 1], [0, 0, 1]])
  total, n = 0.0, 0
  for b in range(2):
    for t in range(1, 3):
      if mask[b, t]:
        lp, lq = _log_softmax(p_logits[b, t - 1]), _log_softmax(
            q_logits[b, t - 1]
        )
        total += sum(math.exp(a) * (a - c) for a, c in zip(lp, lq))
        n += 1
  got = float(losses.get("kl")(p_logits, q_logits, mask))
  assert got == pytest.approx(total / n, rel=1e-5)
  assert float(losses.get("kl")(p_logits, p_logits, mask)) == pytest.approx(
      0.0, abs=1e-6
  )


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("in_batch", [True, False])
def test_info_nce(in_batch):
  q = RNG.standard_normal((3, 6)).astype(np.float32)
  d = RNG.standard_normal((3, 2, 6)).astype(np.float32)
  tau = 0.05
  qn, dn = _unit(q), _unit(d)
  total = 0.0
  for i in range(3):
    if in_batch:
      cands = [dn[j, k] for j in range(3) for k in range(2)]
      target = 2 * i
    else:
      cands = [dn[i, k] for k in range(2)]
      target = 0
    scores = [float(qn[i] @ c) / tau for c in cands]
    total -= _log_softmax(scores)[target]
  got = float(losses.get("infonce")(q, d, tau=tau, in_batch=in_batch))
  assert got == pytest.approx(total / 3, rel=1e-4)


def test_triplet_margin():
  q = RNG.standard_normal((2, 5)).astype(np.float32)
  d = RNG.standard_normal((2, 3, 5)).astype(np.float32)
  qn, dn = _unit(q), _unit(d)
  vals = []
  for i in range(2):
    pos = 1 - float(qn[i] @ dn[i, 0])
    for k in (1, 2):
      neg = 1 - float(qn[i] @ dn[i, k])
      vals.append(max(0.0, pos - neg + 0.2))
  got = float(losses.get("triplet")(q, d, margin=0.2))
  assert got == pytest.approx(sum(vals) / len(vals), rel=1e-5)
  # A positive far closer than every negative costs nothing.
  easy = np.stack([q, -q, -q], 1)
  assert float(losses.get("triplet")(q, easy, margin=0.2)) == 0.0


def test_info_nce_skips_in_batch_copies_of_the_positive():
  q = RNG.standard_normal((2, 6)).astype(np.float32)
  d = RNG.standard_normal((2, 2, 6)).astype(np.float32)
  d[1, 0] = d[0, 0]  # both queries' positive is the same document
  groups = np.array([[7, 8], [7, 9]])
  tau = 0.05
  qn, dn = _unit(q), _unit(d)
  flat = dn.reshape(4, 6)
  total = 0.0
  for i in range(2):
    target = 2 * i
    cands = [
        j
        for j in range(4)
        if j == target or groups.reshape(4)[j] != groups[i, 0]
    ]
    scores = [float(qn[i] @ flat[j]) / tau for j in cands]
    total -= _log_softmax(scores)[cands.index(target)]
  got = float(losses.get("infonce")(q, d, tau=tau, doc_groups=groups))
  assert got == pytest.approx(total / 2, rel=1e-4)


# -- GRPO ----------------------------------------------------------------------


def test_group_advantages_by_hand():
  rewards = np.array(
      [
          [1.0, 0.0, 0.0, 1.0],  # mean 0.5, std 0.5
          [2.0, 2.0, 2.0, 2.0],  # no spread: no signal
          [3.0, 0.0, 0.0, 0.0],
      ]
  )  # mean 0.75, std sqrt(27)/4
  got = np.asarray(advantages.get("grpo")(jnp.asarray(rewards), eps=1e-9))
  s = math.sqrt(27) / 4
  want = [
      [1, -1, -1, 1],
      [0, 0, 0, 0],
      [2.25 / s, -0.75 / s, -0.75 / s, -0.75 / s],
  ]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dr_grpo_advantages_by_hand_and_numpy_equals_jax():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
  got = advantages.get("dr_grpo")(rewards)
  np.testing.assert_allclose(
      got, [[0.5, -0.5, -0.5, 0.5], [2.25, -0.75, -0.75, -0.75]]
  )
  for name in advantages.ADVANTAGES:
    np.testing.assert_allclose(
        np.asarray(advantages.get(name)(jnp.asarray(rewards))),
        advantages.get(name)(rewards),
        rtol=1e-6,
        atol=1e-6,
    )
  with pytest.raises(
      KeyError, match="unknown advantage estimator 'ppo'.*" "dr_grpo.*grpo"
  ):
    advantages.get("ppo")


def test_grpo_sequence_mean_by_hand():
  # Row 0 has two response tokens, row 1 one: the sequence mean weighs the
  # rows equally, the token mean weighs row 0 twice.
  logp = jnp.zeros((2, 3))
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
  adv = jnp.array([1.0, -2.0])
  # At logp == old == ref the per-token term is -A (ratio 1, KL 0).
  seq = float(losses.get("grpo_seq")(logp, logp, logp, mask, adv))
  tok = float(losses.get("grpo")(logp, logp, logp, mask, adv))
  assert seq == pytest.approx((-1.0 + 2.0) / 2)
  assert tok == pytest.approx((-1.0 - 1.0 + 2.0) / 3)


def test_grpo_by_hand():
  # Two rollouts, three positions; the third is padding and holds values
  # that would dominate if the mask were ignored.
  logp = [[-1.0, -0.5, 5.0], [-1.0 + math.log(0.5), -0.1, 5.0]]
  old = [[-1.5, -0.5, -9.0], [-1.0, -0.4, -9.0]]
  ref = [[-1.0, -1.0, 9.0], [-1.0 + math.log(0.5), -0.2, 9.0]]
  mask = [[1, 1, 0], [1, 1, 0]]
  adv = [1.0, -2.0]
  eps, beta = 0.2, 0.1
  # Token by token: ratio r = exp(logp - old), policy = -min(rA, clip(r)A).
  r00 = math.exp(0.5)  # 1.6487 > 1.2, A > 0: clipped to 1.2
  p00, c00 = -min(r00 * 1.0, 1.2 * 1.0), 1
  p01, c01 = -1.0, 0  # ratio 1
  r10 = 0.5  # < 0.8, A < 0: clipped to 0.8
  p10, c10 = -min(r10 * -2.0, 0.8 * -2.0), 1
  r11 = math.exp(0.3)  # 1.35 > 1.2 but A < 0: unclipped is smaller
  p11, c11 = -min(r11 * -2.0, 1.2 * -2.0), 0
  assert p00 == -1.2 and p10 == 1.6 and c00 + c10 == 2
  k3 = lambda d: math.exp(d) - d - 1.0
  kls = [k3(0.0), k3(-0.5), k3(0.0), k3(-0.1)]
  policies = [p00, p01, p10, p11]
  want_loss = sum(p + beta * k for p, k in zip(policies, kls)) / 4
  got = losses.grpo_terms(
      *(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, mask, adv)),
      clip_eps=eps,
      beta=beta,
  )
  np.testing.assert_allclose(float(got["loss"]), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(got["policy"]), sum(policies) / 4, rtol=1e-5)
  np.testing.assert_allclose(float(got["kl"]), sum(kls) / 4, rtol=1e-5)
  assert float(got["clip_fraction"]) == 0.5
  np.testing.assert_allclose(
      float(got["ratio_mean"]), (r00 + 1.0 + r10 + r11) / 4, rtol=1e-5
  )
  assert losses.get("grpo") is losses.grpo
  np.testing.assert_allclose(
      float(
          losses.grpo(
              *(
                  jnp.asarray(x, jnp.float32)
                  for x in (logp, old, ref, mask, adv)
              ),
              clip_eps=eps,
              beta=beta,
          )
      ),
      want_loss,
      rtol=1e-5,
  )


def test_grpo_on_policy_gradient_is_the_advantage_weighted_score():
  # At logp == old_logp the clipped objective's gradient w.r.t. logp is
  # -A / n_tokens per response token (and KL's gradient is 0 at logp == ref).
  logp = jnp.array([[-0.7, -1.2, -3.0], [-0.2, -0.9, -3.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
  adv = jnp.array([0.5, -1.5])
  grad = jax.grad(lambda lp: losses.grpo(lp, logp, lp, mask, adv))(logp)
  want = -np.array([[0.5, 0.5, 0.0], [-1.5, 0.0, 0.0]]) / 3
  np.testing.assert_allclose(np.asarray(grad), want, atol=1e-6)


def test_token_logprobs_by_hand():
  logits = jnp.array([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]]])
  tokens = jnp.array([[0, 1, 0]])
  got = np.asarray(losses.token_logprobs(logits, tokens))
  # p(1 | pos 0) = 3/4, p(0 | pos 1) = 2/3
  np.testing.assert_allclose(
      got, [[math.log(0.75), math.log(2 / 3)]], rtol=1e-6
  )
