"""What the stage-1 program needs from the data: a resumable stream of
training examples and the evaluation corpus with its query splits.

`data_cfg.name` picks the source:
  * "wiki_fanout": the embedded default (train pairs from the corpus; dev
    splits `dev_sub`, `dev_top` for evaluation);
  * "triples": a training-triples JSONL at `data_cfg.path` (training only);
  * "beir": a BEIR-layout folder at `data_cfg.path` (evaluation splits; for
    training, mine triples into a JSONL first and use "triples").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from search_r3_jax.data.beir import beir_builder
from search_r3_jax.data.loader import Loader
from search_r3_jax.data.triples import triples_builder
from search_r3_jax.data.wiki_fanout import wiki_fanout_builder

TRAIN_FIELDS = ("query", "positive", "negatives")


@dataclasses.dataclass
class EvalSplit:
  """One evaluation split: its queries and their relevance judgements."""

  queries: dict[str, str]  # query id -> text
  qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def builder_for(data_cfg):
  name = data_cfg.name
  if name == "wiki_fanout":
    return wiki_fanout_builder(
        data_dir=data_cfg.data_dir, num_negatives=data_cfg.num_negatives
    )
  if name in ("beir", "triples"):
    if not data_cfg.path:
      raise ValueError(f"data.name={name!r} needs data.path")
    make = beir_builder if name == "beir" else triples_builder
    return make(data_cfg.path, data_dir=data_cfg.data_dir)
  raise ValueError(
      f"unknown data.name {name!r}; known: wiki_fanout, " "triples, beir"
  )


class ExampleStream:
  """Batches of training examples as lists of dicts, with a saved position.

  Attributes:
    loader: the underlying `Loader` (per-process shard, reshuffled per epoch).
  """

  def __init__(self, loader: Loader):
    self.loader = loader
    self._it = None

  def next_batch(self) -> list[dict[str, Any]]:
    if self._it is None:
      self._it = iter(self.loader)
    batch = next(self._it)
    keys = list(batch)
    return [dict(zip(keys, row)) for row in zip(*batch.values())]

  def get_state(self) -> dict:
    return self.loader.get_state()

  def set_state(self, state: dict) -> None:
    self.loader.set_state(state)
    self._it = None


def train_loader(data_cfg, batch_size: int, seed: int) -> ExampleStream:
  if data_cfg.name == "beir":
    raise ValueError(
        "a BEIR folder has no training triples: mine them into "
        "a JSONL and use data.name='triples' for training"
    )
  builder = builder_for(data_cfg)
  fields = [
      f for f in TRAIN_FIELDS + ("positive_id",) if f in builder.info.features
  ]
  loader = Loader.from_builder(
      builder, data_cfg.split, batch_size, seed=seed, fields=fields
  )
  return ExampleStream(loader)


def _document_text(record: dict) -> str:
  title, text = record.get("title") or "", record["text"]
  return f"{title}\n{text}" if title and not text.startswith(title) else text


def eval_data(
    data_cfg, splits: tuple[str, ...], data_dir: Optional[str] = None
):
  """The corpus {doc id: text} and {split: EvalSplit} for evaluation."""
  if data_cfg.name == "triples":
    raise ValueError(
        "a triples file has no evaluation queries; evaluate on "
        "wiki_fanout or a BEIR folder"
    )
  del data_dir
  builder = builder_for(data_cfg)
  corpus = {}
  for rec in builder.as_data_source(split="corpus"):
    rec = _to_str(rec)
    corpus[rec["doc_id"]] = _document_text(rec)
  out = {}
  for split in splits:
    if split not in builder.info.splits:
      raise ValueError(
          f"{builder.name} has no split {split!r}; it has "
          f"{sorted(builder.info.splits)}"
      )
    queries, qrels = {}, {}
    for rec in builder.as_data_source(split=split):
      rec = _to_str(rec)
      qid = rec["query_id"]
      # FanOutQA reuses a sub-question's id under every top-level question
      # that asks it; each occurrence is evaluated, under its own key.
      n = 1
      while qid in queries:
        qid, n = f"{rec['query_id']}#{n}", n + 1
      queries[qid] = rec["query"]
      qrels[qid] = {d: int(s) for d, s in zip(rec["doc_ids"], rec["scores"])}
    out[split] = EvalSplit(queries, qrels)
  return corpus, out


def _to_str(rec: dict) -> dict:
  from search_r3_jax.data.common import to_python

  return to_python(rec)
