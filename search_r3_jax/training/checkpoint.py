"""Orbax checkpoints of the train state together with the data position.

A checkpoint is one step directory holding two items: `state` (the
TrainState, restored straight into its shardings) and `data` (the loader's
JSON position). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save (even `kill -9`) leaves the previous
checkpoint as the latest one; the half-written directory is never taken as a
checkpoint.

A save that fails (an unwritable directory, a full disk) is a
`CheckpointError` naming the step and the cause: raised by the save itself,
or, for the part orbax writes in the background, by `poll` (once the write
has ended), by the next `save` or by `close`, whichever comes first. `close`
always stops orbax's threads, so a failed save never keeps the process from
exiting.

Resume takes the newest step that reads: `problem` checks a step's files
(orbax's completion markers and metadata, the data position); a step that
fails the check, or whose restore fails, is moved by `set_aside` into
`<workdir>/set_aside/<step>-<why>/` (never deleted, and out of orbax's
sight) and the step before it is tried (`trainer._resume`).

Resume order, as the training programs use it: the workdir's newest good
checkpoint, else `init_from` (a model to start from), else the pretrained
model named by the config.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from search_r3_jax.training.runtime import say

SET_ASIDE = "set_aside"  # under the workdir, next to checkpoints/
COMMIT_MARKER = "commit_success.txt"  # orbax's: written last, before rename
# What orbax leaves in a finished step (orbax-checkpoint 0.12, OCDBT arrays);
# each item directory gets its own commit marker.
STEP_FILES = (
    COMMIT_MARKER,
    "_CHECKPOINT_METADATA",
    f"state/{COMMIT_MARKER}",
    "state/_METADATA",
    "state/manifest.ocdbt",
    f"data/{COMMIT_MARKER}",
    "data/metadata",  # the data position
)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of a workdir's can be
  resumed from; the message names the steps and the causes."""


def cause(error: BaseException) -> str:
  """One line for an exception: its type and the first line of its message
  (tensorstore's run to kilobytes of spec)."""
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ""
  if len(first) > 300:
    first = first[:300] + " ..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Checkpointer:
  """Async, keep-the-latest-N checkpoints under `workdir/checkpoints`.

  `writer=False` opens a workdir to read only (evaluation, export, a check
  of how far a run got): such a Checkpointer creates nothing and leaves
  the temporary directories alone, so reading a workdir while its run
  saves cannot break the save.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      keep: int = 3,
      async_save: bool = True,
      writer: bool = True,
  ):
    self.workdir = os.fspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        os.path.abspath(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=writer,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=writer,
            # Created in the background (orbax's default), a step directory
            # that cannot be made leaves orbax's writer threads waiting for
            # it for minutes, and the process cannot exit; created in
            # `save`, the failure is raised there.
            async_options=ocp.AsyncOptions(
                create_directories_asynchronously=False
            ),
        ),
    )
    self._writing: Optional[int] = None  # the step whose save is in flight
    self._last: Optional[int] = None  # the last step given to `save`
    self._failed = False  # a failed save was raised already

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def steps_on_disk(self) -> set[int]:
    """The steps whose directory is still there. Orbax forgets a step it
    will remove when the next save starts, but deletes its files only once
    that save is written: until then the old step is the one a resume falls
    back to, and keeps what goes with it."""
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return set()
    return {int(name) for name in names if name.isdigit()}

  # -- saving ----------------------------------------------------------------

  def save(self, step: int, state: Any, data_position: dict) -> None:
    """Starts saving (returns before the write finishes when async), once
    the previous save is known to be written.

    Raises:
      CheckpointError: this save could not start, or the previous one
        failed.
    """
    self.check()
    self._writing = self._last = step
    try:
      started = self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(data_position),
          ),
      )
    except Exception as e:
      self._writing = None
      raise self.failure(step, cause(e)) from e
    if not started:
      self._writing = None
      raise self.failure(
          step, f"orbax skipped it (its newest step is {self.latest_step()})"
      )

  def check(self) -> None:
    """Waits for the save in flight, if any, and checks its files.

    Raises:
      CheckpointError: it was not written.
    """
    step, self._writing = self._writing, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self.failure(step, cause(e)) from e
    problem = self.problem(step)
    if problem is not None:
      raise self.failure(
          step, f"orbax reported no error, but the step is {problem}"
      )

  wait = check

  def poll(self) -> None:
    """`check` once the save in flight has ended; never blocks on a write
    still going. Called every step, it stops a run within a step of a
    failed write rather than at the next save. In a multi-process run only
    `check` at the saves (where every process is) decides: processes
    polling at different moments could disagree."""
    if (
        self._writing is not None
        and jax.process_count() == 1
        and not self.manager.is_saving_in_progress()
    ):
      self.check()

  def failure(self, step: int, why: str) -> CheckpointError:
    """The error for a save of `step` that failed because of `why`."""
    self._failed = True
    done = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"checkpoint of step {step} could not be written: {why}. Stopping; "
        f"the newest complete checkpoint in {self.directory} is "
        + (f"step {done[-1]}" if done else "none")
    )

  def close(self, raise_errors: bool = True) -> None:
    """Waits for the save in flight and stops orbax's threads, whatever
    happened before (a thread left waiting keeps the process from exiting).

    Args:
      raise_errors: raise a failed save (else it is said: the caller is
        already stopping with another error).

    Raises:
      CheckpointError: the save in flight was not written.
    """
    error = None
    try:
      self.check()
    except CheckpointError as e:
      error = e
    # Orbax's close raises a failure again where an error was left in one
    # of its writers, and then stops half-way; the second call closes the
    # rest. A failure already raised is not raised twice.
    for _ in range(2):
      try:
        self.manager.close()
        break
      except Exception as e:  # pylint: disable=broad-exception-caught
        if error is None and not self._failed:
          error = self.failure(self._last, cause(e))
    if error is not None:
      if raise_errors:
        raise error
      say(f"error: {error}")

  # -- reading ---------------------------------------------------------------

  def problem(self, step: int) -> Optional[str]:
    """What keeps `step` from being resumed, read from its files alone
    (None: it looks complete). Truncated array data only shows when read:
    `restore` raises then."""
    d = os.path.join(self.directory, str(step))
    if not os.path.isdir(d):
      return "missing"
    missing = [n for n in STEP_FILES if not os.path.isfile(os.path.join(d, n))]
    if missing:
      return "incomplete: no " + ", ".join(missing)
    try:
      meta = _read_json(os.path.join(d, "_CHECKPOINT_METADATA"))
      _read_json(os.path.join(d, "state", "_METADATA"))
      position = _read_json(os.path.join(d, "data", "metadata"))
    except (OSError, ValueError) as e:
      return f"unreadable: {cause(e)}"
    if not isinstance(meta, dict) or not meta.get("commit_timestamp_nsecs"):
      return "incomplete: no commit recorded in _CHECKPOINT_METADATA"
    if not isinstance(position, dict) or not position:
      return f"no data position: data/metadata holds {position!r}"
    return None

  def newest_good_step(self) -> Optional[int]:
    """The newest step `problem` finds nothing wrong with."""
    for step in reversed(self.all_steps()):
      if self.problem(step) is None:
        return step
    return None

  def set_aside(
      self,
      step: int,
      tag: str,
      reason: str,
      extras: Optional[Mapping[str, str]] = None,
  ) -> str:
    """Moves step `step`'s directory (and `extras`, {name: path}, e.g. its
    environment) into `<workdir>/set_aside/<step>-<tag>/` with the reason
    in reason.txt, out of orbax's sight; nothing is deleted.

    Returns:
      The folder it went to.
    """
    root = os.path.join(self.workdir, SET_ASIDE)
    dest, n = os.path.join(root, f"{step}-{tag}"), 1
    while os.path.exists(dest):  # the same step set aside again
      n += 1
      dest = os.path.join(root, f"{step}-{tag}.{n}")
    if jax.process_index() == 0:
      os.makedirs(dest)
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.rename(src, os.path.join(dest, "checkpoint"))
      for name, path in (extras or {}).items():
        if os.path.exists(path):
          os.rename(path, os.path.join(dest, name))
      with open(os.path.join(dest, "reason.txt"), "w", encoding="utf-8") as f:
        f.write(f"step {step}: {reason}\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self.manager.reload()
    return dest

  def restore(
      self, state_like: Any, step: Optional[int] = None
  ) -> tuple[Any, dict]:
    """Restores into arrays shaped and sharded like `state_like`.

    Returns:
      (state, data position).
    """
    step = self._step(step)
    target = _abstract(state_like)
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        ),
    )
    return out["state"], dict(out["data"])

  def restore_params(self, params_like: Any, step: Optional[int] = None) -> Any:
    """Restores only the state's `params` (no optimizer state, no reference
    copy), into arrays shaped and sharded like `params_like`: what loading a
    trained model for inference needs, at a quarter of the memory."""
    step = self._step(step)
    target = _abstract(params_like)
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target
    )
    out = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": restore_args},
                partial_restore=True,
            )
        ),
    )
    got = jax.tree.leaves(out["state"]["params"])
    want = jax.tree.leaves(target)
    if len(got) != len(want) or any(
        g.shape != w.shape for g, w in zip(got, want)
    ):
      raise ValueError(
          f"{self.directory} step {step}: the checkpoint's parameters do not "
          "match the model its config describes"
      )
    return jax.tree.unflatten(jax.tree.structure(target), got)

  def _step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return step


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`'s arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree,
  )
