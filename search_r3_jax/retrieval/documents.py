"""A searchable index of a user's own documents: their embeddings in a
`VectorIndex`, the texts beside them, and the model that embeds queries.

    idx = DocumentIndex.build(model, documents)       # model: a SearchR3
    for hit in idx.search(["who wrote hamlet"], k=5)[0].hits:
      print(hit.rank, hit.score, hit.id, hit.title)
    idx.save("my_index");  DocumentIndex.load("my_index", model)

Documents come as strings, (id, text) pairs, mappings with `id`/`_id`,
`text` and an optional `title`, or from `read_documents(path)`: a JSONL
file, a BEIR folder (its `corpus.jsonl`) or a folder of text files. A
document with a title is embedded as "title\\ntext" (unless the text already
starts with the title), as the training data are.

A saved index is a folder: `vectors/` (the `VectorIndex`: arrays, JSON ids,
no pickle), `documents.jsonl` and `search_index.json` (the format version,
the embedding width, the model that wrote the vectors and the document
length). Loading checks the querying model's width against the saved one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from search_r3_jax.retrieval.index import IndexInputError
from search_r3_jax.retrieval.index import read_meta
from search_r3_jax.retrieval.index import replace_dir
from search_r3_jax.retrieval.index import VectorIndex

FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str
  title: str = ""

  @property
  def embedded_text(self) -> str:
    """What the model embeds: the title on its own line, then the text."""
    if self.title and not self.text.startswith(self.title):
      return f"{self.title}\n{self.text}"
    return self.text


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int
  score: float
  id: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class QueryHits:
  """One query's answer: its hits, best first, and with reasoning the
  model's analysis and whether it emitted `<|embed_token|>` itself."""

  query: str
  hits: list[Hit]
  analysis: Optional[str] = None
  emitted: Optional[bool] = None


def as_documents(documents: Iterable[Any]) -> list[Document]:
  """Strings (ids "0", "1", ...), (id, text) pairs, mappings or
  `Document`s as a list of `Document`s; ids must be unique, texts
  non-empty."""
  out, seen = [], {}
  for i, d in enumerate(documents):
    if isinstance(d, Document):
      doc = d
    elif isinstance(d, str):
      doc = Document(str(i), d)
    elif isinstance(d, Mapping):
      doc_id = d.get("id", d.get("_id", str(i)))
      doc = Document(str(doc_id), d.get("text"), d.get("title") or "")
    elif isinstance(d, (tuple, list)) and len(d) == 2:
      doc = Document(str(d[0]), d[1])
    else:
      raise IndexInputError(
          f"document {i}: expected a string, an (id, text) pair or a "
          f"mapping with 'text', got {type(d).__name__}"
      )
    if not isinstance(doc.text, str) or not doc.text.strip():
      raise IndexInputError(f"document {i} (id {doc.id!r}): empty text")
    if doc.id in seen:
      raise IndexInputError(
          f"document {i}: duplicate id {doc.id!r} (first at {seen[doc.id]})"
      )
    seen[doc.id] = i
    out.append(doc)
  if not out:
    raise IndexInputError("no documents to index")
  return out


def read_documents(path: os.PathLike | str) -> list[Document]:
  """The documents of a JSONL file (`_id` or `id`, `text`, optional
  `title` per line), a BEIR folder (its corpus.jsonl) or a folder of text
  files (`*.txt`, `*.md`; the id is the path inside the folder, the title
  the file name without its suffix).

  Raises:
    FileNotFoundError: `path` does not exist.
    DataError: naming the file and line of a malformed, duplicate or empty
      record, or a source without documents.
  """
  # data.common brings TFDS in; only reading files needs it.
  from search_r3_jax.data.common import DataError
  from search_r3_jax.data.common import iter_jsonl
  from search_r3_jax.data.common import read_lines

  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such file or folder: {p}")
  if p.is_dir() and (p / "corpus.jsonl").is_file():
    p = p / "corpus.jsonl"
  docs, first = [], {}
  if p.is_dir():
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
    )
    for f in files:
      text = "\n".join(line for _, line in read_lines(f)).strip()
      if not text:
        raise DataError(f"{f}: empty document")
      docs.append(Document(str(f.relative_to(p)), text, f.stem))
    if not docs:
      raise DataError(
          f"{p}: no documents (no corpus.jsonl and no "
          f"{'/'.join(TEXT_SUFFIXES)} files)"
      )
    return docs
  for n, obj in iter_jsonl(p, required=("text",), nonempty=("text",)):
    doc_id = obj.get("_id", obj.get("id"))
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
      doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
      raise DataError(f"{p}:{n}: missing or empty field '_id' (or 'id')")
    title = obj.get("title") or ""
    if not isinstance(title, str):
      raise DataError(f"{p}:{n}: field 'title' must be a string")
    if doc_id in first:
      raise DataError(
          f"{p}:{n}: duplicate document id {doc_id!r} (first at line "
          f"{first[doc_id]})"
      )
    first[doc_id] = n
    docs.append(Document(doc_id, obj["text"], title))
  if not docs:
    raise DataError(f"{p}: no documents (the file is empty)")
  return docs


def _width(model) -> int:
  return int(model.cfg.hidden_size)


class DocumentIndex:
  """Documents, their embeddings and the model that queries them."""

  def __init__(
      self,
      model,
      index: VectorIndex,
      documents: Sequence[Document],
      info: Mapping[str, Any],
  ):
    if index.dim != _width(model):
      raise IndexInputError(
          f"the index holds {index.dim}-wide embeddings, the model "
          f"querying it writes {_width(model)}-wide ones"
      )
    self.model = model
    self.index = index
    self.documents = {d.id: d for d in documents}
    self.info = dict(info)

  @classmethod
  def build(
      cls,
      model,
      documents: Iterable[Any],
      *,
      engine: str = "scann",
      doc_len: int = 512,
      batch_size: int = 16,
      progress: bool = True,
      model_name: Optional[str] = None,
  ) -> "DocumentIndex":
    """Embeds `documents` with `model.encode_documents` (texts cut to
    `doc_len` tokens) into a new index.

    Args:
      engine: "scann" (brute force below 16,384 documents, a tree above)
        or "exact".
      model_name: what to record as the model (`search query` reloads it
        from there when not told otherwise).
    """
    docs = as_documents(documents)
    vectors = model.encode_documents(
        [d.embedded_text for d in docs],
        batch_size=batch_size,
        max_length=doc_len,
        progress=progress,
    )
    index = VectorIndex.build([d.id for d in docs], vectors, engine=engine)
    info = dict(model=model_name, doc_len=int(doc_len), engine=engine)
    return cls(model, index, docs, info)

  def __len__(self) -> int:
    return len(self.index)

  def search(
      self,
      queries: Sequence[str],
      k: int = 10,
      *,
      reasoning: bool = False,
      max_new_tokens: int = 128,
      batch_size: int = 16,
      progress: bool = False,
  ) -> list[QueryHits]:
    """The top `k` documents of each query, best first; with `reasoning`
    the model analyses each query before embedding it."""
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str) or not q.strip():
        raise IndexInputError(f"query {i}: empty text")
    if not queries:
      return []
    details = [None] * len(queries)
    if reasoning:
      vectors, details = self.model.encode_queries(
          queries,
          reasoning=True,
          max_new_tokens=max_new_tokens,
          batch_size=batch_size,
          progress=progress,
          return_details=True,
      )
    else:
      vectors = self.model.encode_queries(
          queries, batch_size=batch_size, progress=progress
      )
    found = self.index.search(np.asarray(vectors, np.float32), k)
    out = []
    for qi, q in enumerate(queries):
      hits = []
      for rank, (doc_id, score) in enumerate(
          zip(found.ids[qi], found.scores[qi]), start=1
      ):
        d = self.documents[doc_id]
        hits.append(Hit(rank, float(score), d.id, d.title, d.text))
      why = details[qi]
      out.append(
          QueryHits(
              q,
              hits,
              analysis=why.analysis if why is not None else None,
              emitted=why.emitted if why is not None else None,
          )
      )
    return out

  def save(self, path: os.PathLike | str) -> None:
    """Writes the index to folder `path`, replacing it whole."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-search-index-", dir=parent)
    try:
      self.index.save(os.path.join(tmp, "vectors"))
      with open(
          os.path.join(tmp, "documents.jsonl"), "w", encoding="utf-8"
      ) as f:
        for row in self.index.ids:
          d = self.documents[row]
          f.write(
              json.dumps(
                  {"_id": d.id, "title": d.title, "text": d.text},
                  ensure_ascii=False,
              )
              + "\n"
          )
      with open(os.path.join(tmp, "search_index.json"), "w") as f:
        json.dump(
            dict(
                self.info,
                format_version=FORMAT_VERSION,
                dim=self.index.dim,
                size=len(self.index),
            ),
            f,
            indent=1,
        )
      replace_dir(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  @staticmethod
  def read_info(path: os.PathLike | str) -> dict:
    """The saved index's `search_index.json`, checked."""
    return read_meta(
        os.path.join(os.fspath(path), "search_index.json"),
        "search index",
        FORMAT_VERSION,
        ("dim", "size", "doc_len"),
    )

  @classmethod
  def load(cls, path: os.PathLike | str, model) -> "DocumentIndex":
    """Reads an index written by `save`, to be queried with `model`.

    Raises:
      IndexInputError: the model's embedding width differs from the saved
        vectors' (both named), or the files disagree.
    """
    path = os.fspath(path)
    info = cls.read_info(path)
    if int(info["dim"]) != _width(model):
      raise IndexInputError(
          f"{path} holds {info['dim']}-wide embeddings (written by "
          f"{info.get('model') or 'an unnamed model'}), the model "
          f"querying it writes {_width(model)}-wide ones"
      )
    index = VectorIndex.load(os.path.join(path, "vectors"))
    docs_path = pathlib.Path(path) / "documents.jsonl"
    docs = read_documents(docs_path)
    if [d.id for d in docs] != index.ids:
      raise IndexInputError(
          f"{docs_path}: its ids disagree with the saved vectors' "
          f"({len(docs)} documents, {len(index.ids)} vectors)"
      )
    return cls(model, index, docs, info)
