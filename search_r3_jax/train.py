r"""Training program.

    python -m search_r3_jax.train --config=configs/sft.py --workdir=runs/sft
    python -m search_r3_jax.train --config=configs/sft.py:tiny --workdir=/tmp/t \
        --config.total_steps=10

Writes into the workdir: config.json, metrics.jsonl (one line per logged
step and per evaluation), TensorBoard events (tb/), PNG plots of the curves
(plots/), and orbax checkpoints (checkpoints/) that also hold the data
position. Running again on the same workdir resumes at the saved step and
data position, also after `kill -9`. A non-finite loss stops the run with a
message; the last checkpoint (all of whose steps had finite losses) stays.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np
import tqdm
from flax import nnx
from ml_collections import config_flags

from search_r3_jax import checkpoint as ckpt_lib
from search_r3_jax import evaluation
from search_r3_jax import sft
from search_r3_jax import sharding as shd
from search_r3_jax.api import SearchR3
from search_r3_jax.data import stage1 as data_lib
from search_r3_jax.plots import write_plots

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.",
                               required=True)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def _say(message: str) -> None:
  """A line for the person watching (process 0), above the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


# ------------------------------------------------------------------ setup


def load_model(cfg, mesh) -> SearchR3:
  """The starting model: `init_from`, a random model, or the preset."""
  kw = dict(mesh=mesh, model_dir=cfg.model_dir)
  if cfg.init_from:
    return SearchR3.from_pretrained(cfg.init_from, compute_dtype=cfg.compute_dtype,
                                    param_dtype=cfg.param_dtype, **kw)
  if cfg.random_init:
    return SearchR3.random(cfg.model, seed=cfg.seed,
                           compute_dtype=cfg.compute_dtype,
                           param_dtype=cfg.param_dtype, **kw,
                           **dict(cfg.random_init))
  return SearchR3.from_pretrained(cfg.model, compute_dtype=cfg.compute_dtype,
                                  param_dtype=cfg.param_dtype, **kw)


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


# ------------------------------------------------------------------ train


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Runs stage 1; returns the last evaluation's figures."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  mesh = shd.make_mesh(tuple(cfg.mesh))
  model = load_model(cfg, mesh)
  graphdef, state, step_fn, batch_sh, batcher = sft.stage1_step(
      cfg, model, mesh)
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size {cfg.batch_size} does not divide over "
                     f"{jax.process_count()} processes")
  # Each process reads its own share of the global batch.
  loader = data_lib.train_loader(
      cfg.data, batch_size=cfg.batch_size // jax.process_count(),
      seed=cfg.seed)
  evaluator = evaluation.Evaluator.from_config(cfg.data, cfg.eval)

  checkpoints = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  start = checkpoints.latest_step() or 0
  if start:
    state, position = checkpoints.restore(state)
    loader.set_state(position)
    _say(f"resumed from {checkpoints.directory} at step {start}, data "
         f"position {position}")
  writer = MetricWriter(workdir)
  if start:
    writer.truncate_after(start)

  def evaluate(step: int, params) -> dict:
    t = time.perf_counter()
    current = SearchR3(nnx.merge(graphdef, params), model.tokenizer, mesh,
                       prompts=model.prompts)
    figures = evaluator(current)
    flat = {f"{split}/{k}": v for split, d in figures.items()
            for k, v in d.items()}
    flat["eval_seconds"] = time.perf_counter() - t
    writer.write(step, flat, kind="eval")
    _say(f"eval at step {step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in flat.items() if not k.endswith("queries")))
    return figures

  last_eval = {}
  if cfg.eval.at_start and start == 0:
    bm25 = evaluator.bm25()
    writer.write(0, {f"{split}/{k}": v for split, d in bm25.items()
                     for k, v in d.items()}, kind="bm25")
    _say("BM25 on the same documents: " + json.dumps(bm25))
    last_eval = evaluate(0, state.params)

  rng = jax.random.key(cfg.seed)
  pending = None  # (step, metrics, tokens) of the step dispatched last
  bar = tqdm.tqdm(total=cfg.total_steps, initial=start, desc="stage 1",
                  unit="step", disable=jax.process_index() != 0)
  t_last, tokens_since = time.perf_counter(), 0

  def check(item):
    step, metrics, tokens = item
    values = jax.device_get(metrics)
    # A finite loss with a non-finite gradient would still poison the
    # parameters, so both must be finite.
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
      raise NonFiniteLossError(
          f"step {step}: loss is {values['loss']}, gradient norm "
          f"{values['grad_norm']} (parts: "
          f"{ {k: float(v) for k, v in values.items()} }); stopping. The "
          f"last checkpoint in {checkpoints.directory} is intact: step "
          f"{checkpoints.latest_step()}")
    return step, values, tokens

  try:
    for step in range(start, cfg.total_steps):
      examples = loader.next_batch()
      position = loader.get_state()
      host = batcher(examples)
      batch = {k: jax.make_array_from_process_local_data(batch_sh[k], v)
               for k, v in host.items()}
      state, metrics = step_fn(state, batch, rng)
      # Read the previous step's metrics only now, so the host never stalls
      # the device between steps.
      if pending is not None:
        done_step, values, tokens = check(pending)
        tokens_since += tokens
        if done_step % cfg.log_every == 0:
          now = time.perf_counter()
          values["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
          t_last, tokens_since = now, 0
          writer.write(done_step, values)
          bar.set_postfix(loss=f"{values['loss']:.4f}",
                          tok_s=f"{values['tokens_per_s']:.0f}")
        bar.update(1)
      pending = (step, metrics, batcher.tokens_per_batch(host))
      done = step + 1
      if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
        check(pending)  # never save a state whose loss is not finite
        checkpoints.save(done, state, position)
      if done % cfg.eval_every == 0 or done == cfg.total_steps:
        check(pending)
        last_eval = evaluate(done, state.params)
    if pending is not None:
      _, values, _ = check(pending)
      writer.write(pending[0], values)
      bar.update(1)
  finally:
    bar.close()
    checkpoints.close()
    writer.close()
    if jax.process_index() == 0:
      write_plots(os.path.join(workdir, "metrics.jsonl"),
                  os.path.join(workdir, "plots"))
  return last_eval


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library chatter (orbax, tfds)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLossError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
