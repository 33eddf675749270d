"""Orbax checkpoints of the train state together with the data position.

A checkpoint is one step directory holding two items: `state` (the
TrainState, restored straight into its shardings) and `data` (the loader's
JSON position). Orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save (even `kill -9`) leaves the previous
checkpoint as the latest one; the half-written directory is never taken as a
checkpoint.

Resume order, as the training programs use it: the workdir's latest
checkpoint, else `init_from` (a model to start from), else the pretrained
model named by the config.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async, keep-the-latest-N checkpoints under `workdir/checkpoints`."""

  def __init__(
      self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True
  ):
    self.directory = os.path.join(os.fspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        os.path.abspath(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict) -> None:
    """Starts saving (returns before the write finishes when async)."""
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position),
        ),
    )

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`'s arrays: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree,
  )
