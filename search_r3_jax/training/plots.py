"""PNG plots of the curves in a metrics.jsonl (training and evaluation)."""

from __future__ import annotations

import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_metrics(path: str) -> dict[str, dict[str, list]]:
  """kind -> metric -> [(step, value)], from a metrics.jsonl."""
  out: dict = collections.defaultdict(lambda: collections.defaultdict(list))
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      for k, v in row.items():
        if k not in ("step", "kind", "time"):
          out[row["kind"]][k].append((row["step"], v))
  return out


def write_plots(metrics_path: str, out_dir: str) -> list[str]:
  """One PNG per kind (train, eval), a panel per metric. Returns the paths."""
  data = read_metrics(metrics_path)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for kind, series in data.items():
    names = sorted(series)
    if not names:
      continue
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False
    )
    for ax, name in zip(axes.flat, names):
      steps, values = zip(*series[name])
      ax.plot(steps, values, marker="." if len(steps) < 30 else None)
      ax.set_title(name, fontsize=9)
      ax.set_xlabel("step", fontsize=8)
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
      ax.axis("off")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{kind}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written
