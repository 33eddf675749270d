"""`beir_folder`: any folder in the BEIR layout, as a TFDS dataset.

    folder/corpus.jsonl        {"_id", "title", "text"} per line
    folder/queries.jsonl       {"_id", "text"} per line
    folder/qrels/{train,dev,test}.tsv   query-id <TAB> corpus-id <TAB> score

Splits: `corpus` (doc_id, title, text) in file order, and one split per qrels
file present, named after it, holding each query of that file once with its
judged documents (query_id, query, doc_ids, scores) in order of first
appearance. Queries that no qrels file names are not in any split.

    builder = beir_builder("/data/scifact")           # prepares on first use
    tfds.data_source("beir_folder", split="test",
                     builder_kwargs={"path": "/data/scifact"})

Bad data (see common.DataError):
  - malformed JSON, a byte that is not UTF-8 (with its byte offset), a
    missing `_id`/`text`, an empty `text` (corpus or query), a duplicate id,
    a malformed qrels line: an error naming file and line. An empty `title`
    is fine (many corpora have none).
  - a corpus, queries or qrels file without a record: an error naming it.
  - a qrels line naming a document or query that does not exist: an error,
    unless `skip_unknown_qrels=True`; then such lines are left out, counted in
    the metadata (`unknown_qrels`) and logged with their first line numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from typing import Any, Iterator, Optional

from absl import logging
import tensorflow_datasets as tfds

from search_r3_jax.data import common
from search_r3_jax.data.common import DataError

QRELS_SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class BeirConfig(tfds.core.BuilderConfig):
  """Which folder, and how strict to be about qrels.

  Attributes:
    path: the BEIR-layout folder.
    skip_unknown_qrels: count and log qrels lines naming an unknown document
      or query instead of failing.
  """

  path: str = ""
  skip_unknown_qrels: bool = False


def config_for(
    path: str | pathlib.Path,
    *,
    name: Optional[str] = None,
    skip_unknown_qrels: bool = False,
) -> BeirConfig:
  """A config named after the folder (or `name`), e.g. `scifact`."""
  path = pathlib.Path(path).expanduser().resolve()
  if name is None:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name) or "beir"
    if skip_unknown_qrels:  # a different dataset, so a different directory
      name += "-skip_unknown_qrels"
  return BeirConfig(
      name=name,
      path=str(path),
      skip_unknown_qrels=skip_unknown_qrels,
      description=f"BEIR-layout folder {path}",
  )


def fingerprint(folder: pathlib.Path) -> str:
  """A cheap content fingerprint: name, size and the first MiB of each file.

  It catches an edited or replaced folder without reading a large corpus in
  full, and unlike mtimes it survives copying the folder to another host.
  """
  h = hashlib.sha256()
  files = [folder / "corpus.jsonl", folder / "queries.jsonl"] + [
      folder / "qrels" / f"{s}.tsv" for s in QRELS_SPLITS
  ]
  for f in files:
    if f.is_file():
      h.update(f"{f.relative_to(folder)}\0{f.stat().st_size}\0".encode())
      with f.open("rb") as fh:
        h.update(fh.read(1 << 20))
  return h.hexdigest()[:16]


class BeirFolder(common.Builder):
  """A BEIR-layout folder: its corpus and its queries with qrels."""

  VERSION = tfds.core.Version("1.0.0")
  FIELDS = common.CORPUS_FIELDS + ("query_id", "query", "doc_ids", "scores")
  DESCRIPTION = __doc__

  def __init__(
      self,
      *,
      path: Optional[str | pathlib.Path] = None,
      name: Optional[str] = None,
      skip_unknown_qrels: bool = False,
      **kwargs: Any,
  ):
    """Args: path (the folder) or config=BeirConfig(...); name overrides the
    config name; other kwargs (data_dir, ...) go to the TFDS builder."""
    if path is not None:
      kwargs["config"] = config_for(
          path, name=name, skip_unknown_qrels=skip_unknown_qrels
      )
    if not isinstance(kwargs.get("config"), BeirConfig):
      raise ValueError("BeirFolder needs path=FOLDER (or config=BeirConfig)")
    super().__init__(**kwargs)
    self._check_fresh()

  def _check_fresh(self) -> None:
    """Refuses a prepared copy whose source folder has changed since."""
    folder = pathlib.Path(self.builder_config.path)
    if not self.is_prepared() or not folder.is_dir():
      return  # nothing written yet, or only the prepared copy is available
    recorded = (self.info.metadata or {}).get("fingerprint")
    if recorded is not None and recorded != fingerprint(folder):
      raise DataError(
          f"{folder} changed since it was prepared into {self.data_dir}; "
          "delete that directory or pass another name="
      )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files, nothing to download
    folder = pathlib.Path(self.builder_config.path)
    if not folder.is_dir():
      raise DataError(
          f"{folder}: no such folder (expected corpus.jsonl, "
          "queries.jsonl, qrels/{train,dev,test}.tsv)"
      )
    corpus_path = folder / "corpus.jsonl"
    doc_ids = _scan_corpus(corpus_path)
    queries = _read_queries(folder / "queries.jsonl")
    splits = {"corpus": self._corpus(corpus_path)}
    kinds = {"corpus": common.CORPUS_FIELDS}
    unknown, counts = {}, {}
    for split in QRELS_SPLITS:
      qrels_path = folder / "qrels" / f"{split}.tsv"
      if not qrels_path.is_file():
        continue
      grouped, bad = _group_qrels(
          qrels_path, doc_ids, queries, self.builder_config.skip_unknown_qrels
      )
      if bad["lines"]:
        unknown[split] = bad
        logging.warning(
            "%s: skipped %d qrels lines naming an unknown "
            "document or query (first at lines %s)",
            qrels_path,
            bad["lines"],
            bad["first_lines"],
        )
      counts[split] = len(grouped)
      splits[split] = self._queries(grouped, queries)
      kinds[split] = common.QUERY_FIELDS
    if len(splits) == 1:
      raise DataError(f"{folder / 'qrels'}: no train.tsv, dev.tsv or test.tsv")
    self._record_splits(
        kinds,
        source=str(folder),
        fingerprint=fingerprint(folder),
        num_docs=len(doc_ids),
        num_queries=counts,
        unknown_qrels=unknown,
    )
    return splits

  def _corpus(self, path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    for n, obj in _iter_corpus(path):
      yield n, common.fill(
          self.FIELDS,
          doc_id=obj["_id"],
          title=obj.get("title") or "",
          text=obj["text"],
      )

  def _queries(
      self, grouped: dict[str, list[tuple[str, int]]], queries: dict[str, str]
  ) -> Iterator[tuple[int, dict]]:
    for i, (qid, judged) in enumerate(grouped.items()):
      yield i, common.fill(
          self.FIELDS,
          query_id=qid,
          query=queries[qid],
          doc_ids=[d for d, _ in judged],
          scores=[s for _, s in judged],
      )


def _iter_corpus(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
  for n, obj in common.iter_jsonl(
      path, required=("_id", "text"), nonempty=("_id", "text"), ids=("_id",)
  ):
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
      raise DataError(
          f"{path}:{n}: field 'title' must be a string, "
          f"got {type(title).__name__}"
      )
    yield n, obj


def _scan_corpus(path: pathlib.Path) -> set[str]:
  """Checks every corpus line (before anything is written); returns the ids."""
  first_line: dict[str, int] = {}
  for n, obj in _iter_corpus(path):
    doc_id = obj["_id"]
    if doc_id in first_line:
      raise DataError(
          f"{path}:{n}: duplicate document id {doc_id!r} "
          f"(first at line {first_line[doc_id]})"
      )
    first_line[doc_id] = n
  if not first_line:
    raise DataError(f"{path}: no documents (the file is empty)")
  return set(first_line)


def _read_queries(path: pathlib.Path) -> dict[str, str]:
  queries: dict[str, str] = {}
  first_line: dict[str, int] = {}
  for n, obj in common.iter_jsonl(
      path, required=("_id", "text"), nonempty=("_id", "text"), ids=("_id",)
  ):
    qid = obj["_id"]
    if qid in queries:
      raise DataError(
          f"{path}:{n}: duplicate query id {qid!r} "
          f"(first at line {first_line[qid]})"
      )
    queries[qid], first_line[qid] = obj["text"], n
  if not queries:
    raise DataError(f"{path}: no queries (the file is empty)")
  return queries


def _group_qrels(
    path: pathlib.Path,
    doc_ids: set[str],
    queries: dict[str, str],
    skip_unknown: bool,
):
  """Query id -> [(doc id, score)], and the count of skipped lines."""
  grouped: dict[str, list[tuple[str, int]]] = {}
  seen: dict[tuple[str, str], int] = {}
  bad = {"lines": 0, "first_lines": []}
  for n, qid, did, score in common.read_qrels(path):
    problem = (
        f"unknown query id {qid!r}"
        if qid not in queries
        else f"unknown document id {did!r}"
        if did not in doc_ids
        else None
    )
    if problem is not None:
      if not skip_unknown:
        raise DataError(
            f"{path}:{n}: {problem} (pass skip_unknown_qrels=True "
            "to count and skip such lines)"
        )
      bad["lines"] += 1
      if len(bad["first_lines"]) < 10:
        bad["first_lines"].append(n)
      continue
    if (qid, did) in seen:
      raise DataError(
          f"{path}:{n}: duplicate judgement of {did!r} for query "
          f"{qid!r} (first at line {seen[qid, did]})"
      )
    seen[qid, did] = n
    grouped.setdefault(qid, []).append((did, score))
  if not grouped:
    raise DataError(
        f"{path}: no judgements"
        + (
            f" left ({bad['lines']} lines name an unknown document or query)"
            if bad["lines"]
            else " (the file is empty)"
        )
    )
  return grouped, bad


def beir_builder(
    path: str | pathlib.Path,
    *,
    data_dir: Optional[str] = None,
    name: Optional[str] = None,
    skip_unknown_qrels: bool = False,
) -> BeirFolder:
  """The prepared `beir_folder` dataset of `path` (written on first use)."""
  return BeirFolder(
      path=path,
      name=name,
      skip_unknown_qrels=skip_unknown_qrels,
      data_dir=data_dir,
  ).prepared()
