"""Model-written analyses for stage 1's reasoning queries.

Stage 1 teaches the query format stage 2 samples: the reasoning prompt, a
short analysis, then "The embedding is <|embed_token|>." Where the training
data has no analyses of its own (a triples file's `reasoning` field), the
starting model writes them before the first step:

1. a seeded share of the run's training queries (chosen by a checksum of
   the query text, so the choice does not depend on the order or the
   resume) is given the reasoning prompt and the model samples an analysis;
2. the analysis is cut where the model began the embed suffix itself and
   tidied (`clean`);
3. the rejection filter keeps an analysis only where it does not hurt
   retrieval: among the documents (positives and hard negatives) of a
   batch's worth of chosen examples (`filter_group`), the embedding taken
   after the analysis ranks the example's positive at least as high as the
   plain query's embedding does (both by the starting model).

Everything is written to `analyses.jsonl` in the workdir with the model and
prompt that made it; a run that finds a file made the same way reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Optional, Sequence
import zlib

import jax
import numpy as np

from search_r3_jax.core import distributed
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.core.prompts import EMBED_TOKEN

FILE = "analyses.jsonl"


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """How the analyses are made.

  Attributes:
    share: the share of training queries given an analysis (0 turns
      reasoning queries off, unless the data carries its own).
    max_new_tokens: the analysis budget (below stage 2's and the
      evaluation's 48, so that an analysis and the suffix fit in theirs).
    temperature: sampling temperature (0: greedy).
    seed: sampling seed.
    filter: apply the rejection filter.
    filter_group: the filter ranks a positive among the documents of this
      many chosen examples (a stage-1 batch's worth).
    batch_size: rows per generation batch.
  """

  share: float = 0.5
  max_new_tokens: int = 40
  temperature: float = 0.7
  seed: int = 0
  filter: bool = True
  filter_group: int = 8
  batch_size: int = 16

  def __post_init__(self):
    if not 0.0 <= self.share <= 1.0:
      raise ValueError(f"reasoning.share must be in [0, 1], got {self.share}")
    if self.max_new_tokens < 1:
      raise ValueError(
          f"reasoning.max_new_tokens must be >= 1, got {self.max_new_tokens}"
      )


def wants_reasoning(query: str, share: float) -> bool:
  """Whether `query` is among the `share` given an analysis: a checksum of
  its text, the same on every run and resume."""
  return (zlib.crc32(query.encode("utf-8")) % 10_000) < share * 10_000


def clean(text: str, embed_suffix: str, finished: bool = True) -> str:
  """The analysis proper: cut where the model began the embed suffix
  itself (its words before `<|embed_token|>`), the token removed, white
  space collapsed. An analysis the token budget cut off (`finished` False)
  ends at its last full sentence, so that training never teaches the model
  to run to the budget before the suffix (one with no full sentence is
  dropped)."""
  lead = embed_suffix.split(EMBED_TOKEN)[0].strip()
  if lead:
    cut = text.lower().find(lead.lower())
    if cut >= 0:
      text, finished = text[:cut], True
  text = re.sub(r"\s+", " ", text.replace(EMBED_TOKEN, " ")).strip()
  if not finished:
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    text = text[: ends[-1]] if ends else ""
  return text


def positive_ranks(
    queries: np.ndarray, docs: np.ndarray, positives: Sequence[int]
) -> np.ndarray:
  """1-based rank of each query's positive among all `docs` by cosine (ties
  count against the positive)."""
  q, d = l2_normalize(np.asarray(queries)), l2_normalize(np.asarray(docs))
  scores = q @ d.T
  own = scores[np.arange(len(q)), np.asarray(positives)]
  return (scores >= own[:, None]).sum(-1)


def rejection_filter(
    plain: np.ndarray,
    reasoned: np.ndarray,
    docs: np.ndarray,
    positives: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Keeps an analysis where the embedding after it ranks the positive at
  least as high as the plain query's: (keep [n] bool, rank plain, rank
  after the analysis)."""
  rank_plain = positive_ranks(plain, docs, positives)
  rank_reasoned = positive_ranks(reasoned, docs, positives)
  return rank_reasoned <= rank_plain, rank_plain, rank_reasoned


def _header(cfg: AnalysisConfig, model: str, prompts) -> dict:
  return dict(
      kind="header",
      model=model,
      reasoning_system=prompts.reasoning_system,
      embed_suffix=prompts.embed_suffix,
      **dataclasses.asdict(cfg),
  )


def read(path: str) -> tuple[dict, list[dict]]:
  """(header, rows) of an analyses file."""
  with open(path, encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  if not lines or lines[0].get("kind") != "header":
    raise ValueError(f"{path}: no header line; delete the file to remake it")
  return lines[0], lines[1:]


def make(
    policy,
    examples: Sequence[Mapping],
    cfg: AnalysisConfig,
    *,
    model: str,
    doc_len: int,
    query_len: int,
    say=print,
) -> list[dict]:
  """Writes the analyses of the chosen examples with `policy` (the starting
  model) and filters them.

  Args:
    examples: the run's training examples ({query, positive, negatives});
      duplicates of a query are made once.
    model: what `policy` is (written to the file's header).
    doc_len, query_len: the stage-1 rows' token limits (the filter embeds
      documents and queries as training will).
  Returns:
    one row per chosen query: {query, analysis, kept, rank_plain,
    rank_reasoning} (ranks 0 where the filter is off).
  """
  tok, prompts = policy.tokenizer, policy.prompts
  chosen, seen = [], set()
  for ex in examples:
    q = ex["query"]
    if q in seen or not wants_reasoning(q, cfg.share):
      continue
    seen.add(q)
    chosen.append(ex)
  if not chosen:
    return []
  say(
      f"writing analyses of {len(chosen)} training queries with {model} "
      f"(at most {cfg.max_new_tokens} tokens, temperature {cfg.temperature})"
  )
  prompt_rows = [
      tok.embedding_prompt(
          prompts, "query", ex["query"], reasoning=True, max_text_tokens=64
      )
      for ex in chosen
  ]
  stop = tuple(tok.eos_ids) + (tok.embed_token_id,)
  texts, finished = [], []
  for s in range(0, len(chosen), cfg.batch_size):
    gen = policy.generate_ids(
        prompt_rows[s : s + cfg.batch_size],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed + s,
        stop_ids=stop,
    )
    for row, n, stopped in zip(gen.tokens, gen.lengths, gen.stopped):
      texts.append(tok.decode([int(x) for x in row[:n]]))
      finished.append(bool(stopped))
  analyses = [
      clean(t, prompts.embed_suffix, f) for t, f in zip(texts, finished)
  ]
  rows = [
      dict(
          query=ex["query"],
          analysis=a,
          kept=bool(a),
          rank_plain=0,
          rank_reasoning=0,
      )
      for ex, a in zip(chosen, analyses)
  ]
  if not cfg.filter:
    return rows
  # The filter: the positive's rank among the documents of a group of
  # `filter_group` chosen examples (as in a stage-1 batch: the positives
  # and hard negatives), embedded as stage 1 embeds them.
  plain = policy.encode_queries(
      [ex["query"] for ex in chosen], progress=False, max_length=query_len
  )
  with_analysis = []
  for ex, a in zip(chosen, analyses):
    ids, _, pos = tok.reasoning_example(
        prompts, ex["query"], a or ".", max_text_tokens=64
    )
    with_analysis.append(ids[: pos + 1])
  reasoned = policy.embed_ids(with_analysis, cfg.batch_size)
  keep, r_plain, r_reasoned = [], [], []
  for g in range(0, len(chosen), cfg.filter_group):
    group = chosen[g : g + cfg.filter_group]
    docs, index = [], {}
    for ex in group:
      for d in [ex["positive"], *ex.get("negatives", ())]:
        if d not in index:
          index[d] = len(docs)
          docs.append(d)
    doc_emb = policy.encode_documents(docs, max_length=doc_len, progress=False)
    k, a, b = rejection_filter(
        plain[g : g + len(group)],
        reasoned[g : g + len(group)],
        doc_emb,
        [index[ex["positive"]] for ex in group],
    )
    keep += list(k)
    r_plain += list(a)
    r_reasoned += list(b)
  for row, k, a, b in zip(rows, keep, r_plain, r_reasoned):
    row.update(
        kept=bool(k) and bool(row["analysis"]),
        rank_plain=int(a),
        rank_reasoning=int(b),
    )
  return rows


def load_or_make(
    workdir: Optional[str],
    policy,
    examples: Sequence[Mapping],
    cfg: AnalysisConfig,
    *,
    model: str,
    doc_len: int,
    query_len: int,
    filename: str = FILE,
    say=print,
) -> tuple[dict[str, str], dict]:
  """The kept analyses by query, and a summary ({made, kept, share_kept}).

  A workdir file made by the same model, prompt and settings is reused;
  otherwise the analyses are made now (the caller passes the starting
  model) and written atomically.
  """
  path = os.path.join(workdir, filename) if workdir else None
  header = _header(cfg, model, policy.prompts)
  rows = None
  if path and jax.process_index() == 0 and os.path.exists(path):
    old, old_rows = read(path)
    if old == header:
      rows = old_rows
      say(f"reusing {len(rows)} analyses from {path}")
    else:
      changed = sorted(k for k in header if old.get(k) != header[k])
      say(f"{path} was made with other settings ({changed}); remaking it")
  # A pod reuses or remakes as process 0 found, with its rows.
  rows = distributed.broadcast(rows)
  if rows is None:
    rows = make(
        policy,
        examples,
        cfg,
        model=model,
        doc_len=doc_len,
        query_len=query_len,
        say=say,
    )
    if path and jax.process_index() == 0:
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(tmp, path)
  kept = {r["query"]: r["analysis"] for r in rows if r["kept"]}
  summary = dict(
      made=len(rows),
      kept=len(kept),
      share_kept=len(kept) / len(rows) if rows else 0.0,
  )
  return kept, summary
