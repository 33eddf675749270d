r"""Training program: stage 1 or stage 2, as the config's `stage` says.

    python -m search_r3_jax.train --config=configs/rl.py      # runs/rl
    python -m search_r3_jax.train --config=configs/sft.py --workdir=runs/sft
    python -m search_r3_jax.train --config=configs/sft.py:tiny --workdir=/tmp/t \
        --config.total_steps=10

Writes into the workdir: config.json, metrics.jsonl (one line per logged
step and per evaluation), TensorBoard events (tb/), PNG plots of the curves
(plots/), and orbax checkpoints (checkpoints/) that also hold the data
position; stage 2 adds env/<step>/ and samples/. Running again on the same
workdir resumes at the saved step and data position, also after `kill -9`.
A non-finite loss or gradient, or updated parameters whose forward is not
finite, stops the run with a message; the last checkpoint (all of whose
steps were finite) stays. The loop is `training/trainer.py`; the stages are
`training/stage1.py` and `training/stage2.py`.

Every setting is checked before the workdir is written or a model loaded
(`config_check.py`: unknown fields, types, ranges, the mesh against the
devices); a bad one, like any error of input, is one line `error: ...` and
exit status 2 (`cli.run`; `--verbose` shows the traceback).
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from search_r3_jax import cli
from search_r3_jax import config_check
from search_r3_jax.core.errors import UserError
from search_r3_jax.training.lock import WorkdirLock
from search_r3_jax.training.runtime import say
from search_r3_jax.training.trainer import final_evaluation
from search_r3_jax.training.trainer import finished_steps
from search_r3_jax.training.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (configs/*.py[:variant]).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: the config's `workdir`)."
)


def stage_class(cfg):
  """The stage a config runs (imported on demand: each pulls in its own
  data and retrieval pieces)."""
  stage = cfg.get("stage", 1)
  if stage == 1:
    from search_r3_jax.training.stage1 import Stage1

    return Stage1
  if stage == 2:
    from search_r3_jax.training.stage2 import Stage2

    return Stage2
  raise ValueError(f"config field stage is {stage!r}; 1 or 2")


STAGE1_DIR = "stage1"


def run(cfg, workdir: str) -> dict:
  """Runs the config: stage 2 without `init_from` and with `stage1_first`
  trains `cfg.stage1` in <workdir>/stage1 first (skipped once it reached
  its last step) and starts from its result; stage 1's final evaluation is
  then stage 2's step-0 one where the two evaluate with the same settings.
  Returns the last evaluation's flat figures."""
  if (
      cfg.get("stage", 1) == 2
      and not cfg.get("init_from")
      and cfg.get("stage1_first")
      and cfg.get("stage1") is not None
  ):
    os.makedirs(workdir, exist_ok=True)
    # The main job's lock covers both stages.
    with WorkdirLock(workdir, say=say):
      sub = os.path.join(workdir, STAGE1_DIR)
      s1 = cfg.stage1
      if finished_steps(sub) != s1.total_steps:
        say(f"stage 1 first, in {sub}")
        train(s1, sub, stage_class(s1))
      say(f"stage 2 from {sub}")
      cfg.init_from = sub
      # Stage 1's final evaluation is stage 2's step 0 where both evaluate
      # alike (the main job's configs do): not computed twice.
      start_eval = final_evaluation(
          s1, sub, cfg, stage_class(s1), stage_class(cfg)
      )
      return train(cfg, workdir, stage_class(cfg), start_eval)
  return train(cfg, workdir, stage_class(cfg))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    raise UserError("give --config=configs/NAME.py[:variant]")
  config_check.check_config(cfg, "train")
  workdir = _WORKDIR.value or cfg.get("workdir")
  if not workdir:
    raise UserError("give --workdir (the config names no workdir)")
  run(cfg, workdir)


if __name__ == "__main__":
  cli.run(main)
