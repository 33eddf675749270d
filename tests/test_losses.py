"""Each registered loss against a hand computation in plain numpy."""

import math

import numpy as np
import pytest

from search_r3_jax import losses

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
            q_logits[b, t - 1])
        total += sum(math.exp(a) * (a - c) for a, c in zip(lp, lq))
        n += 1
  got = float(losses.get("kl")(p_logits, q_logits, mask))
  assert got == pytest.approx(total / n, rel=1e-5)
  assert float(losses.get("kl")(p_logits, p_logits, mask)) == pytest.approx(
      0.0, abs=1e-6)


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
    cands = [j for j in range(4)
             if j == target or groups.reshape(4)[j] != groups[i, 0]]
    scores = [float(qn[i] @ flat[j]) / tau for j in cands]
    total -= _log_softmax(scores)[cands.index(target)]
  got = float(losses.get("infonce")(q, d, tau=tau, doc_groups=groups))
  assert got == pytest.approx(total / 2, rel=1e-4)
