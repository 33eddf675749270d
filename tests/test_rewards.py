"""Each registered stage-2 reward against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from search_r3_jax.training import rewards
from search_r3_jax.training.rewards import RewardInputs


def _inputs(retrieved, gold, query_emb=None, gold_emb=None, has_embed=None):
  """A batch with dummy (unit, D = 2) embeddings unless given."""
  b = len(retrieved)
  if query_emb is None:
    query_emb = np.tile([1.0, 0.0], (b, 1))
  if gold_emb is None:
    gold_emb = [np.tile([1.0, 0.0], (len(g), 1)) for g in gold]
  if has_embed is None:
    has_embed = np.ones((b,), bool)
  return RewardInputs(
      retrieved=retrieved,
      gold=gold,
      query_emb=query_emb,
      gold_emb=gold_emb,
      has_embed=has_embed,
  )


def test_registry():
  assert set(rewards.REWARDS) == {"dcg_rank", "cosine", "format"}
  assert rewards.get("cosine") is rewards.cosine
  with pytest.raises(
      KeyError, match=r"unknown reward 'nope'.*cosine.*" r"dcg_rank.*format"
  ):
    rewards.get("nope")
  with pytest.raises(ValueError, match="registered twice"):
    rewards.register("format")(lambda inputs, *, k=10: None)


def test_dcg_rank_hand_values():
  inputs = _inputs(
      retrieved=[
          ["a", "b", "g"],  # gold at rank 3 -> 1/log2(4) = 0.5
          ["g"],  # rank 1 -> 1.0
          [f"x{j}" for j in range(10)] + ["g"],  # rank 11, k = 10 -> 0
          ["a", "g2", "b", "g1"],  # golds at 4 and 2 -> 1/log2(3)
          [],  # nothing retrieved -> 0
          ["a", "b"],  # gold absent -> 0
          ["a", "g"],  # no embed token -> 0 although gold is at rank 2
      ],
      gold=[["g"], ["g"], ["g"], ["g1", "g2"], ["g"], ["g"], ["g"]],
      has_embed=[True, True, True, True, True, True, False],
  )
  got = rewards.get("dcg_rank")(inputs)
  assert got.dtype == np.float32 and got.shape == (7,)
  np.testing.assert_allclose(
      got, [0.5, 1.0, 0.0, 1.0 / math.log2(3), 0.0, 0.0, 0.0], rtol=1e-6
  )
  assert got[0] == 0.5 and got[1] == 1.0


def test_dcg_rank_k():
  inputs = _inputs(retrieved=[["a", "b", "g"]], gold=[{"g"}])
  assert rewards.dcg_rank(inputs, k=2)[0] == 0.0
  assert rewards.dcg_rank(inputs, k=3)[0] == 0.5
  long = _inputs(retrieved=[[f"x{j}" for j in range(10)] + ["g"]], gold=[["g"]])
  assert rewards.dcg_rank(long, k=11)[0] == pytest.approx(
      1.0 / math.log2(12), rel=1e-6
  )
  with pytest.raises(ValueError, match="k must be a positive int"):
    rewards.dcg_rank(inputs, k=0)


def test_cosine_hand_values():
  query = np.array(
      [
          [3.0, 4.0, 0.0],  # norm 5
          [0.0, 2.0, 0.0],
          [1.0, 1.0, 1.0],
          [7.0, 7.0, 7.0],
      ]
  )  # row has no embed token
  gold_emb = [
      np.array([[10.0, 0.0, 0.0]]),  # cos = 3/5
      # two golds: cos = 0 and 2*1/(2*sqrt(2)) = 1/sqrt(2); max is the second
      np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
      np.array([[-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]]),  # -1 and 0 (zero) -> 0
      np.array([[1.0, 1.0, 1.0]]),
  ]
  inputs = _inputs(
      retrieved=[[], [], [], []],
      gold=[["a"], ["b", "c"], ["d", "e"], ["f"]],
      query_emb=query,
      gold_emb=gold_emb,
      has_embed=[True, True, True, False],
  )
  got = rewards.get("cosine")(inputs)
  assert got.dtype == np.float32
  np.testing.assert_allclose(
      got, [0.6, 1.0 / math.sqrt(2.0), 0.0, 0.0], atol=1e-6
  )


def test_cosine_negative_and_single_array_gold_emb():
  # A [B, D] array means one gold per row; negative cosine is kept.
  inputs = _inputs(
      retrieved=[[], []],
      gold=[["a"], ["b"]],
      query_emb=np.array([[2.0, 0.0], [1.0, 2.0]]),
      gold_emb=np.array([[-1.0, 0.0], [2.0, -1.0]]),
  )
  np.testing.assert_allclose(rewards.cosine(inputs), [-1.0, 0.0], atol=1e-6)


def test_cosine_zero_query_is_zero():
  inputs = _inputs(
      retrieved=[[]],
      gold=[["a"]],
      query_emb=np.zeros((1, 2)),
      gold_emb=[np.array([[1.0, 2.0]])],
  )
  got = rewards.cosine(inputs)
  assert np.all(np.isfinite(got)) and got[0] == 0.0


def test_format():
  inputs = _inputs(
      retrieved=[[], [], []],
      gold=[["a"], ["a"], ["a"]],
      has_embed=np.array([True, False, True]),
  )
  got = rewards.get("format")(inputs)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [0.0, -1.0, 0.0])


def test_combined_default_weights():
  assert rewards.DEFAULT_WEIGHTS == {
      "dcg_rank": 1.0,
      "cosine": 0.1,
      "format": 1.0,
  }
  inputs = _inputs(
      retrieved=[["x", "y", "g"], ["g2", "g1"], ["g"]],
      gold=[["g"], ["g1", "g2"], ["g"]],
      # the no-embed row holds NaN: allowed, and never read
      query_emb=np.array([[3.0, 4.0], [1.0, 0.0], [np.nan, np.nan]]),
      gold_emb=[
          np.array([[4.0, 3.0]]),  # cos = 24/25
          np.array([[0.0, 2.0], [-1.0, 0.0]]),  # cos 0 and -1 -> 0
          np.array([[1.0, 0.0]]),
      ],
      has_embed=[True, True, False],
  )
  total, terms = rewards.combined(inputs)
  hand = [0.5 + 0.1 * 24 / 25, 1.0 + 0.1 * 0.0, -1.0]
  np.testing.assert_allclose(total, hand, rtol=1e-6)
  assert total.dtype == np.float32 and total[2] == -1.0
  assert set(terms) == {"dcg_rank", "cosine", "format"}
  np.testing.assert_allclose(terms["dcg_rank"], [0.5, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(terms["cosine"], [0.96, 0.0, 0.0], atol=1e-6)
  np.testing.assert_array_equal(terms["format"], [0.0, 0.0, -1.0])


def test_combined_custom_weights_and_k():
  inputs = _inputs(
      retrieved=[["x", "y", "g"]],
      gold=[["g"]],
      query_emb=np.array([[3.0, 4.0]]),
      gold_emb=[np.array([[4.0, 3.0]])],
  )
  total, terms = rewards.combined(inputs, {"dcg_rank": 2.0, "cosine": 0.5})
  assert set(terms) == {"dcg_rank", "cosine"}
  assert total[0] == pytest.approx(2.0 * 0.5 + 0.5 * 0.96, rel=1e-6)
  total, _ = rewards.combined(inputs, k=2)
  assert total[0] == pytest.approx(0.1 * 0.96, rel=1e-6)


def test_combined_rejects_unknown_name_and_bad_weight():
  inputs = _inputs(retrieved=[["g"]], gold=[["g"]])
  with pytest.raises(KeyError, match=r"'ndcg'.*registered.*cosine.*dcg_rank"):
    rewards.combined(inputs, {"dcg_rank": 1.0, "ndcg": 1.0})
  with pytest.raises(ValueError, match="weight for reward 'cosine'"):
    rewards.combined(inputs, {"cosine": float("nan")})


def _valid_kwargs():
  return dict(
      retrieved=[["a"], ["b"]],
      gold=[["a"], ["b", "c"]],
      query_emb=np.array([[1.0, 0.0], [0.0, 1.0]]),
      gold_emb=[np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 1.0]])],
      has_embed=np.array([True, True]),
  )


def test_validate_accepts_valid_batch():
  RewardInputs(**_valid_kwargs()).validate()  # no error
  total, _ = rewards.combined(RewardInputs(**_valid_kwargs()))
  # both rows: gold at rank 1, max cosine 1 (row 1: 1 and 1/sqrt(2))
  np.testing.assert_allclose(total, [1.1, 1.1], rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("gold", [["a"]], r"gold has 1 rows, but retrieved has 2"),
        ("has_embed", np.array([True, True, True]), r"has_embed has 3 rows"),
        ("query_emb", np.zeros((3, 2)), r"query_emb has 3 rows"),
        ("gold_emb", [np.array([[1.0, 0.0]])], r"gold_emb has 1 rows"),
        ("gold", [["a"], []], r"gold\[1\] is empty"),
        ("gold", [["a"], "b"], r"gold\[1\] is a bare string"),
        ("retrieved", [["a"], [3]], r"retrieved\[1\] holds a int id"),
        (
            "gold_emb",
            [np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 1.0]])],
            r"gold_emb\[0\] has dimension 3, but query_emb has D = 2",
        ),
        (
            "gold_emb",
            [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])],
            r"gold_emb\[1\] has 1 embeddings for 2 gold ids",
        ),
        (
            "gold_emb",
            [np.array([[1.0, 0.0]]), np.array([[0.0, np.nan], [1.0, 1.0]])],
            r"gold_emb\[1\] holds NaN or inf",
        ),
        (
            "query_emb",
            np.array([[1.0, 0.0], [np.inf, 1.0]]),
            r"query_emb\[1\] holds NaN or inf",
        ),
        ("query_emb", np.zeros((2,)), r"query_emb must have shape \(2, D\)"),
        ("has_embed", np.array([0.5, 1.0]), r"has_embed must be boolean"),
    ],
)
def test_validate_errors(field, value, match):
  kwargs = _valid_kwargs()
  kwargs[field] = value
  inputs = RewardInputs(**kwargs)
  with pytest.raises(ValueError, match=match):
    inputs.validate()
  # Every reward and `combined` validate too: nothing is silently scored.
  for name in rewards.REWARDS:
    with pytest.raises(ValueError, match=match):
      rewards.get(name)(inputs)
  with pytest.raises(ValueError, match=match):
    rewards.combined(inputs)


def test_nan_query_allowed_only_without_embed_token():
  kwargs = _valid_kwargs()
  kwargs["query_emb"] = np.array([[1.0, 0.0], [np.nan, np.nan]])
  kwargs["has_embed"] = np.array([True, False])
  total, terms = rewards.combined(RewardInputs(**kwargs))
  np.testing.assert_allclose(total, [1.1, -1.0], rtol=1e-6)
  assert terms["cosine"][1] == 0.0
  kwargs["has_embed"] = np.array([True, True])
  with pytest.raises(ValueError, match=r"query_emb\[1\] holds NaN"):
    rewards.combined(RewardInputs(**kwargs))
