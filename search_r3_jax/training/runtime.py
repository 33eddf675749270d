"""What both training stages share besides the loop (`trainer.py`): the
metric writer, the non-finite stop and the console line."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import tqdm


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def say(message: str) -> None:
  """A line for the person watching (process 0), above the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


# ------------------------------------------------------------------ setup


class MetricWriter:
  """metrics.jsonl + TensorBoard, from process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

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
    keep = [
        r
        for r in rows
        if r["step"] < step or (r["kind"] != "train" and r["step"] == step)
    ]
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
    from search_r3_jax.training.plots import write_plots

    write_plots(
        os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "plots")
    )
