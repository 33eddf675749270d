"""Device mesh and logical-axis sharding rules.

Parameters are annotated with logical axis names (`embed`, `mlp`, `heads`,
`kv_heads`, `vocab`, ...); a rules table maps each name to mesh axes of the
`('data', 'fsdp', 'tensor')` mesh. A dimension that a mesh axis does not divide
stays replicated on that axis (with prime-sized test models this is common),
so any model runs on any mesh.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable, Optional, Sequence, Union

from flax import nnx
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(
    shape: Union[Sequence[int], dict] = (1, -1, 1),
    axis_names: Sequence[str] = MESH_AXES,
    devices: Optional[Sequence[jax.Device]] = None,
) -> Mesh:
  """Builds a mesh; one entry of `shape` may be -1, meaning "the rest".

  Args:
    shape: sizes per axis, as a sequence or a dict keyed by axis name.
    axis_names: mesh axis names.
    devices: devices to use (default: all).
  """
  if isinstance(shape, dict):
    unknown = set(shape) - set(axis_names)
    if unknown:
      raise ValueError(
          f"mesh shape names unknown axes {sorted(unknown)}; "
          f"axes are {list(axis_names)}"
      )
    shape = [shape.get(a, 1) for a in axis_names]
  shape = [int(s) for s in shape]
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} does not match axes {axis_names}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh shape {shape} does not divide {n} devices")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(
        f"mesh shape {shape} needs {math.prod(shape)} devices, " f"have {n}"
    )
  arr = np.asarray(devices).reshape(shape)
  mesh = Mesh(arr, tuple(axis_names))
  if jax.process_count() > 1:
    _log_mesh(mesh)
  return mesh


_logged_meshes: set = set()


def _log_mesh(mesh: Mesh) -> None:
  """Each process of a pod says, once per mesh, its shape and which of its
  devices the process holds."""
  key = tuple(mesh.shape.items())
  if key in _logged_meshes:
    return
  _logged_meshes.add(key)
  mine = sorted(
      int(i)
      for i, d in zip(range(mesh.devices.size), mesh.devices.flat)
      if d.process_index == jax.process_index()
  )
  print(
      f"process {jax.process_index()}/{jax.process_count()}: mesh "
      + " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
      + f", this process's devices at mesh positions {mine[0]}..{mine[-1]}",
      file=sys.stderr,
      flush=True,
  )


def _axes_of(rule_value) -> tuple[str, ...]:
  if rule_value is None:
    return ()
  if isinstance(rule_value, str):
    return (rule_value,)
  return tuple(rule_value)


def logical_to_spec(
    logical: Iterable[Optional[str]],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> P:
  """Maps logical axis names of an array of `shape` to a PartitionSpec.

  A mesh axis is used at most once, only if it has size > 1, and only where it
  divides the dimension; otherwise that dimension stays replicated on it.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    chosen = []
    size = 1
    for ax in _axes_of(table.get(name)) if name else ():
      if ax not in mesh.shape or ax in used or mesh.shape[ax] == 1:
        continue
      if dim % (size * mesh.shape[ax]):
        continue
      chosen.append(ax)
      size *= mesh.shape[ax]
    used.update(chosen)
    spec.append(
        None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    )
  return P(*spec)


def named(
    mesh: Mesh,
    logical: Iterable[Optional[str]],
    shape: Sequence[int],
    rules: Rules = DEFAULT_RULES,
) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def variable_logical_axes(var: nnx.Variable) -> tuple:
  axes = var.get_metadata().get("out_sharding")
  if axes is None:
    return (None,) * len(var.shape)
  return tuple(axes)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for every Variable of an (abstract) nnx State."""

  def one(var):
    if isinstance(var, nnx.Variable):
      return var.replace(
          named(mesh, variable_logical_axes(var), var.shape, rules)
      )
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(
    mesh: Mesh,
    ndim: int,
    rules: Rules = DEFAULT_RULES,
    batch_size: Optional[int] = None,
) -> NamedSharding:
  """Sharding of an activation or input whose leading axis is the batch."""
  axes = _axes_of(dict(rules).get("batch"))
  axes = tuple(a for a in axes if a in mesh.shape)
  if batch_size is not None:
    size = math.prod(mesh.shape[a] for a in axes)
    if batch_size % size:
      axes = ()
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_multiple(mesh: Optional[Mesh], rules: Rules = DEFAULT_RULES) -> int:
  """How many devices the batch axis is split over (pad batches to this)."""
  if mesh is None:
    return 1
  axes = _axes_of(dict(rules).get("batch"))
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
