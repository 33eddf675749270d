"""`triples`: a training-triples JSONL file as a TFDS dataset.

One object per line:

    {"query": "...", "positive": "...", "negatives": ["...", ...],
     "reasoning": "..."}

Split `train` holds (query, positive, negatives, reasoning) in file order.
`reasoning` is optional: a line's own analysis of its query, which stage 1
trains as a reasoning query as given ("" or absent: none). `negatives`
may be an empty list (in-batch negatives still apply); its sizes are recorded
in the metadata (`negatives_min`, `negatives_max`). Malformed JSON, a missing
field, an empty string anywhere, or a `negatives` that is not a list of
strings is an error naming file and line (see common.DataError).

    builder = triples_builder("/data/triples.jsonl")
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Iterator, Optional

import tensorflow_datasets as tfds

from search_r3_jax.data import common
from search_r3_jax.data.common import DataError

# Every triple has `reasoning`: its own analysis of the query, or "".
FIELDS = common.TRIPLE_FIELDS + ("reasoning",)


@dataclasses.dataclass
class TriplesConfig(tfds.core.BuilderConfig):
  """Attributes: path: the JSONL file."""

  path: str = ""


class Triples(common.Builder):
  """Training triples (query, positive, hard negatives) from a JSONL file."""

  # 1.1.0: the optional `reasoning` field.
  VERSION = tfds.core.Version("1.1.0")
  FIELDS = FIELDS
  DESCRIPTION = __doc__

  def __init__(
      self,
      *,
      path: Optional[str | pathlib.Path] = None,
      name: Optional[str] = None,
      **kwargs: Any,
  ):
    """Args: path (the JSONL file) or config=TriplesConfig(...); name
    overrides the config name (default: the file's stem)."""
    if path is not None:
      path = pathlib.Path(path).expanduser().resolve()
      name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "triples"
      kwargs["config"] = TriplesConfig(
          name=name, path=str(path), description=f"triples from {path}"
      )
    if not isinstance(kwargs.get("config"), TriplesConfig):
      raise ValueError("Triples needs path=FILE (or config=TriplesConfig)")
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    path = pathlib.Path(self.builder_config.path)
    # One checking pass first, so a bad line fails before anything is written.
    sizes = [len(t["negatives"]) for _, t in _iter_triples(path)]
    if not sizes:
      raise DataError(f"{path}: no triples")
    self._record_splits(
        {"train": FIELDS},
        source=str(path),
        num_examples=len(sizes),
        negatives_min=min(sizes),
        negatives_max=max(sizes),
    )
    return {"train": ((n, t) for n, t in _iter_triples(path))}


def _iter_triples(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
  for n, obj in common.iter_jsonl(
      path,
      required=common.TRIPLE_FIELDS,
      nonempty=("query", "positive"),
      lists=("negatives",),
  ):
    reasoning = obj.get("reasoning", "")
    if not isinstance(reasoning, str):
      raise DataError(
          f"{path}:{n}: field 'reasoning' must be a string, got "
          f"{type(reasoning).__name__}"
      )
    yield n, dict(
        {f: obj[f] for f in common.TRIPLE_FIELDS}, reasoning=reasoning
    )


def triples_builder(
    path: str | pathlib.Path,
    *,
    data_dir: Optional[str] = None,
    name: Optional[str] = None,
) -> Triples:
  """The prepared `triples` dataset of `path` (written on first use)."""
  return Triples(path=path, name=name, data_dir=data_dir).prepared()
