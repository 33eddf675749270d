"""Loading a training workdir as a model: its config names the starting
model, its latest checkpoint holds the trained parameters."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from search_r3_jax.core import sharding as shd


def is_workdir(path: os.PathLike | str) -> bool:
  p = pathlib.Path(path)
  return (p / "config.json").is_file() and (p / "checkpoints").is_dir()


def load_workdir(path: os.PathLike | str, mesh: Optional[Mesh] = None,
                 step: Optional[int] = None):
  """The model of a training workdir at its latest (or given) checkpoint.

  Raises:
    FileNotFoundError: the workdir has no finished checkpoint.
  """
  from search_r3_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from search_r3_jax.training.runtime import load_model  # pylint: disable=g-import-not-at-top

  p = pathlib.Path(path)
  with open(p / "config.json", encoding="utf-8") as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  mesh = mesh or shd.make_mesh(tuple(cfg.mesh))
  ck = checkpoint.Checkpointer(p)
  try:
    if (step if step is not None else ck.latest_step()) is None:
      raise FileNotFoundError(f"{p} is a training workdir without a finished "
                              "checkpoint")
    model = load_model(cfg, mesh)
    params = ck.restore_params(nnx.state(model.model, nnx.Param), step)
  finally:
    ck.close()
  nnx.update(model.model, params)
  return model
