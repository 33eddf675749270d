"""One writer per workdir: a lock file held for the length of a run.

`<workdir>/run.lock` is created exclusively (O_CREAT | O_EXCL) and holds the
host, process id and start time of the run that holds it; it is removed when
the run ends, however it ends short of `kill -9`. A lock left behind by a
process that no longer runs on this host is stale: the next run says so and
takes it over. A lock held by a live process, or by another host (whose
processes cannot be checked from here), is refused with the holder named.
In a multi-process run process 0 takes the lock for the whole pod (the file
names the pod's size) and tells the others: a refused lock stops every
process with the same message.
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax

from search_r3_jax.core import distributed

FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir, say=print): ...`."""

  def __init__(self, workdir: str, say=print):
    self.path = os.path.join(workdir, FILE)
    self.say = say
    self.held = False

  def _holder(self) -> dict:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    refused = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirLockedError as e:
        refused = str(e)
    # Every process of a pod learns process 0's outcome: none runs on a
    # workdir the pod does not hold.
    refused = distributed.broadcast(refused)
    if refused is not None:
      raise WorkdirLockedError(refused)
    return self

  def _acquire(self) -> None:
    me = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        processes=jax.process_count(),
    )
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if same_host and pid == me["pid"]:
          return  # this process holds it already (the main job's chain)
        if same_host and isinstance(pid, int) and not _alive(pid):
          self.say(
              f"{self.path}: stale lock of process {pid} (started "
              f"{holder.get('started')}, no longer running); taking it over"
          )
          os.remove(self.path)
          continue
        raise WorkdirLockedError(
            f"{os.path.dirname(self.path)} is in use by another run: host "
            f"{holder.get('host')}, process {pid}"
            + (
                f" (process 0 of a pod of {holder['processes']})"
                if (holder.get("processes") or 1) > 1
                else ""
            )
            + f", started "
            f"{holder.get('started')} ({self.path}). Wait for it, or remove "
            "the lock file if that run is gone."
        ) from None
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
      self.held = True
      return
    raise WorkdirLockedError(f"{self.path}: could not take the lock")

  def release(self) -> None:
    if self.held:
      self.held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
