r"""Training program: stage 1 (this module) or stage 2 (`rl.py`), as the
config's `stage` says.

    python -m search_r3_jax.train --config=configs/rl.py      # runs/rl
    python -m search_r3_jax.train --config=configs/sft.py --workdir=runs/sft
    python -m search_r3_jax.train --config=configs/sft.py:tiny --workdir=/tmp/t \
        --config.total_steps=10

Writes into the workdir: config.json, metrics.jsonl (one line per logged
step and per evaluation), TensorBoard events (tb/), PNG plots of the curves
(plots/), and orbax checkpoints (checkpoints/) that also hold the data
position. Running again on the same workdir resumes at the saved step and
data position, also after `kill -9`. A non-finite loss or gradient, or
updated parameters whose forward is not finite, stops the run with a
message; the last checkpoint (all of whose steps were finite) stays.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
import jax
import numpy as np
import tqdm
from flax import nnx
from ml_collections import config_flags

from search_r3_jax.training import checkpoint as ckpt_lib
from search_r3_jax.retrieval import evaluation
from search_r3_jax.training import stage1 as sft
from search_r3_jax.core import sharding as shd
from search_r3_jax.api import SearchR3
from search_r3_jax.data import sources as data_lib
from search_r3_jax.training.runtime import (MetricWriter, NonFiniteLossError,
                                   close_run, load_model, say)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: the config's `workdir`).")

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
    say(f"resumed from {checkpoints.directory} at step {start}, data "
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
    say(f"eval at step {step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in flat.items() if not k.endswith("queries")))
    return figures

  last_eval = {}
  if cfg.eval.at_start and start == 0:
    bm25 = evaluator.bm25()
    writer.write(0, {f"{split}/{k}": v for split, d in bm25.items()
                     for k, v in d.items()}, kind="bm25")
    say("BM25 on the same documents: " + json.dumps(bm25))
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

  def check_update(step: int, params) -> None:
    # The loss and gradient were computed before the update; an exploding
    # update leaves both finite and the parameters useless. One short
    # document's forward with the new parameters catches it before they are
    # saved.
    current = SearchR3(nnx.merge(graphdef, params), model.tokenizer, mesh,
                       prompts=model.prompts)
    probe = current.encode_documents(["a short probe document"],
                                     progress=False)
    if not np.isfinite(probe).all():
      raise NonFiniteLossError(
          f"step {step}: the updated parameters' forward is not finite "
          "although the loss and gradient were; stopping. The last "
          f"checkpoint in {checkpoints.directory} is intact: step "
          f"{checkpoints.latest_step()}")

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
        check_update(done, state.params)
        checkpoints.save(done, state, position)
      if done % cfg.eval_every == 0 or done == cfg.total_steps:
        check(pending)
        last_eval = evaluate(done, state.params)
    if pending is not None:
      _, values, _ = check(pending)
      writer.write(pending[0], values)
      bar.update(1)
  finally:
    close_run(workdir, bar, checkpoints, writer)
  return last_eval

def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library chatter (orbax, tfds)
  try:
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or cfg.get("workdir")
    if not workdir:
      raise SystemExit("error: give --workdir (the config names no workdir)")
    if cfg.get("stage", 1) == 2:
      from search_r3_jax.training import stage2 as rl  # pylint: disable=g-import-not-at-top
      rl.train_and_evaluate(cfg, workdir)
    else:
      train_and_evaluate(cfg, workdir)
  except NonFiniteLossError as e:
    raise SystemExit(f"error: {e}") from None

if __name__ == "__main__":
  app.run(main)
