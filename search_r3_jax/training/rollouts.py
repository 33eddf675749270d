"""Stage-2 rollouts: G samples of reasoning + `<|embed_token|>` per query,
and the GRPO batch built from them.

`sample` runs the jitted sampler once over all Q * G rows (each query's
reasoning prompt repeated G times), stopping a row at an end-of-turn/eos id
or at `<|embed_token|>`, and takes the embedding of each row that emitted the
token from inside the generation loop (`capture_stop_hidden`). A row that
never emits it (it ended its turn or ran out of `max_new_tokens`) has no
embedding: its rewards are the format penalty alone.

`grpo_batch` lays the rollouts out for `grpo.make_grpo_step`: prompt +
sampled response, and where the rollout did not emit the token, a suffix
ending with it (by default the bare token; the train program appends the
prompts' " The embedding is <|embed_token|>", as `SearchR3.encode_queries`
does), so the update can read a hidden state there. The loss mask covers
the sampled tokens only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.core.tokenizer import reasoning_row
from search_r3_jax.training import advantages as advantages_lib
from search_r3_jax.training import rewards as rewards_lib


@dataclasses.dataclass
class Rollouts:
  """N = Q * G sampled rollouts, grouped by query (rows i*G .. i*G+G-1).

  Attributes:
    query_index: [N] the query of each row.
    prompts: N prompt id lists.
    responses: N sampled id lists (the stop token included when sampled).
    has_embed: [N] bool, the rollout emitted `<|embed_token|>`.
    embeddings: [N, D] float32 unit rows (zeros where `has_embed` is False).
    texts: N decoded responses.
    logprobs: N lists, the sampler's log-probability of each response token
      (None when the rollouts were not sampled here).
  """

  query_index: np.ndarray
  prompts: list[list[int]]
  responses: list[list[int]]
  has_embed: np.ndarray
  embeddings: np.ndarray
  texts: list[str]
  logprobs: Optional[list[list[float]]] = None
  # Where these rows' queries start among the step's queries: 0, unless
  # they are one process's share (`sample(..., local=True)`), whose
  # `query_index` counts from its own first query.
  first_query: int = 0

  @property
  def size(self) -> int:
    return len(self.responses)

  def response_lengths(self) -> np.ndarray:
    return np.asarray([len(r) for r in self.responses], np.int32)


def sample(
    policy,
    queries: Sequence[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_query_tokens: int = 128,
    local: bool = False,
) -> Rollouts:
  """`group_size` reasoning rollouts per query from `policy` (a
  `core.policy.Policy`, or anything with its `tokenizer`, `prompts` and
  `generate_ids`).

  With `local` (a collective: every process gives the same queries), each
  process keeps only the rollouts its own devices sampled
  (`Policy.generate_ids_local`): whole groups of its share of the queries,
  from `first_query` on. They are the rows the whole sample would hold
  there, drawn with the same randomness.

  Raises:
    ValueError: with `local`, a process's rows split a group (a batch
      sharding whose blocks are not whole groups).
  """
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if not queries:
    raise ValueError("sample: no queries")
  tok = policy.tokenizer
  base = [
      tok.embedding_prompt(
          policy.prompts,
          "query",
          q,
          reasoning=True,
          max_text_tokens=max_query_tokens,
      )
      for q in queries
  ]
  prompts = [list(p) for p in base for _ in range(group_size)]
  stop = tuple(tok.eos_ids) + (tok.embed_token_id,)
  kwargs = dict(
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      seed=seed,
      stop_ids=stop,
      capture_stop_hidden=True,
  )
  if local:
    gen, rows = policy.generate_ids_local(prompts, **kwargs)
    if rows.start % group_size or rows.stop % group_size:
      raise ValueError(
          f"this process sampled rollouts {rows.start}..{rows.stop - 1} of "
          f"{len(prompts)}, which splits a group of {group_size}: make the "
          "rollouts per process (queries_per_step * group_size / processes) "
          "a multiple of group_size"
      )
  else:
    gen = policy.generate_ids(prompts, **kwargs)
    rows = slice(0, len(prompts))
  responses, has_embed, logprobs = [], [], []
  for row, lp, n, stopped in zip(
      gen.tokens, gen.logprobs, gen.lengths, gen.stopped
  ):
    resp = [int(x) for x in row[:n]]
    responses.append(resp)
    logprobs.append([float(x) for x in lp[:n]])
    has_embed.append(bool(stopped) and resp[-1] == tok.embed_token_id)
  has_embed = np.asarray(has_embed, bool)
  h = np.asarray(gen.stop_hidden, np.float32)
  emb = np.where(has_embed[:, None], l2_normalize(h), 0.0).astype(np.float32)
  texts = [
      tok.decode([x for x in r if x != tok.embed_token_id]) for r in responses
  ]
  return Rollouts(
      np.repeat(np.arange((rows.stop - rows.start) // group_size), group_size),
      prompts[rows],
      responses,
      has_embed,
      emb,
      texts,
      logprobs,
      first_query=rows.start // group_size,
  )


def grpo_batch(
    rollouts: Rollouts,
    *,
    embed_token_id: int,
    pad_id: int,
    seq_len: int,
    suffix: Sequence[int] | None = None,
    end_ids: Sequence[int] = (),
) -> dict[str, np.ndarray]:
  """tokens, targets, lengths, mask and embed_pos of `grpo.BATCH_KEYS` (the
  caller adds old_logp, advantages and docs).

  Each row is `tokenizer.reasoning_row`: the token sequence evaluation
  embeds the same response from. A rollout that ended with an end id
  (`end_ids`) without the embed token loses that id from `tokens` and gets
  `suffix` instead; `targets` keeps the sampled end id at its position, so
  the objective still scores the choice the sampler made there (the logits
  at that position see the same prefix either way). Elsewhere `targets`
  equals `tokens`.

  Args:
    suffix: ids appended (unmasked) to a rollout without the embed token;
      must end with `embed_token_id`. Default: the token alone.
    end_ids: the end-of-turn/eos ids that stop a rollout.

  Raises:
    ValueError: a rollout does not fit in `seq_len` (nothing is cut
      silently).
  """
  suffix = [embed_token_id] if suffix is None else [int(x) for x in suffix]
  if not suffix or suffix[-1] != embed_token_id:
    raise ValueError(
        f"grpo_batch: suffix {suffix} does not end with the "
        f"embed token {embed_token_id}"
    )
  n = rollouts.size
  tokens = np.full((n, seq_len), pad_id, np.int32)
  targets = np.full((n, seq_len), pad_id, np.int32)
  lengths = np.zeros((n,), np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  embed_pos = np.zeros((n,), np.int32)
  for i, (p, r) in enumerate(zip(rollouts.prompts, rollouts.responses)):
    row, _ = reasoning_row(
        p, r, embed_token_id=embed_token_id, end_ids=end_ids, suffix=suffix
    )
    if len(row) > seq_len:
      raise ValueError(
          f"rollout {i} has {len(row)} tokens, more than seq_len {seq_len}"
      )
    tokens[i, : len(row)] = row
    targets[i, : len(row)] = row
    targets[i, len(p) : len(p) + len(r)] = r  # the sampled ids, end ids too
    lengths[i] = len(row)
    mask[i, len(p) : len(p) + len(r)] = 1.0
    embed_pos[i] = len(row) - 1
  return dict(
      tokens=tokens,
      targets=targets,
      lengths=lengths,
      mask=mask,
      embed_pos=embed_pos,
  )


def score(
    env,
    rollouts: Rollouts,
    gold: Sequence[Sequence[str]],
    *,
    group_size: int,
    weights=None,
    k: int = 10,
    eps: float = 1e-6,
    embeddings: np.ndarray | None = None,
    advantage: str = "grpo",
) -> dict:
  """Searches each rollout's embedding in `env` and rewards it.

  Args:
    env: a `RetrievalEnvironment` (its stored, possibly stale, vectors are
      the documents' side of the cosine term).
    gold: per query (not per rollout), its gold document ids.
    group_size: G; rollouts are grouped as `sample` lays them out.
    weights: reward weights (`rewards.DEFAULT_WEIGHTS` when None).
    advantage: the registered advantage estimator (`advantages.py`).
    embeddings: [N, D] unit embeddings of every rollout, those without the
      token included (taken at the suffix `grpo_batch` appends). Given, every
      rollout is searched and earns the rank and cosine rewards, and the
      format penalty still marks the ones that did not emit the token; None
      (the paper's rule) leaves those rollouts the format penalty alone.
  Returns:
    {"reward": [N], "terms": {name: [N]}, "advantages": [N] (the estimator's,
    per group), "retrieved": N id lists (empty without an embed token),
    "best_rank": [N] 1-based rank of the best gold document within the top
    k, 0 when none is there or no embed token was emitted}.
  """
  n = rollouts.size
  if n % group_size:
    raise ValueError(f"{n} rollouts do not split into groups of {group_size}")
  if len(gold) * group_size != n:
    raise ValueError(f"{len(gold)} gold lists for {n // group_size} queries")
  emitted = np.asarray(rollouts.has_embed, bool)
  if embeddings is None:
    searched, emb = emitted, rollouts.embeddings
  else:
    emb = np.asarray(embeddings, np.float32)
    if emb.shape != rollouts.embeddings.shape:
      raise ValueError(
          f"score: embeddings of shape {emb.shape} for "
          f"rollouts of shape {rollouts.embeddings.shape}"
      )
    searched = np.ones((n,), bool)
  retrieved: list[list[str]] = [[] for _ in range(n)]
  rows = np.flatnonzero(searched)
  # A collective environment (each process's own rollouts, `collective`) is
  # searched by every process, with or without rows of its own.
  collective = getattr(env, "collective", False)
  if rows.size or collective:
    hits = env.search(emb[rows], k)
    for r, ids in zip(rows, hits.ids):
      retrieved[r] = ids
  row_gold = [list(gold[q]) for q in rollouts.query_index]
  # One read of the stored vectors of every row's gold documents.
  flat = [d for g in row_gold for d in g]
  stored = (
      env.embeddings(flat)
      if flat or collective
      else np.zeros((0, emb.shape[1]), np.float32)
  )
  ends = np.cumsum([len(g) for g in row_gold])
  inputs = rewards_lib.RewardInputs(
      retrieved=retrieved,
      gold=row_gold,
      query_emb=emb,
      gold_emb=np.split(stored, ends[:-1]) if row_gold else [],
      has_embed=searched,
  )
  weights = dict(rewards_lib.DEFAULT_WEIGHTS if weights is None else weights)
  total, terms = rewards_lib.combined(inputs, weights, k=k)
  if "format" in weights:  # the penalty follows what was actually emitted
    fmt = rewards_lib.get("format")(
        dataclasses.replace(inputs, has_embed=emitted), k=k
    )
    total = (total + float(weights["format"]) * (fmt - terms["format"])).astype(
        np.float32
    )
    terms["format"] = fmt
  best_rank = np.zeros((n,), np.int32)
  for i, (ids, g) in enumerate(zip(retrieved, row_gold)):
    ranks = [j + 1 for j, d in enumerate(ids[:k]) if d in set(g)]
    best_rank[i] = ranks[0] if ranks else 0
  adv = advantages_lib.get(advantage)(
      total.reshape(-1, group_size).astype(np.float64), eps=eps
  )
  return {
      "reward": total,
      "terms": terms,
      "advantages": adv.reshape(-1).astype(np.float32),
      "retrieved": retrieved,
      "best_rank": best_rank,
  }
