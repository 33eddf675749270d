"""Many processes, one program: JAX's multi-controller start and the few
host-side exchanges the programs need.

Every process of a pod runs the same program. `initialize` starts JAX's
distributed runtime before anything touches a device:

  * explicitly, with `--coordinator=HOST:PORT --num_processes=N
    --process_id=I` (or SEARCH_R3_COORDINATOR, SEARCH_R3_NUM_PROCESSES,
    SEARCH_R3_PROCESS_ID), as `launch/local_pod.sh` starts a local pod;
  * by itself, JAX's own detection: with `--distributed=on` (or
    SEARCH_R3_DISTRIBUTED=on, as the TPU and GPU launchers set) on a Cloud
    TPU VM slice, where the peers come from the VM's metadata; and with the
    default `auto` wherever the environment names them
    (TPU_WORKER_HOSTNAMES, Slurm, Open MPI, JAX_COORDINATOR_ADDRESS);
  * not at all on one machine without those (`--distributed=off` forces it).

On the CPU the processes talk over gloo collectives, so a pod of local
processes with fake CPU devices stands in for a TPU pod.

Host arrays cross to and from arrays that span every process's devices here:
`put_global` (each process gives the same full host array and places its own
devices' slices), `to_host` (the full value of a global array, gathered where
it spans other processes), and `allgather` / `broadcast` of small JSON
objects (counts, data positions, query texts).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from absl import flags
import jax
import numpy as np

from search_r3_jax.core.errors import UserError

DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Start JAX's multi-process runtime: auto where --coordinator (or "
    "SEARCH_R3_COORDINATOR) is given or the environment names the peers "
    "(TPU_WORKER_HOSTNAMES, Slurm, Open MPI, JAX_COORDINATOR_ADDRESS); on "
    "always, JAX finding the peers itself (a Cloud TPU VM slice); off never "
    "(also SEARCH_R3_DISTRIBUTED).",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    "HOST:PORT of process 0's coordinator, for an explicit start (also "
    "SEARCH_R3_COORDINATOR).",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Processes in the run, with --coordinator (also SEARCH_R3_NUM_PROCESSES).",
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process, 0 .. num_processes - 1, with --coordinator (also "
    "SEARCH_R3_PROCESS_ID).",
)

ENV_PREFIX = "SEARCH_R3_"

# Variables by which a cluster tells JAX who the peers are (JAX's own
# detection reads them); one of these with more than one task means a pod.
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")

_started = False


def _setting(flag, env: str, cast):
  if flag.value is not None:
    return flag.value
  value = os.environ.get(ENV_PREFIX + env)
  if value in (None, ""):
    return None
  try:
    return cast(value)
  except ValueError:
    raise UserError(f"{ENV_PREFIX}{env}={value!r} is not a {cast.__name__}")


def explicit_settings() -> Optional[tuple[str, int, int]]:
  """(coordinator, num_processes, process_id) from the flags or the
  environment; None when no coordinator is given.

  Raises:
    UserError: a coordinator without the process count or id, or an id out
      of range.
  """
  coordinator = _setting(COORDINATOR, "COORDINATOR", str)
  n = _setting(NUM_PROCESSES, "NUM_PROCESSES", int)
  i = _setting(PROCESS_ID, "PROCESS_ID", int)
  if coordinator is None:
    if n is not None or i is not None:
      raise UserError(
          "--num_processes and --process_id need --coordinator=HOST:PORT "
          "(or SEARCH_R3_COORDINATOR)"
      )
    return None
  if n is None or i is None:
    raise UserError(
        f"--coordinator={coordinator} needs --num_processes and --process_id "
        "(or SEARCH_R3_NUM_PROCESSES and SEARCH_R3_PROCESS_ID)"
    )
  if ":" not in coordinator:
    raise UserError(f"--coordinator={coordinator}: give HOST:PORT")
  if n < 1 or not 0 <= i < n:
    raise UserError(
        f"--process_id={i} with --num_processes={n}: the id must be in "
        f"0 .. {n - 1}"
    )
  return coordinator, n, i


def cluster_detected(environ=os.environ) -> bool:
  """Whether the environment describes a multi-host job JAX can join by
  itself."""
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return True
  for name in _CLUSTER_SIZES:
    try:
      if int(environ.get(name, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def initialize(log=None) -> bool:
  """Starts JAX's distributed runtime as the flags and environment say
  (once per process; later calls do nothing). Returns whether it runs
  with more than one process."""
  global _started
  if _started:
    return jax.process_count() > 1
  # The flag, else SEARCH_R3_DISTRIBUTED (the launchers set it), else auto.
  mode = DISTRIBUTED.value
  if not DISTRIBUTED.present and os.environ.get(ENV_PREFIX + "DISTRIBUTED"):
    mode = os.environ[ENV_PREFIX + "DISTRIBUTED"]
    if mode not in ("auto", "on", "off"):
      raise UserError(f"{ENV_PREFIX}DISTRIBUTED={mode!r}: give auto, on or off")
  explicit = explicit_settings()
  if mode == "off":
    if explicit is not None:
      raise UserError("--distributed=off with --coordinator: choose one")
    _started = True
    return False
  if explicit is None and mode == "auto" and not cluster_detected():
    _started = True
    return False
  # CPU devices talk over gloo; accelerators use their own interconnect.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit is not None:
    coordinator, n, i = explicit
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=n, process_id=i
    )
  else:
    jax.distributed.initialize()
  _started = True
  (log or _log)(describe())
  return jax.process_count() > 1


def describe() -> str:
  """`process i/n: L local devices (...) of G global`."""
  local = jax.local_devices()
  kinds = sorted({d.platform for d in local})
  ids = [d.id for d in local]
  return (
      f"process {jax.process_index()}/{jax.process_count()}: {len(local)} "
      f"local {'/'.join(kinds)} devices (ids {_ranges(ids)}) of "
      f"{jax.device_count()} global"
  )


def _ranges(ids: Sequence[int]) -> str:
  ids = sorted(ids)
  if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
    return f"{ids[0]}..{ids[-1]}"
  return ",".join(map(str, ids))


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


# ------------------------------------------------------------ host arrays


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """The host array `x` (the same on every process) as an array laid out by
  `sharding`; each process places only its own devices' slices."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _leaf_to_host(x):
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return jax.device_get(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: Any) -> Any:
  """`jax.device_get` for arrays that may span other processes: each leaf's
  full value on every process (gathered where this process holds only part
  of it). A collective: every process must call it with the same tree."""
  return jax.tree.map(_leaf_to_host, tree)


def allgather(obj: Any) -> list:
  """Every process's `obj` (JSON-serialisable), in process order, on every
  process. A collective."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64))
  width = int(np.max(sizes))
  padded = np.zeros((width,), np.uint8)
  padded[: len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [
      json.loads(bytes(rows[p, : int(sizes[p][0])]).decode("utf-8"))
      for p in range(jax.process_count())
  ]


def gather(x: np.ndarray) -> np.ndarray:
  """[P, ...]: every process's host array `x` (all of one shape and dtype),
  in process order, on every process. A collective."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x))


def together(work: Callable[[], Any], what: str) -> None:
  """Runs `work` on every process; if it raises on any, every process
  raises one OSError naming each process that failed and why, so no
  process is left waiting at the next collective. A collective. On one
  process the error itself propagates."""
  failed = None
  try:
    work()
  except Exception as e:  # pylint: disable=broad-exception-caught
    if jax.process_count() == 1:
      raise
    failed = f"process {jax.process_index()} could not {what}: {e}"
  problems = [f for f in allgather(failed) if f]
  if problems:
    raise OSError("; ".join(problems))


def broadcast(obj: Any) -> Any:
  """Process 0's `obj` (JSON-serialisable) on every process. A collective."""
  if jax.process_count() == 1:
    return obj
  return allgather(obj if jax.process_index() == 0 else None)[0]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def interleave(parts: Sequence[Sequence[Any]]) -> list:
  """The global batch from every process's local batch (`allgather` of
  them), in the order one process reading the whole split would have drawn
  it: process p reads records p, p + n, p + 2n, ... of each epoch
  (`data.loader.Loader`), so row j of process p is global row j * n + p."""
  n = len(parts)
  if len({len(p) for p in parts}) > 1:
    raise ValueError(
        f"local batches differ in size across processes: "
        f"{[len(p) for p in parts]}"
    )
  return [
      parts[p][j]
      for j in range(len(parts[0]) if parts else 0)
      for p in range(n)
  ]


def process_rows(
    sharding: jax.sharding.Sharding, shape: Sequence[int]
) -> slice:
  """The rows (leading axis) of a global array of `shape` laid out by
  `sharding` that this process's devices hold: what it gives
  `jax.make_array_from_process_local_data`.

  Raises:
    ValueError: this process's rows are not one contiguous block (a mesh
      whose batch axes interleave processes).
  """
  spans = sorted(
      {
          (idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
          for idx in sharding.addressable_devices_indices_map(
              tuple(shape)
          ).values()
      }
  )
  start, stop = spans[0]
  for a, b in spans[1:]:
    if a > stop:
      raise ValueError(
          f"process {jax.process_index()} holds rows {spans} of {shape[0]}: "
          "not one block; order the mesh's batch axes by process"
      )
    stop = max(stop, b)
  return slice(start, stop)


def local_rows(x: jax.Array) -> np.ndarray:
  """The rows (leading axis) of `x` that this process's devices hold, in
  order, each once: a process's share of a batch it built with
  `jax.make_array_from_process_local_data`."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  blocks = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0 if shard.index else 0
    blocks.setdefault(start, shard)
  first = process_rows(x.sharding, x.shape)
  out = np.concatenate(
      [np.asarray(blocks[k].data) for k in sorted(blocks)], axis=0
  )
  if out.shape[0] != first.stop - first.start:
    raise ValueError(
        f"process {jax.process_index()}: rows {first} of {x.shape} came back "
        f"as {out.shape[0]}"
    )
  return out
