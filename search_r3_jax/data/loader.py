"""Host-side batches of one split: sharded per JAX process, reshuffled each
epoch, resumable from a small JSON-able position.

    loader = Loader.from_builder(builder, "train", batch_size=32, seed=0)
    for batch in loader:          # {"query": [str]*32, "negatives": [[str]]*32}
      ...
      ckpt["data"] = loader.get_state()  # {"epoch": 3, "index": 640, "seed": 0}
    loader.set_state(ckpt["data"])        # continues with the very next batch

Built on grain's `MapDataset` (random access over the array_record source):
each epoch is `source.shuffle(seed_e)[:n_even][process::count]`, batched.
Because every epoch is a pure function of (seed, epoch), the position is just
(epoch, example index in this process's shard), with no iterator state to
serialise, and it is the same on every process. We use MapDataset rather than
`grain.DataLoader` + `IndexSampler` because the sampler's record stream runs
across epoch boundaries (a batch can straddle two epochs) and its checkpoint
is grain's own opaque format; here batches stay within an epoch and the state
is three integers.

Sharding: all processes draw the same permutation of the whole split each
epoch and process i takes every count-th record from position i, so shards are
disjoint, cover the split, and mix differently every epoch. With
`drop_remainder` (the default, for training) the permutation is cut to a
multiple of the process count and each shard to whole batches, so every
process yields the same number of batches per epoch (unequal counts would
deadlock a multi-host step). Without it (evaluation) every record is yielded
once, and the last batch of a shard may be short.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from search_r3_jax.data import common

Batch = dict[str, list[Any]]


def epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit shuffle seed for one epoch (grain's shuffle takes 32 bits)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class Loader:
  """Fixed-size batches of raw examples (dicts of lists of str/int/lists)."""

  def __init__(
      self,
      source: Sequence[Any],
      batch_size: int,
      *,
      fields: Optional[Sequence[str]] = None,
      shuffle: bool = True,
      seed: int = 0,
      num_epochs: Optional[int] = None,
      drop_remainder: bool = True,
      process_index: Optional[int] = None,
      process_count: Optional[int] = None,
  ):
    """Creates a loader positioned at the start of epoch 0.

    Args:
      source: a random-access source of decoded records (len and getitem),
        e.g. `tfds.data_source(...)` or `builder.as_data_source(split)`.
      batch_size: examples per batch on this process.
      fields: the record fields to keep (default: all of them).
      shuffle: reshuffle every epoch; if False, file order.
      seed: shuffle seed; epoch e uses `epoch_seed(seed, e)`.
      num_epochs: stop after this many epochs; None runs forever.
      drop_remainder: keep shards and batches whole (see module docstring).
      process_index: this process (default `jax.process_index()`).
      process_count: processes sharing the split (default
        `jax.process_count()`).
    """
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self._source = source
    self._fields = tuple(fields) if fields is not None else None
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.process_index = (
        jax.process_index() if process_index is None else process_index
    )
    self.process_count = (
        jax.process_count() if process_count is None else process_count
    )
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(
          f"process_index {self.process_index} is not in "
          f"[0, {self.process_count})"
      )
    self._epoch, self._index = 0, 0
    self.shard_size = len(self._shard(0))
    if len(self) == 0:
      raise ValueError(
          f"{len(source)} records over {self.process_count} processes give "
          f"{self.shard_size} per process: not one batch of {batch_size}"
      )

  @classmethod
  def from_builder(
      cls,
      builder: tfds.core.DatasetBuilder,
      split: str,
      batch_size: int,
      **kwargs: Any,
  ) -> "Loader":
    """A loader over `split` of a prepared builder, with that split's fields.

    Args:
      builder: a prepared builder of this package (e.g. `beir_builder(...)`).
      split: a split name ("corpus", "train", "test", "dev_sub", ...).
      batch_size: examples per batch on this process.
      **kwargs: the other arguments of `Loader`.
    """
    kwargs.setdefault("fields", common.split_fields(builder.info, split))
    return cls(builder.as_data_source(split=split), batch_size, **kwargs)

  def _shard(self, epoch: int) -> grain.MapDataset:
    """This process's records of `epoch`, in order."""
    ds = grain.MapDataset.source(self._source)
    if self.shuffle:
      ds = ds.shuffle(seed=epoch_seed(self.seed, epoch))
    if self.drop_remainder:
      ds = ds[: len(ds) - len(ds) % self.process_count]
    ds = ds[self.process_index :: self.process_count]
    if self.drop_remainder:
      ds = ds[: len(ds) - len(ds) % self.batch_size]
    return ds

  def __len__(self) -> int:
    """Batches per epoch on this process."""
    if self.drop_remainder:
      return self.shard_size // self.batch_size
    return -(-self.shard_size // self.batch_size)

  def _decode(self, record: dict) -> dict:
    if self._fields is not None:
      record = {f: record[f] for f in self._fields}
    return common.to_python(record)

  def _collate(self, records: Sequence[dict]) -> Batch:
    return {k: [r[k] for r in records] for k in records[0]}

  def __iter__(self) -> Iterator[Batch]:
    """Batches from the current position on; the position advances as each
    batch is handed out, so `get_state()` after a batch names the next one."""
    while self.num_epochs is None or self._epoch < self.num_epochs:
      # Slice before batching, so a position that is not a multiple of the
      # batch size (a resume with another batch size) continues exactly.
      rest = self._shard(self._epoch)[self._index :]
      batches = rest.map(self._decode).batch(
          self.batch_size,
          drop_remainder=self.drop_remainder,
          batch_fn=self._collate,
      )
      for i in range(len(batches)):
        batch = batches[i]
        self._index += len(next(iter(batch.values())))
        yield batch
      self._epoch, self._index = self._epoch + 1, 0

  def get_state(self) -> dict[str, int]:
    """The position: the next batch starts at example `index` of this
    process's shard of `epoch`, shuffled with `seed`. Same on all processes."""
    return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    """Moves to a position from `get_state()` (also adopts its seed)."""
    epoch, index, seed = (int(state[k]) for k in ("epoch", "index", "seed"))
    if epoch < 0 or not 0 <= index <= self.shard_size:
      raise ValueError(
          f"state {state} is outside this loader's epochs of "
          f"{self.shard_size} examples per process"
      )
    self._epoch, self._index, self.seed = epoch, index, seed
