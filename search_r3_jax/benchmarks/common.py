"""Shared helpers of the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from absl import flags

# Flags defined here belong to the benchmark that asks for them.
flags.disclaim_key_flags()


def median_time(
    fn: Callable[[], object], repeats: int
) -> tuple[float, list[float]]:
  """Runs `fn` `repeats` times; returns (median seconds, all times)."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def repo_config(name: str, arg: str = ""):
  """`get_config(arg)` of the repository's `configs/<name>.py`."""
  import importlib.util
  import os

  path = os.path.join(
      os.path.dirname(__file__), os.pardir, os.pardir, "configs", f"{name}.py"
  )
  path = os.path.normpath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"config {path} not found; run the benchmark "
        "from a checkout of the repository"
    )
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def left_pad(rows, pad: int):
  """Left-padded int64 ids and attention mask ([B, T] numpy) of token-id
  rows, as transformers `generate` takes them."""
  import numpy as np

  p = max(len(r) for r in rows)
  ids = np.full((len(rows), p), pad, np.int64)
  mask = np.zeros((len(rows), p), np.int64)
  for i, r in enumerate(rows):
    ids[i, p - len(r) :] = r
    mask[i, p - len(r) :] = 1
  return ids, mask


def torch_flags():
  """Defines the reference's flags, `--torch_device` and `--skip_torch`, as
  flags of the calling benchmark (this module disclaims its definitions, so
  the benchmark's --help lists them); returns their holders."""
  device = flags.DEFINE_enum(
      "torch_device",
      "auto",
      ["auto", "cpu", "cuda"],
      "Where the reference runs; auto = cuda when JAX runs on a GPU.",
  )
  skip = flags.DEFINE_bool("skip_torch", False, "Measure this project only.")
  return device, skip


def torch_device(choice: str) -> str:
  """`--torch_device`'s value with "auto" resolved: cuda when JAX runs on a
  GPU and torch sees one, else cpu."""
  if choice != "auto":
    return choice
  import jax
  import torch

  return (
      "cuda"
      if jax.default_backend() == "gpu" and torch.cuda.is_available()
      else "cpu"
  )
