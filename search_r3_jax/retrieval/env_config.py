"""`EnvConfig`: the retrieval environment's settings, with this project's
defaults (PAPER.md: the paper gives none). `configs/rl.py` reads its env
block from these defaults (`config_blocks.env`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """Environment settings (defaults: this project's choice).

  Attributes:
    engine: index engine, "scann" or "exact".
    k: search depth for `search` (the rewards' top-K).
    num_regions: k-means regions; 0 means round(sqrt(N)).
    kmeans_iters: Lloyd iterations of the spherical k-means.
    graph_k: kNN links per document.
    probes_per_region: documents re-encoded per region to measure drift.
    drift_threshold: a region whose drift (in `drift_scale`) is at least
      this is re-encoded whole; 0 re-encodes every region.
    drift_scale: "neighbourhood": sqrt(mean probe 1 - cos / region radius),
      the fraction of the distance to the `graph_k`-th neighbour moved;
      "absolute": the mean probe 1 - cos.
    refresh_every: `maybe_refresh` acts on steps that are multiples of this.
    rebuild_fraction: full re-encode and rebuild when the documents
      re-encoded since the last rebuild would pass this fraction of the corpus.
    full_refresh_every: full refresh at least every this many steps (0: no
      schedule).
    touch_neighbors: whose graph neighbours `observe` marks too: "gold"
      (the gold documents'), "all" (gold and retrieved) or "none".
    seed: probe sampling and k-means initialisation.
    shard_by_process: on a pod, each process holds, encodes and refreshes
      one block of the corpus (its regions, kNN links and probes are within
      the block) and searches merge every block's top-k
      (`sharded.ShardedEnvironment`); False: every process holds the whole
      environment.
  """

  engine: str = "scann"
  k: int = 10
  num_regions: int = 0
  kmeans_iters: int = 10
  graph_k: int = 8
  probes_per_region: int = 2
  drift_threshold: float = 0.05
  drift_scale: str = "neighbourhood"
  refresh_every: int = 1
  rebuild_fraction: float = 0.5
  full_refresh_every: int = 0
  touch_neighbors: str = "gold"
  seed: int = 0
  shard_by_process: bool = False

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "EnvConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(
          f"unknown environment setting(s) {unknown}; known: "
          f"{sorted(known)}"
      )
    cfg = cls(**dict(values))
    cfg.check()
    return cfg

  def check(self) -> None:
    if self.engine not in ("scann", "exact"):
      raise ValueError(f"env.engine: {self.engine!r} is not scann or exact")
    for name in ("k", "graph_k", "refresh_every", "kmeans_iters"):
      if getattr(self, name) < 1:
        raise ValueError(f"env.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_regions", "probes_per_region", "full_refresh_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"env.{name} must be >= 0, got {getattr(self, name)}")
    if self.touch_neighbors not in ("gold", "all", "none"):
      raise ValueError(
          f"env.touch_neighbors: {self.touch_neighbors!r} is "
          "not gold, all or none"
      )
    if self.drift_scale not in ("neighbourhood", "absolute"):
      raise ValueError(
          f"env.drift_scale: {self.drift_scale!r} is not "
          "neighbourhood or absolute"
      )
    if math.isnan(self.drift_threshold) or self.drift_threshold < 0:
      raise ValueError(
          f"env.drift_threshold must be >= 0, got " f"{self.drift_threshold}"
      )
    if not 0 <= self.rebuild_fraction:
      raise ValueError(
          f"env.rebuild_fraction must be >= 0, got " f"{self.rebuild_fraction}"
      )
