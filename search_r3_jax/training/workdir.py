"""The model a training run starts from, and a finished run's model.

A training workdir holds `config.json` (naming the model it started from)
and orbax `checkpoints/` (the trained parameters); `load_workdir` puts the
two together, so a workdir loads wherever a model name does
(`SearchR3.from_pretrained(workdir)`, `--config.init_from=workdir`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

from flax import nnx
from jax.sharding import Mesh
import ml_collections

from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.loading import LoadedDecoder
from search_r3_jax.core.loading import random_decoder
from search_r3_jax.core.loading import tokenizer_and_config
from search_r3_jax.core.tokenizer import Tokenizer
from search_r3_jax.core.weights.presets import load_checkpoint
from search_r3_jax.training import checkpoint


def is_workdir(path: os.PathLike | str) -> bool:
  p = pathlib.Path(path)
  return (p / "config.json").is_file() and (p / "checkpoints").is_dir()


def load_model(cfg, mesh: Mesh) -> LoadedDecoder:
  """The starting model of a training config: `init_from` (a workdir's
  trained parameters, or any model path), a random model (`random_init`),
  or the preset `model`."""
  loaded = _load_model(cfg, mesh)
  # How the blocks compute (attention path, rematerialisation) is this
  # run's choice, whatever made the parameters; the numbers are the same.
  loaded.model.cfg = loaded.model.cfg.replace(
      attention=cfg.get("attention", "einsum"),
      remat=cfg.get("remat", "none"),
  )
  return loaded


def planned_model(cfg) -> tuple[ModelConfig, Tokenizer]:
  """(the ModelConfig `load_model(cfg, ...)` will build, its tokenizer),
  read from the checkpoint's config and tokenizer alone:
  no weights are read, so a run can be sized before anything is allocated."""
  if cfg.init_from and is_workdir(cfg.init_from):
    with open(
        pathlib.Path(cfg.init_from) / "config.json", encoding="utf-8"
    ) as f:
      source = ml_collections.ConfigDict(json.load(f))
    model_cfg, tok = planned_model(source)
  else:
    random = dict(cfg.random_init) if cfg.random_init else None
    ckpt = load_checkpoint(
        cfg.model if random is not None else (cfg.init_from or cfg.model),
        model_dir=cfg.model_dir,
    )
    dtypes = dict(compute_dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype)
    model_cfg = ModelConfig.from_hf(ckpt.hf_config, source=ckpt.source)
    if random is not None:
      model_cfg = model_cfg.replace(**dict(random, **dtypes))
    else:
      model_cfg = model_cfg.replace(**dtypes)
    tok, model_cfg = tokenizer_and_config(ckpt, model_cfg)
  return (
      model_cfg.replace(
          attention=cfg.get("attention", "einsum"),
          remat=cfg.get("remat", "none"),
      ),
      tok,
  )


def _load_model(cfg, mesh: Mesh) -> LoadedDecoder:
  if cfg.init_from and is_workdir(cfg.init_from):
    return load_workdir(cfg.init_from, mesh=mesh)
  if cfg.random_init:
    return random_decoder(
        cfg.model,
        seed=cfg.seed,
        model_dir=cfg.model_dir,
        mesh=mesh,
        compute_dtype=cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        **dict(cfg.random_init),
    )
  return load_decoder(
      cfg.init_from or cfg.model,
      model_dir=cfg.model_dir,
      mesh=mesh,
      compute_dtype=cfg.compute_dtype,
      param_dtype=cfg.param_dtype,
  )


def load_workdir(
    path: os.PathLike | str,
    mesh: Optional[Mesh] = None,
    step: Optional[int] = None,
) -> LoadedDecoder:
  """The model of a training workdir at its newest complete (or the given)
  checkpoint: its config's starting model with the checkpoint's parameters
  (restored alone, without the optimizer state). The workdir is only read,
  so this works while its run is saving.

  Raises:
    FileNotFoundError: the workdir has no finished checkpoint.
  """
  p = pathlib.Path(path)
  with open(p / "config.json", encoding="utf-8") as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  mesh = mesh or shd.make_mesh(tuple(cfg.mesh))
  ck = checkpoint.Checkpointer(p, writer=False)
  try:
    if step is None:
      # The newest step whose files are complete: what finished_steps
      # reports for the workdir.
      step = ck.newest_good_step()
    if step is None:
      raise FileNotFoundError(
          f"{p} is a training workdir without a finished checkpoint"
          + (
              f" (its steps {ck.all_steps()} are incomplete)"
              if ck.all_steps()
              else ""
          )
      )
    loaded = load_model(cfg, mesh)
    params = ck.restore_params(nnx.state(loaded.model, nnx.Param), step)
  finally:
    ck.close()
  nnx.update(loaded.model, params)
  return loaded
