"""Stage-2 (GRPO) rewards as small pure numpy functions, registered by name.

A rollout is one sampled reasoning trace for a query. If it ends with
`<|embed_token|>`, its final hidden state there is the query embedding; the
environment searches the corpus index with it and returns the top-K document
ids. `RewardInputs` holds a batch of such rollouts, and each registered reward
maps it to one float32 value per rollout:

- "dcg_rank": 1/log2(1 + rank) of the best-ranked gold document within the
  top k retrieved (rank 1 -> 1.0, rank 3 -> 0.5), 0 when none is in the top k.
- "cosine": cosine similarity of the rollout embedding with its gold
  document's stored embedding (the maximum over several gold documents).
- "format": -1 when the rollout produced no embed token, else 0.

The first two are 0 for a rollout without an embed token. `combined` sums
named rewards with weights; `DEFAULT_WEIGHTS` gives

  1/log2(1 + rank) within the top 10 + 0.1 * cos(q, d+), and -1 without an
  embed token.

These defaults are this project's choice (PAPER.md, "Defaults this project
chose"): the paper only says the reward is a "DCG-scaled" rank plus the
continuous similarity score, without giving K, the weight of the similarity
or the penalty for a missing embed token.

Every function checks its inputs with `RewardInputs.validate` first, so a
malformed batch fails loudly instead of silently scoring rows as 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.training.registry import Registry

REWARDS = Registry("reward")
register = REWARDS.register
get = REWARDS.get

DEFAULT_WEIGHTS: dict[str, float] = {
    "dcg_rank": 1.0,
    "cosine": 0.1,
    "format": 1.0,
}


@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """One batch of B rollouts, everything a reward needs.

  Attributes:
    retrieved: B ranked lists of document ids (str), best first: the index's
      top-K for each rollout's embedding. A list may be shorter than K or
      empty (e.g. for a rollout without an embed token).
    gold: B collections of gold document ids (str), at least one per row.
    query_emb: [B, D] float, the rollout embeddings. Rows whose `has_embed`
      is False may hold anything (zeros, NaN); they are never read.
    gold_emb: B float arrays [g_i, D], the stored embeddings of row i's gold
      documents in the order of `gold[i]` (g_i == len(gold[i])). A single
      [B, D] array means one gold document per row.
    has_embed: [B] bool, whether the rollout produced `<|embed_token|>`.
  """

  retrieved: Sequence[Sequence[str]]
  gold: Sequence[Collection[str]]
  query_emb: Any
  gold_emb: Any
  has_embed: Any

  @property
  def batch_size(self) -> int:
    return len(self.retrieved)

  def validate(self) -> None:
    """Raises ValueError naming the field (and row) of any inconsistency.

    Checks: every field has B rows; ids are strings and no gold set is empty;
    `query_emb` is [B, D] and each `gold_emb[i]` is [len(gold[i]), D] with
    the same D; `has_embed` is boolean; no NaN/inf in `gold_emb` or in the
    `query_emb` rows whose `has_embed` is True.
    """
    if isinstance(self.retrieved, (str, bytes)):
      raise ValueError(
          "RewardInputs.retrieved must be a sequence of B id "
          "lists, got a string"
      )
    b = len(self.retrieved)
    for name in ("gold", "gold_emb", "has_embed", "query_emb"):
      value = getattr(self, name)
      try:
        n = None if isinstance(value, (str, bytes)) else len(value)
      except TypeError:  # a scalar or a 0-d array
        n = None
      if n is None:
        raise ValueError(
            f"RewardInputs.{name} must have B = {b} rows "
            f"(len(retrieved)), got {type(value).__name__}"
        )
      if n != b:
        raise ValueError(
            f"RewardInputs.{name} has {n} rows, but " f"retrieved has {b}"
        )

    for field, rows in (("retrieved", self.retrieved), ("gold", self.gold)):
      for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)):
          raise ValueError(
              f"RewardInputs.{field}[{i}] is a bare string "
              f"{row!r}; wrap it in a list"
          )
        for doc in row:
          if not isinstance(doc, str):
            raise ValueError(
                f"RewardInputs.{field}[{i}] holds a "
                f"{type(doc).__name__} id {doc!r}; ids are str"
            )
    for i, row in enumerate(self.gold):
      if len(row) == 0:
        raise ValueError(
            f"RewardInputs.gold[{i}] is empty; every row needs "
            "at least one gold document"
        )

    has_embed = np.asarray(self.has_embed)
    if has_embed.shape != (b,):
      raise ValueError(
          f"RewardInputs.has_embed must have shape ({b},), got "
          f"{has_embed.shape}"
      )
    if has_embed.dtype != np.bool_ and not (
        np.issubdtype(has_embed.dtype, np.integer)
        and np.all((has_embed == 0) | (has_embed == 1))
    ):
      raise ValueError(
          "RewardInputs.has_embed must be boolean (or 0/1), got "
          f"{has_embed.dtype} values {has_embed.tolist()}"
      )
    has_embed = has_embed.astype(bool)

    query = _float_array(self.query_emb, "query_emb")
    if query.ndim != 2 or query.shape[0] != b or query.shape[1] == 0:
      raise ValueError(
          f"RewardInputs.query_emb must have shape ({b}, D) "
          f"with D >= 1, got {query.shape}"
      )
    d = query.shape[1]
    for i in range(b):
      if has_embed[i] and not np.all(np.isfinite(query[i])):
        raise ValueError(
            f"RewardInputs.query_emb[{i}] holds NaN or inf but "
            "has_embed is True for that row"
        )

    for i in range(b):
      emb = _gold_rows(self.gold_emb[i], i)
      if emb.shape[1] != d:
        raise ValueError(
            f"RewardInputs.gold_emb[{i}] has dimension "
            f"{emb.shape[1]}, but query_emb has D = {d}"
        )
      if emb.shape[0] != len(self.gold[i]):
        raise ValueError(
            f"RewardInputs.gold_emb[{i}] has {emb.shape[0]} "
            f"embeddings for {len(self.gold[i])} gold ids "
            f"(gold[{i}])"
        )
      if not np.all(np.isfinite(emb)):
        raise ValueError(f"RewardInputs.gold_emb[{i}] holds NaN or inf")


def _float_array(x, field: str) -> np.ndarray:
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"RewardInputs.{field} is not a numeric array: {e}"
    ) from None
  return arr


def _gold_rows(x, i: int) -> np.ndarray:
  """Row i of `gold_emb` as [g_i, D] float64 (a 1-D row is one document)."""
  emb = _float_array(x, f"gold_emb[{i}]")
  if emb.ndim == 1:
    emb = emb[None, :]
  if emb.ndim != 2:
    raise ValueError(
        f"RewardInputs.gold_emb[{i}] must be [g, D] or [D], got "
        f"shape {emb.shape}"
    )
  return emb


def _check_k(k: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  return int(k)


def _has_embed(inputs: RewardInputs) -> np.ndarray:
  return np.asarray(inputs.has_embed).astype(bool)


@register("dcg_rank")
def dcg_rank(inputs: RewardInputs, *, k: int = 10) -> np.ndarray:
  """1/log2(1 + rank) of the best-ranked gold document within the top k.

  rank is 1-based (rank 1 -> 1.0, rank 3 -> 0.5). 0 when no gold document
  is among the first k retrieved ids, and 0 for rows without an embed token.

  Args:
    inputs: the batch.
    k: how many retrieved ids count.

  Returns:
    [B] float32.
  """
  inputs.validate()
  k = _check_k(k)
  has_embed = _has_embed(inputs)
  out = np.zeros((inputs.batch_size,), np.float64)
  for i, (ranked, gold) in enumerate(zip(inputs.retrieved, inputs.gold)):
    if not has_embed[i]:
      continue
    gold = set(gold)
    for rank, doc in enumerate(list(ranked)[:k], start=1):
      if doc in gold:
        out[i] = 1.0 / math.log2(1 + rank)
        break
  return out.astype(np.float32)


@register("cosine")
def cosine(inputs: RewardInputs, *, k: int = 10) -> np.ndarray:
  """cos(query_emb, gold_emb), the maximum over a row's gold documents.

  True cosine: both sides are normalised here (a zero vector gives 0).
  0 for rows without an embed token.

  Args:
    inputs: the batch.
    k: unused (shared signature).

  Returns:
    [B] float32.
  """
  del k
  inputs.validate()
  has_embed = _has_embed(inputs)
  query = _float_array(inputs.query_emb, "query_emb")
  out = np.zeros((inputs.batch_size,), np.float64)
  for i in range(inputs.batch_size):
    if not has_embed[i]:
      continue
    q = l2_normalize(query[i])
    docs = l2_normalize(_gold_rows(inputs.gold_emb[i], i))
    out[i] = np.max(docs @ q)
  return out.astype(np.float32)


@register("format")
def format_penalty(inputs: RewardInputs, *, k: int = 10) -> np.ndarray:
  """-1.0 for rows without an embed token, else 0.0.

  Args:
    inputs: the batch.
    k: unused (shared signature).

  Returns:
    [B] float32.
  """
  del k
  inputs.validate()
  return np.where(_has_embed(inputs), 0.0, -1.0).astype(np.float32)


def combined(
    inputs: RewardInputs,
    weights: Mapping[str, float] | None = None,
    *,
    k: int = 10,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Weighted sum of named rewards.

  Args:
    inputs: the batch.
    weights: reward name -> weight; `DEFAULT_WEIGHTS` when None. Every name
      must be registered (KeyError listing the known ones otherwise) and
      every weight a finite number.
    k: passed to every reward.

  Returns:
    (total [B] float32, {name: that reward's unweighted [B] float32 values})
    — the second for logging.
  """
  weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
  unknown = sorted(set(weights) - set(REWARDS))
  if unknown:
    raise KeyError(
        f"unknown reward(s) {unknown} in weights; registered: "
        f"{REWARDS.names()}"
    )
  for name, w in weights.items():
    if (
        isinstance(w, bool)
        or not isinstance(w, (int, float, np.number))
        or not math.isfinite(w)
    ):
      raise ValueError(
          f"weight for reward {name!r} must be a finite number, " f"got {w!r}"
      )
  inputs.validate()
  _check_k(k)
  total = np.zeros((inputs.batch_size,), np.float64)
  terms: dict[str, np.ndarray] = {}
  for name, w in weights.items():
    values = get(name)(inputs, k=k)
    terms[name] = values
    total += float(w) * values.astype(np.float64)
  return total.astype(np.float32), terms
