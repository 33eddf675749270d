"""The training loop both stages run: resume, step, guard, evaluate, save.

A stage (`stage1.Stage1`, `stage2.Stage2`) says how to build its state, draw
a batch and take a step; this loop owns everything around that:

  1. `config.json`: written into the workdir; on a resumed run the saved one
     is compared with this run's and every changed field is either applied
     (said on the console) or refused, naming the field (`check_resume`).
  2. Resume order: the workdir's newest checkpoint that reads (state, data
     position, the stage's extras such as the environment) -> `init_from`
     -> scratch. A newer step that is incomplete or does not restore is set
     aside (`checkpoint.Checkpointer.set_aside`, said in one line); with
     steps but none that reads, the run stops, listing them. Rows a killed
     run logged past the step resumed from are dropped.
  3. Each step is dispatched before the previous step's metrics are read,
     so the host never stalls the device; reading them runs the non-finite
     guard (loss and gradient norm), and before every checkpoint the stage
     checks that its updated parameters still give a finite forward.
  4. Evaluation at step 0, every `eval_every` steps and at the end, before
     the checkpoint of the same step (a run killed in between repeats the
     evaluation on resume rather than losing it). A run handed the final
     evaluation of the run it starts from (`start_eval`: the same
     parameters, evaluated with the same settings) logs that one as its
     step 0 instead of computing it again.
  5. A checkpoint that cannot be written stops the run (`CheckpointError`,
     naming the step and the cause) within a step of the failure being
     known: the stage's extras are written before the checkpoint, and the
     background write is checked every step, before the next save and at
     the end.
  6. Metrics to metrics.jsonl and TensorBoard, a progress bar, PNG plots.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Protocol

import jax
import numpy as np
import tqdm

from search_r3_jax.core import distributed
from search_r3_jax.training.checkpoint import cause
from search_r3_jax.training.checkpoint import Checkpointer
from search_r3_jax.training.checkpoint import CheckpointError
from search_r3_jax.training.lock import WorkdirLock
from search_r3_jax.training.runtime import MetricWriter
from search_r3_jax.training.runtime import NonFiniteLossError
from search_r3_jax.training.runtime import say
from search_r3_jax.training.runtime import write_run_plots

Guard = Callable[[dict], None]

# Fields every stage keeps on resume: the model it started from, the data
# its saved position points into, the seed.
KEEPS_ON_RESUME = (
    "stage",
    "seed",
    "model",
    "model_dir",
    "init_from",
    "random_init",
    "param_dtype",
    "data",
)


class Stage(Protocol):
  """What the loop needs from a training stage."""

  name: str  # the progress bar's label
  state: Any  # the TrainState; every step replaces it
  # Config fields (dotted prefixes) a resumed run may not change.
  resume_refuses: tuple[str, ...]
  # Optional: {dotted field: default} for fields added after workdirs were
  # made; a saved config without one ran as its default (`check_resume`).

  def summary(self) -> str:
    ...

  def position(self) -> dict:
    ...

  def resume(self, position: dict, step: int) -> None:
    ...

  def prepare(self) -> None:
    ...

  def step(self, step: int, guard: Guard) -> dict:
    ...

  def update_is_finite(self) -> bool:
    ...

  def baseline(self) -> dict[str, float]:
    ...

  def evaluate(self, step: int) -> tuple[dict[str, float], list[dict]]:
    ...

  def postfix(self, values: dict) -> dict[str, str]:
    ...

  def save_extra(self, step: int) -> None:
    ...

  def prune_extra(self, kept_steps: set[int]) -> None:
    ...

  # Optional: `evaluation_settings(cfg)`, a classmethod giving everything
  # the stage's evaluation depends on besides the parameters (see
  # `evaluation_settings` below); two runs whose settings are equal give
  # equal figures for equal parameters.

  # What a step holds besides its checkpoint, for resume (called before the
  # stage is built): {name: path}, and what is wrong with them (None: fine).
  @classmethod
  def extras(cls, workdir: str, step: int) -> dict[str, str]:
    ...

  @classmethod
  def check_extra(cls, workdir: str, step: int) -> Optional[str]:
    ...


class ResumeConfigError(ValueError):
  """A resumed run's config changes a field the saved run cannot take."""


# ------------------------------------------------------------------ config


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; values stay as JSON gives them."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resume(
    saved: dict,
    now: dict,
    refuses: tuple[str, ...],
    defaults: Optional[dict[str, Any]] = None,
) -> dict[str, tuple[Any, Any]]:
  """The fields a resumed run changes, as {field: (saved, now)}.

  `defaults` ({dotted field: default}) covers workdirs made before a field
  existed: a field missing from the saved config ran as its default, so it
  is a change only where the value now differs from that default (and then
  it is named as `saved <default> (not in the saved config)`).

  Raises:
    ResumeConfigError: a changed field is under one of `refuses` (the model,
      the data, the seed, ...: the saved state would not belong to the new
      setting), naming every such field with both values.
  """
  a, b = flatten(saved), flatten(now)
  for k, v in (defaults or {}).items():
    if k not in a and k in b:
      a[k] = _AddedSince(v)
  changed = {
      k: (a.get(k), b.get(k))
      for k in sorted(set(a) | set(b))
      if a.get(k) != b.get(k) and k != "workdir"
  }
  refused = {
      k: v
      for k, v in changed.items()
      if any(k == r or k.startswith(r + ".") for r in refuses)
  }
  if refused:
    lines = "; ".join(
        f"{k}: saved {v[0]!r}, now {v[1]!r}" for k, v in refused.items()
    )
    raise ResumeConfigError(
        f"this workdir's checkpoints were made with other settings, which a "
        f"resumed run cannot change: {lines}. Use a new --workdir, or put "
        "the saved values back"
    )
  return changed


class _AddedSince:
  """A field a saved config lacks, standing in as the default it ran as."""

  def __init__(self, default):
    self.default = default

  def __eq__(self, other):
    other = other.default if isinstance(other, _AddedSince) else other
    return self.default == other

  def __hash__(self):
    return hash(repr(self.default))

  def __repr__(self):
    return f"{self.default!r} (not in the saved config)"


def write_config(
    cfg,
    workdir: str,
    resuming: bool,
    refuses: tuple[str, ...],
    defaults: Optional[dict[str, Any]] = None,
) -> None:
  """Writes config.json; when resuming, first checks it against the saved
  one (`check_resume`) and says which changed fields take effect."""
  path = os.path.join(workdir, "config.json")
  text = cfg.to_json_best_effort(indent=2)
  if resuming and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = check_resume(saved, json.loads(text), refuses, defaults)
    if changed:
      say(
          "resuming with changed settings, applied from here on: "
          + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
      )
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ loop


def guard_for(step: int, checkpoints: Checkpointer) -> Guard:
  """The non-finite stop for one step's metrics."""

  def guard(values: dict) -> None:
    # A finite loss with a non-finite gradient would still poison the
    # parameters, so both must be finite.
    updated = values.get("update_finite", 1.0)
    if (
        np.isfinite(values["loss"])
        and np.isfinite(values["grad_norm"])
        and (updated)
    ):
      return
    parts = {k: float(v) for k, v in values.items()}
    raise NonFiniteLossError(
        f"step {step}: loss is {values['loss']}, gradient norm "
        f"{values['grad_norm']}"
        + (
            ""
            if updated
            else ", and the updated parameters' forward is not " "finite"
        )
        + f" (parts: {parts}); stopping. The last checkpoint in "
        f"{checkpoints.directory} is intact: step {checkpoints.latest_step()}"
    )

  return guard


def evaluation_settings(cfg, *, modes, max_new_tokens: int) -> dict:
  """What a training run's dev evaluation depends on besides the
  parameters: the data source, the evaluated subset and how documents are
  encoded and searched, the reasoning modes and budget, and how the model
  computes (dtypes, attention, mesh). A plain JSON value, for comparing two
  runs' evaluations."""
  e = cfg.eval
  settings = dict(
      data={k: cfg.data.get(k) for k in ("name", "path", "data_dir")},
      eval={
          k: e.get(k)
          for k in (
              "splits",
              "corpus_size",
              "max_queries",
              "engine",
              "doc_len",
              "batch_size",
          )
      },
      modes=[bool(m) for m in modes],
      max_new_tokens=int(max_new_tokens),
      model={
          k: cfg.get(k)
          for k in ("compute_dtype", "param_dtype", "attention", "mesh")
      },
  )
  # Tuples and lists alike, as config.json has them.
  return json.loads(json.dumps(settings))


def final_evaluation(
    cfg_from, workdir_from: str, cfg_to, stage_from, stage_to
) -> Optional[tuple[dict[str, float], list[dict]]]:
  """The evaluation a finished run (`cfg_from` in `workdir_from`) logged at
  its last step, with its samples, when a run of `cfg_to` starting from
  that step's parameters would evaluate them with the same settings; else
  None. Every process must find it for any to use it."""
  found = None
  settings = [
      getattr(cls, "evaluation_settings", None)
      for cls in (stage_from, stage_to)
  ]
  if all(settings) and settings[0](cfg_from) == settings[1](cfg_to):
    last = int(cfg_from.total_steps)
    row = None
    path = os.path.join(workdir_from, "metrics.jsonl")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          if line.strip():
            r = json.loads(line)
            if r.get("kind") == "eval" and r.get("step") == last:
              row = r
    if row is not None:
      flat = {
          k: float(v)
          for k, v in row.items()
          if k not in ("step", "kind", "time", "eval_seconds")
      }
      samples = []
      spath = os.path.join(workdir_from, "samples", f"step_{last}.jsonl")
      if os.path.exists(spath):
        with open(spath, encoding="utf-8") as f:
          samples = [json.loads(line) for line in f if line.strip()]
      found = (flat, samples)
  if not all(distributed.allgather(found is not None)):
    return None
  return found


def finished_steps(workdir: str) -> int:
  """The newest checkpointed step of a workdir whose files are complete
  (0: none, or no workdir); the workdir is only read."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return 0
  checkpoints = Checkpointer(workdir, keep=1, writer=False)
  try:
    return checkpoints.newest_good_step() or 0
  finally:
    checkpoints.close()


def _rejected_text(checkpoints: Checkpointer, rejected) -> str:
  return (
      f"no checkpoint in {checkpoints.directory} can be resumed from; it "
      "has "
      + "; ".join(f"step {step}: {why}" for step, _, why in rejected)
      + ". Nothing was moved: repair or remove them, or use a new --workdir"
  )


def _first_readable(checkpoints: Checkpointer, workdir: str, stage_cls):
  """The newest step whose files look complete (None: the workdir has no
  step).

  Raises:
    CheckpointError: it has steps, but none looks complete.
  """
  rejected = []
  for step in reversed(checkpoints.all_steps()):
    why = checkpoints.problem(step) or stage_cls.check_extra(workdir, step)
    if why is None:
      return step
    rejected.append((step, "incomplete", why))
  if rejected:
    raise CheckpointError(_rejected_text(checkpoints, rejected))
  return None


def _resume(
    checkpoints: Checkpointer, stage: Stage, workdir: str
) -> tuple[int, dict]:
  """Restores the newest step that reads into `stage`: newest first, a step
  whose files are incomplete or whose restore fails is passed over, and set
  aside once an older step has restored (a restore that fails for every
  step is the run's problem, not the steps'; nothing moves then).

  Returns:
    (step, data position); (0, {}) for a workdir without steps.

  Raises:
    CheckpointError: no step reads; the message lists each and why.
  """
  stage_cls = type(stage)
  rejected = []  # (step, tag, why), newest first
  for step in reversed(checkpoints.all_steps()):
    why = checkpoints.problem(step) or stage_cls.check_extra(workdir, step)
    if why is not None:
      rejected.append((step, "incomplete", why))
      continue
    try:
      state, position = checkpoints.restore(stage.state, step)
      stage.resume(position, step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      rejected.append((step, "unreadable", f"restore failed: {cause(e)}"))
      continue
    stage.state = state
    for bad, tag, why in rejected:
      dest = checkpoints.set_aside(
          bad, tag, why, stage_cls.extras(workdir, bad)
      )
      say(f"checkpoint step {bad} set aside in {dest}: {why}")
    return step, position
  if rejected:
    raise CheckpointError(_rejected_text(checkpoints, rejected))
  return 0, {}


def train(
    cfg,
    workdir: str,
    stage_cls: Callable[..., Stage],
    start_eval: Optional[tuple[dict[str, float], list[dict]]] = None,
) -> dict:
  """Runs `stage_cls(cfg, workdir)` to `cfg.total_steps`, holding the
  workdir's lock (one writer per workdir, `lock.py`); returns the last
  evaluation's flat figures ({} when none ran). `start_eval` (flat figures,
  samples), from `final_evaluation`, is logged as the step-0 evaluation
  of a fresh run instead of running it."""
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir, say=say):
    return _train(cfg, workdir, stage_cls, start_eval)


def _train(
    cfg, workdir: str, stage_cls: Callable[..., Stage], start_eval=None
) -> dict:
  checkpoints = Checkpointer(workdir, keep=cfg.keep_checkpoints)
  try:
    # Checked before the stage loads anything: a refused change, or a
    # workdir without a step to resume from, costs nothing.
    resuming = _first_readable(checkpoints, workdir, stage_cls) is not None
    write_config(
        cfg,
        workdir,
        resuming,
        stage_cls.resume_refuses,
        getattr(stage_cls, "resume_defaults", None),
    )
    stage = stage_cls(cfg, workdir)
    start, position = _resume(checkpoints, stage, workdir)
  except BaseException:
    checkpoints.close(raise_errors=False)
    raise
  say(stage.summary())
  writer = MetricWriter(workdir)
  samples_dir = os.path.join(workdir, "samples")
  # Rows a killed run logged past the step it resumes from go; with no
  # checkpoint, all of them (the run starts over).
  writer.truncate_after(start if start else -1)
  if start:
    say(
        f"resumed from {checkpoints.directory} at step {start}, data "
        f"position {position}"
    )

  def evaluate(step: int) -> dict:
    t = time.perf_counter()
    flat, samples = stage.evaluate(step)
    flat["eval_seconds"] = time.perf_counter() - t
    return record(step, flat, samples)

  def record(step: int, flat: dict, samples: list) -> dict:
    writer.write(step, flat, kind="eval")
    if samples and jax.process_index() == 0:
      os.makedirs(samples_dir, exist_ok=True)
      with open(
          os.path.join(samples_dir, f"step_{step}.jsonl"), "w", encoding="utf-8"
      ) as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    say(
        f"eval at step {step}: "
        + ", ".join(
            f"{k} {v:.4f}"
            for k, v in flat.items()
            if "ndcg" in k
            or "recall@10" in k
            or k.endswith("emitted")
            or k == "eval_seconds"
        )
    )
    return flat

  last_eval: dict = {}
  if start == 0 and cfg.eval.at_start:
    bm25 = stage.baseline()
    writer.write(0, bm25, kind="bm25")
    say("BM25 on the same documents: " + json.dumps(bm25))
    if start_eval is not None:
      say(
          "step-0 evaluation: the starting run's final one (the same "
          "parameters and evaluation settings), not computed again"
      )
      last_eval = record(0, dict(start_eval[0]), list(start_eval[1]))
    else:
      last_eval = evaluate(0)
  stage.prepare()

  bar = tqdm.tqdm(
      total=cfg.total_steps,
      initial=start,
      desc=stage.name,
      unit="step",
      disable=jax.process_index() != 0,
  )
  clock = {"t": time.perf_counter(), "tokens": 0}

  def finish(step: int, metrics: dict) -> None:
    """Reads one step's metrics (after the next was dispatched), guards,
    logs and moves the bar."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    guard_for(step, checkpoints)(values)
    clock["tokens"] += values.pop("tokens", 0)
    if step % cfg.log_every == 0 or step == cfg.total_steps - 1:
      now = time.perf_counter()
      if clock["tokens"]:
        values["tokens_per_s"] = clock["tokens"] / max(now - clock["t"], 1e-9)
      clock.update(t=now, tokens=0)
      writer.write(step, values)
    bar.set_postfix(stage.postfix(values))
    bar.update(1)

  def save(done: int) -> None:
    if not stage.update_is_finite():
      raise NonFiniteLossError(
          f"step {done}: the updated parameters' forward is not finite "
          "although the loss and gradient were; stopping. The last "
          f"checkpoint in {checkpoints.directory} is intact: step "
          f"{checkpoints.latest_step()}"
      )
    checkpoints.check()  # the previous save, before this one writes
    # The stage's extras (the environment) first: a checkpoint step always
    # has them.
    try:
      stage.save_extra(done)
    except Exception as e:
      where = ", ".join(stage_cls.extras(workdir, done).values())
      raise checkpoints.failure(
          done, f"{where or 'its extras'}: {cause(e)}"
      ) from e
    checkpoints.save(done, stage.state, stage.position())
    # Only what has no checkpoint on disk any more: a step orbax will drop
    # once this save is written is still the fallback if it is not.
    stage.prune_extra(
        set(checkpoints.all_steps()) | checkpoints.steps_on_disk() | {done}
    )

  pending: Optional[tuple[int, dict]] = None
  failed = True
  try:
    for step in range(start, cfg.total_steps):
      checkpoints.poll()  # a background write that failed stops the run
      metrics = stage.step(step, guard_for(step, checkpoints))
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      done = step + 1
      eval_due = (cfg.eval_every and done % cfg.eval_every == 0) or (
          done == cfg.total_steps
      )
      save_due = done % cfg.checkpoint_every == 0 or done == cfg.total_steps
      if eval_due or save_due:
        finish(*pending)  # never evaluate or save past an unchecked step
        pending = None
      if eval_due:
        last_eval = evaluate(done)
      if save_due:
        save(done)
    if pending is not None:
      finish(*pending)
    failed = False
  finally:
    bar.close()
    try:
      # Stopping on another error, a failed save is said, not raised.
      checkpoints.close(raise_errors=not failed)
      if not failed:  # the last save is written: orbax removed what it drops
        stage.prune_extra(
            set(checkpoints.all_steps()) | checkpoints.steps_on_disk()
        )
    finally:
      writer.close()
      write_run_plots(workdir)
  return last_eval
