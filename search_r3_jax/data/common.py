"""Shared pieces of the dataset builders: errors, line-checked readers, fields.

Every builder writes one record layout per split kind, and all splits of one
TFDS dataset share a single feature dict. So a builder's features are the
union of the fields its splits use (unused fields hold "" or []), and the
fields that belong to each split are written into the dataset's metadata
(`split_fields`), which the loader reads to hand out only those:

    corpus   doc_id, title, text                 one document
    queries  query_id, query, doc_ids, scores    one query and its qrels
    triples  query, positive, negatives          one training example

Bad input never disappears silently: it raises `DataError` with
`path:line: what` (see `iter_jsonl`, `read_qrels`; a byte that is not UTF-8
also gets its byte offset in the file), or, where a builder offers a skip
flag, it is counted in the metadata and logged.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import inspect
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Optional, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from search_r3_jax.core.errors import UserError
from search_r3_jax.core.paths import cache_root
from search_r3_jax.core.paths import DATA_DIR_ENV

CORPUS_FIELDS = ("doc_id", "title", "text")
QUERY_FIELDS = ("query_id", "query", "doc_ids", "scores")
TRIPLE_FIELDS = ("query", "positive", "negatives")
# The lock file beside a dataset's version directories (`Builder.prepared`).
PREPARE_LOCK = ".prepare.lock"


# Field name -> TFDS feature. Lists are variable-length sequences.
_FEATURES = {
    "doc_id": tfds.features.Text,
    "title": tfds.features.Text,
    "text": tfds.features.Text,
    "query_id": tfds.features.Text,
    "query": tfds.features.Text,
    "doc_ids": lambda: tfds.features.Sequence(tfds.features.Text()),
    "scores": lambda: tfds.features.Sequence(np.int32),
    "positive": tfds.features.Text,
    "negatives": lambda: tfds.features.Sequence(tfds.features.Text()),
    # A training triple's own analysis of its query ("" when it has none).
    "reasoning": tfds.features.Text,
    # Extras of the embedded default (wiki_fanout).
    "parent_id": tfds.features.Text,
    "missing_doc_ids": lambda: tfds.features.Sequence(tfds.features.Text()),
    "positive_id": tfds.features.Text,
    "negative_ids": lambda: tfds.features.Sequence(tfds.features.Text()),
    "query_kind": tfds.features.Text,
}
_LIST_FIELDS = frozenset(
    ("doc_ids", "scores", "negatives", "missing_doc_ids", "negative_ids")
)


class DataError(UserError, ValueError):
  """Bad input data. The message starts with `path:line:` where one exists."""


def default_data_dir() -> str:
  """The TFDS data_dir used when a caller gives none."""
  return str(cache_root() / "tfds")


def features(names: Sequence[str]) -> tfds.features.FeaturesDict:
  """The TFDS feature dict for the given field names."""
  return tfds.features.FeaturesDict({n: _FEATURES[n]() for n in names})


def fill(names: Sequence[str], **values: Any) -> dict[str, Any]:
  """A record with every field in `names`: given values, else "" or []."""
  unknown = set(values) - set(names)
  if unknown:
    raise KeyError(f"fields {sorted(unknown)} are not in {list(names)}")
  return {n: values.get(n, [] if n in _LIST_FIELDS else "") for n in names}


def split_fields(info: tfds.core.DatasetInfo, split: str) -> tuple[str, ...]:
  """The fields that belong to `split`, as the builder recorded them."""
  recorded = (info.metadata or {}).get("split_fields", {})
  if split not in recorded:
    raise KeyError(
        f"{info.full_name} has no split {split!r}; "
        f"splits: {sorted(recorded)}"
    )
  return tuple(recorded[split])


def _where(path: os.PathLike | str, line: int) -> str:
  return f"{path}:{line}"


def read_lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
  """Yields (line number, text) for every line of a UTF-8 file, the line
  ending dropped (a byte-order mark at the start is dropped too).

  Raises:
    DataError: `path:line: ...` with the byte offset in the file of the
      first byte that is not UTF-8.
  """
  offset = 0  # of the line's first byte in the file
  with path.open("rb") as f:
    for n, raw in enumerate(f, start=1):
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(
            f"{_where(path, n)}: not UTF-8: byte 0x{raw[e.start]:02x} at "
            f"byte offset {offset + e.start} (byte {e.start + 1} of the line)"
        ) from None
      offset += len(raw)
      yield n, text.rstrip("\r\n")


def iter_jsonl(
    path: pathlib.Path,
    required: Sequence[str],
    nonempty: Sequence[str] = (),
    ids: Sequence[str] = (),
    lists: Sequence[str] = (),
) -> Iterator[tuple[int, dict]]:
  """Yields (line number, object) for each non-blank line of a JSONL file.

  Args:
    path: the file.
    required: fields every object must have.
    nonempty: of those, string fields that must not be empty or blank.
    ids: of those, identifier fields; ints are accepted and turned into str
      (some BEIR-style exports write numeric ids).
    lists: of those, fields holding a list of non-empty strings; every other
      required field holds a string.

  Raises:
    DataError: `path:line: ...` for a malformed line, a missing field, a field
      of the wrong type, or an empty text.
  """
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  for n, raw in read_lines(path):
    if not raw.strip():
      continue  # a trailing or stray blank line carries no record
    try:
      obj = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataError(
          f"{_where(path, n)}: malformed JSON: {e.msg} " f"(column {e.colno})"
      ) from None
    if not isinstance(obj, dict):
      raise DataError(
          f"{_where(path, n)}: expected a JSON object, "
          f"got {type(obj).__name__}"
      )
    for field in required:
      if field not in obj:
        raise DataError(f"{_where(path, n)}: missing field {field!r}")
      value = obj[field]
      if (
          field in ids
          and isinstance(value, int)
          and not isinstance(value, bool)
      ):
        obj[field] = value = str(value)
      if field in lists:
        check_text_list(path, n, field, value)
        continue
      if not isinstance(value, str):
        raise DataError(
            f"{_where(path, n)}: field {field!r} must be a "
            f"string, got {type(value).__name__}"
        )
      if field in nonempty and not value.strip():
        raise DataError(f"{_where(path, n)}: empty field {field!r}")
    yield n, obj


def check_text_list(
    path: pathlib.Path, line: int, field: str, value: Any
) -> list[str]:
  """`value` as a list of non-empty strings, else a `path:line:` DataError."""
  if not isinstance(value, list):
    raise DataError(
        f"{_where(path, line)}: field {field!r} must be a list "
        f"of strings, got {type(value).__name__}"
    )
  for i, item in enumerate(value):
    if not isinstance(item, str):
      raise DataError(
          f"{_where(path, line)}: {field}[{i}] must be a string, "
          f"got {type(item).__name__}"
      )
    if not item.strip():
      raise DataError(f"{_where(path, line)}: empty {field}[{i}]")
  return value


def read_qrels(path: pathlib.Path) -> Iterator[tuple[int, str, str, int]]:
  """Yields (line number, query id, doc id, score) from a BEIR qrels TSV.

  The `query-id corpus-id score` header is optional. Scores are integers;
  0 means judged not relevant and is kept (evaluation decides what counts).

  Raises:
    DataError: `path:line: ...` for a line without three tab-separated
      columns, an empty id, or a non-integer score.
  """
  for n, line in read_lines(path):
    if not line.strip():
      continue
    cols = line.split("\t")
    if n == 1 and cols[0].strip() == "query-id":
      continue
    if len(cols) != 3:
      raise DataError(
          f"{_where(path, n)}: expected 3 tab-separated columns "
          f"(query-id, corpus-id, score), got {len(cols)}"
      )
    qid, did, score = (c.strip() for c in cols)
    if not qid or not did:
      raise DataError(f"{_where(path, n)}: empty query-id or corpus-id")
    try:
      value = int(score)
    except ValueError:
      raise DataError(
          f"{_where(path, n)}: score {score!r} is not an " "integer"
      ) from None
    yield n, qid, did, value


def to_python(value: Any) -> Any:
  """A decoded TFDS value as plain Python: bytes -> str, numpy -> int/float,
  arrays and lists -> lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return (
        [to_python(v) for v in value.tolist()]
        if value.ndim
        else (to_python(value.item()))
    )
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, Mapping):
    return {k: to_python(v) for k, v in value.items()}
  return value


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of this package's builders.

  Writes array_record (the format `tfds.data_source` reads, and the one that
  needs no TensorFlow), keeps the order records were generated in (the loader
  shuffles; evaluation wants file order), and carries a metadata dict with
  `split_fields` and the builder's counts.
  """

  FIELDS: tuple[str, ...] = ()  # the union of the fields of all splits
  DESCRIPTION = ""
  HOMEPAGE: Optional[str] = None
  LICENSE: Optional[str] = None

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    if kwargs.get("data_dir") is None:
      kwargs["data_dir"] = default_data_dir()
    super().__init__(**kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The module file, found without `importlib_resources`.

    TFDS's own lookup (`epath.resource_path` on the top package) touches
    `importlib_resources`, a backport TFDS only declares for Python < 3.9,
    and fails without it. TFDS uses this path only to look for a
    checksums.tsv next to the module, which we do not have.
    """
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=features(self.FIELDS),
        disable_shuffling=True,
        homepage=self.HOMEPAGE,
        license=self.LICENSE,
        metadata=tfds.core.MetadataDict(),
    )

  def _generate_examples(self, records: Iterator[tuple[Any, dict]]):
    yield from records

  def _record_splits(
      self, kinds: Mapping[str, Sequence[str]], **metadata: Any
  ) -> None:
    """Stores split -> fields and any counts in the dataset's metadata."""
    self.info.metadata["split_fields"] = {s: list(f) for s, f in kinds.items()}
    self.info.metadata.update(metadata)

  def prepared(self) -> "Builder":
    """Writes the dataset unless it is already there; returns self.

    Programs started together on one cache (a training run beside an
    evaluation, the processes of a local pod) would each write the dataset,
    and all but the first would fail to rename theirs into place. The
    writing is done under an exclusive lock on a file beside the dataset's
    version directory; a builder that finds the dataset written by another
    program once it holds the lock reads that program's dataset info (its
    own was made before the dataset existed).
    """
    if self.data_path.exists():  # written: nothing to lock (or to write)
      self.download_and_prepare()
      return self
    with _prepare_lock(os.fspath(self.data_dir)):
      if self.data_path.exists():  # written by another program meanwhile
        self.info.read_from_directory(self.data_dir)
      self.download_and_prepare()
    return self


@contextlib.contextmanager
def _prepare_lock(data_dir: str) -> Iterator[None]:
  """Holds an exclusive lock on `<dataset config dir>/.prepare.lock`.

  Only on a local filesystem: a remote `data_dir` (a URL) is written without
  a lock.
  """
  if "://" in data_dir:
    yield
    return
  parent = os.path.dirname(data_dir.rstrip(os.sep))
  os.makedirs(parent, exist_ok=True)
  with open(os.path.join(parent, PREPARE_LOCK), "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
