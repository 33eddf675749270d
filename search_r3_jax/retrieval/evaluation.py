"""Retrieval evaluation: encode a corpus, search it (exactly, or with the
ScaNN engine), score with trec_eval semantics (nDCG@10, Recall@10,
Recall@100), for the model and for BM25.

On CPU the corpus may be a documented subset: every relevant document of the
evaluated queries plus distractors sampled with a fixed seed, up to
`corpus_size` documents (0 keeps the full corpus). Documents are cut to
`doc_len` tokens for the model; BM25 sees the same documents uncut.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from search_r3_jax.core.ops import exact_top_k
from search_r3_jax.data import sources as data_sources
from search_r3_jax.data.sources import EvalSplit
from search_r3_jax.retrieval import metrics as metrics_lib

METRICS = ("ndcg@10", "recall@10", "recall@100")
ENGINES = ("exact", "scann")
RUN_DEPTH = 100  # the ranked documents kept per query (Recall@100's depth)
SAMPLE_HITS = 10  # the top hits a per-query sample lists


def subset(
    corpus: Mapping[str, str],
    splits: Mapping[str, EvalSplit],
    corpus_size: int,
    max_queries: int,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, EvalSplit]]:
  """Cuts queries to `max_queries` per split (0: all) and the corpus to the
  relevant documents plus sampled distractors (`corpus_size`, 0: all)."""
  rng = np.random.default_rng(seed)
  kept = {}
  for name, sp in splits.items():
    qids = sorted(sp.queries)
    if max_queries and len(qids) > max_queries:
      qids = sorted(rng.choice(qids, max_queries, replace=False).tolist())
    kept[name] = EvalSplit(
        {q: sp.queries[q] for q in qids},
        {q: dict(sp.qrels.get(q, {})) for q in qids},
    )
  if not corpus_size or corpus_size >= len(corpus):
    return dict(corpus), kept
  gold = sorted(
      {
          d
          for sp in kept.values()
          for rel in sp.qrels.values()
          for d in rel
          if d in corpus
      }
  )
  rest = sorted(set(corpus) - set(gold))
  n = max(corpus_size - len(gold), 0)
  extra = rng.choice(rest, min(n, len(rest)), replace=False).tolist()
  ids = sorted(gold + extra)
  return {d: corpus[d] for d in ids}, kept


def sample_corpus(
    corpus: Mapping[str, str], size: int, seed: int
) -> dict[str, str]:
  """A seeded sample of `size` documents (0 or more than there are: all of
  them), drawn from the document ids alone: no question chooses it."""
  ids = sorted(corpus)
  if size and size < len(ids):
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(ids, size, replace=False).tolist())
  return {d: corpus[d] for d in ids}


def flat_figures(
    figures: Mapping[str, Mapping[str, float]], tag: str = ""
) -> dict[str, float]:
  """{split: {metric: v}} -> {"split<tag>/metric": v}, as metrics.jsonl logs
  them (e.g. tag "+reasoning")."""
  return {
      f"{split}{tag}/{k}": v
      for split, d in figures.items()
      for k, v in d.items()
  }


class Evaluator:
  """Scores a model (anything with encode_queries/encode_documents)."""

  def __init__(
      self,
      corpus: Mapping[str, str],
      splits: Mapping[str, EvalSplit],
      *,
      doc_len: int = 128,
      batch_size: int = 32,
      reasoning: bool = False,
      engine: str = "exact",
      progress: bool = False,
  ):
    if not corpus:
      raise ValueError("evaluation corpus is empty")
    if engine not in ENGINES:
      raise ValueError(f"unknown search engine {engine!r}; known: {ENGINES}")
    self.doc_ids = list(corpus)
    self.doc_texts = [corpus[d] for d in self.doc_ids]
    self.splits = dict(splits)
    self.doc_len = doc_len
    self.batch_size = batch_size
    self.reasoning = reasoning
    self.engine = engine
    self.progress = progress  # progress bars (with ETA) over the batches
    self._index = None  # (docs, VectorIndex) of the ScaNN engine

  @classmethod
  def from_config(
      cls, data_cfg, eval_cfg, full: Optional[tuple] = None, **kwargs
  ) -> "Evaluator":
    """The evaluation a config names; `full` is the (corpus, splits) of
    `data_sources.eval_data` when the caller has read them already."""
    corpus, splits = full or data_sources.eval_data(
        data_cfg, tuple(eval_cfg.splits)
    )
    corpus, splits = subset(
        corpus, splits, eval_cfg.corpus_size, eval_cfg.max_queries
    )
    kwargs.setdefault("engine", eval_cfg.get("engine", "exact"))
    return cls(
        corpus,
        splits,
        doc_len=eval_cfg.doc_len,
        batch_size=eval_cfg.batch_size,
        **kwargs,
    )

  def __call__(self, model) -> dict[str, dict[str, float]]:
    return self.score(model, self.documents(model), reasoning=self.reasoning)

  def flat(
      self,
      model,
      *,
      modes: Sequence[bool] = (False, True),
      max_new_tokens: int = 128,
      samples: Optional[list] = None,
      docs: Optional[np.ndarray] = None,
      runs: Optional[dict] = None,
      sample_plain: bool = False,
  ) -> dict[str, float]:
    """Flat figures of `model` with reasoning off (`split/metric`) and/or on
    (`split+reasoning/metric`, with `emitted`), the documents encoded once.
    `samples`, `runs` and `sample_plain` are `score`'s.
    """
    docs = self.documents(model) if docs is None else docs
    flat = {}
    for reasoning in modes:
      figures = self.score(
          model,
          docs,
          reasoning=reasoning,
          max_new_tokens=max_new_tokens,
          samples=samples,
          runs=runs,
          sample_plain=sample_plain,
      )
      flat.update(flat_figures(figures, "+reasoning" if reasoning else ""))
    return flat

  def documents(self, model) -> np.ndarray:
    """[N, D] embeddings of the corpus documents, in `doc_ids` order."""
    return model.encode_documents(
        self.doc_texts,
        batch_size=self.batch_size,
        max_length=self.doc_len,
        progress=self.progress,
    )

  def score(
      self,
      model,
      docs: np.ndarray,
      *,
      reasoning: bool = False,
      max_new_tokens: int = 128,
      samples: Optional[list] = None,
      runs: Optional[dict] = None,
      sample_plain: bool = False,
  ) -> dict[str, dict[str, float]]:
    """Figures per split for `model`'s queries against `docs`.

    With `reasoning`, queries are encoded after a greedy analysis of at most
    `max_new_tokens`; each split's figures then include `emitted`, the share
    of its queries in which the model wrote `<|embed_token|>` itself (the
    others were embedded after the appended suffix), and the analyses are
    appended to `samples` (when given) as {split, query_id, query,
    reasoning, emitted, gold, top, hits} dicts: `top` the first document,
    `hits` the first `SAMPLE_HITS` as [id, score]. With `sample_plain` the
    queries without reasoning are sampled too (`reasoning` "" and `emitted`
    None). `runs` (when given) receives each split's ranking, {query id:
    {doc id: score}} of the top `RUN_DEPTH`, under ("reasoning on" or
    "reasoning off", split).
    """
    out = {}
    for name, sp in self.splits.items():
      qids = list(sp.queries)
      texts = [sp.queries[i] for i in qids]
      q, details = model.encode_queries(
          texts,
          reasoning=reasoning,
          max_new_tokens=max_new_tokens,
          batch_size=self.batch_size,
          progress=self.progress,
          return_details=True,
      )
      scores, idx = self.search(q, docs, min(RUN_DEPTH, len(self.doc_ids)))
      run = metrics_lib.run_from_topk(qids, self.doc_ids, scores, idx)
      out[name] = metrics_lib.evaluate(sp.qrels, run, METRICS)
      if runs is not None:
        runs[("reasoning on" if reasoning else "reasoning off", name)] = run
      if reasoning:
        out[name]["emitted"] = float(np.mean([d.emitted for d in details]))
      if samples is not None and (reasoning or sample_plain):
        for i, qid in enumerate(qids):
          hits = [
              [self.doc_ids[int(j)], float(v)]
              for v, j in zip(scores[i, :SAMPLE_HITS], idx[i, :SAMPLE_HITS])
              if j >= 0
          ]
          samples.append(
              dict(
                  split=name,
                  query_id=qid,
                  query=texts[i],
                  reasoning=details[i].analysis if reasoning else "",
                  emitted=details[i].emitted if reasoning else None,
                  gold=sorted(sp.qrels.get(qid, {})),
                  top=hits[0][0],
                  hits=hits,
              )
          )
    return out

  def search(
      self, q: np.ndarray, docs: np.ndarray, k: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` scores and document rows of queries `q` among `docs`, by the
    evaluator's engine: exact inner products, or a ScaNN index built over
    `docs` (once per array)."""
    if self.engine == "exact":
      scores, idx = exact_top_k(q, docs, k)
      return np.asarray(scores), np.asarray(idx)
    from search_r3_jax.retrieval.index import VectorIndex

    if self._index is None or self._index[0] is not docs:
      self._index = (
          docs,
          VectorIndex.build(self.doc_ids, docs, engine="scann", k=k),
      )
    found = self._index[1].search(np.asarray(q, np.float32), k)
    return found.scores, found.rows

  def bm25(
      self,
      k1: Optional[float] = None,
      b: Optional[float] = None,
      runs: Optional[dict] = None,
  ) -> dict[str, dict[str, float]]:
    """The same figures for BM25 over the same documents (`runs`, when
    given, receives its rankings under ("BM25", split))."""
    from search_r3_jax.data.bm25 import BM25

    kw = {k: v for k, v in (("k1", k1), ("b", b)) if v is not None}
    index = BM25(self.doc_texts, **kw)
    out = {}
    for name, sp in self.splits.items():
      qids = list(sp.queries)
      scores = index.scores([sp.queries[i] for i in qids])
      k = min(RUN_DEPTH, scores.shape[1])
      idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
      top = np.take_along_axis(scores, idx, 1)
      run = metrics_lib.run_from_topk(qids, self.doc_ids, top, idx)
      out[name] = metrics_lib.evaluate(sp.qrels, run, METRICS)
      if runs is not None:
        runs[("BM25", name)] = run
    return out
