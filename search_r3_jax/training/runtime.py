"""What both training programs (stage 1 in `train.py`, stage 2 in `rl.py`)
share: the starting model, the metric writer, the non-finite stop."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import tqdm

from search_r3_jax.api import SearchR3


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def say(message: str) -> None:
  """A line for the person watching (process 0), above the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


# ------------------------------------------------------------------ setup


def load_model(cfg, mesh) -> SearchR3:
  """The starting model: `init_from`, a random model, or the preset."""
  kw = dict(mesh=mesh, model_dir=cfg.model_dir)
  # Training replaces the parameters, so the packed GGUF weights that
  # speed up inference would only be dropped again.
  if cfg.init_from:
    return SearchR3.from_pretrained(cfg.init_from, compute_dtype=cfg.compute_dtype,
                                    param_dtype=cfg.param_dtype,
                                    cpu_kernels=False, **kw)
  if cfg.random_init:
    return SearchR3.random(cfg.model, seed=cfg.seed,
                           compute_dtype=cfg.compute_dtype,
                           param_dtype=cfg.param_dtype, **kw,
                           **dict(cfg.random_init))
  return SearchR3.from_pretrained(cfg.model, compute_dtype=cfg.compute_dtype,
                                  param_dtype=cfg.param_dtype,
                                  cpu_kernels=False, **kw)


class MetricWriter:
  """metrics.jsonl + TensorBoard, from process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, values: dict[str, Any], kind: str = "train"):
    if not self.enabled:
      return
    row = {"step": step, "kind": kind, "time": time.time()}
    row.update({k: float(v) for k, v in values.items()})
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in values.items():
      self.tb.add_scalar(f"{kind}/{k}", float(v), step)
    self.tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops rows a killed run logged past the checkpoint it resumes from
    (train rows name the step they ran, 0-based; evaluations the step
    count they followed), so every step appears once."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in rows if r["step"] < step or (
        r["kind"] != "train" and r["step"] == step)]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, self.path)

  def close(self):
    if self.tb is not None:
      self.tb.close()


def write_run_plots(workdir: str) -> None:
  """PNG plots of the workdir's metrics.jsonl into workdir/plots
  (process 0)."""
  if jax.process_index() == 0:
    from search_r3_jax.training.plots import write_plots  # pylint: disable=g-import-not-at-top
    write_plots(os.path.join(workdir, "metrics.jsonl"),
                os.path.join(workdir, "plots"))


def close_run(workdir: str, bar, checkpoints, writer) -> None:
  """What both training programs do on the way out, finished or not: close
  the progress bar, wait for the last checkpoint, flush the metrics and draw
  the plots."""
  bar.close()
  checkpoints.close()
  writer.close()
  write_run_plots(workdir)
