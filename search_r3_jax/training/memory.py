"""What a training step needs per device, known before anything is allocated.

The step is lowered and compiled ahead of time from abstract shapes
(`jax.ShapeDtypeStruct`s carrying the shardings the run will use): the
parameters of the model config, the optimizer state `tx.init` would make,
the frozen reference, and one batch. The report gives, per device, the
bytes of each of those (their shard sizes) and XLA's own account of the
compiled step (`compiled.memory_analysis()`: arguments, outputs, the
temporaries its buffers need, generated code). A run with a limit
(`max_device_gib`, else the device's own `bytes_limit` where the backend
reports one) stops before loading the model when the estimated peak
exceeds it, naming the figures.

The peak is arguments + temporaries + generated code + the outputs not
aliased to donated arguments: the state is donated, so the new state reuses
the old one's buffers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.errors import UserError
from search_r3_jax.training.train_state import opt_state_shardings
from search_r3_jax.training.train_state import TrainState

GIB = 2**30


class DoesNotFit(UserError):
  """The step needs more memory per device than the limit allows (a
  setting to change: the programs print it in one line, exit status 2)."""


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded (abstract or concrete)
  arrays: the largest shard total over the mesh's devices."""
  totals: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    sharding = x.sharding
    itemsize = jnp.dtype(x.dtype).itemsize
    for device, index in sharding.devices_indices_map(tuple(x.shape)).items():
      shape = [
          len(range(*s.indices(d))) if isinstance(s, slice) else 1
          for s, d in zip(index, x.shape)
      ]
      totals[device] = totals.get(device, 0) + math.prod(shape) * itemsize
  return max(totals.values(), default=0)


def element_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class MemoryReport:
  """Per-device bytes of one compiled training step.

  Attributes:
    step: which step ("stage 1", "stage 2 update").
    devices, platform: where it was compiled for.
    parameters, optimizer, reference, batch: bytes of each on one device.
    param_count: the model's parameters (elements, all devices together).
    arguments, outputs, aliased, temporaries, code: XLA's memory analysis
      of the compiled step, per device (None where the backend gives none).
    limit: bytes per device the run may use, or None.
  """

  step: str
  devices: int
  platform: str
  parameters: int
  optimizer: int
  reference: int
  batch: int
  param_count: int
  arguments: Optional[int] = None
  outputs: Optional[int] = None
  aliased: Optional[int] = None
  temporaries: Optional[int] = None
  code: Optional[int] = None
  limit: Optional[int] = None

  @property
  def peak(self) -> int:
    """Estimated bytes per device while the step runs."""
    if self.arguments is None:
      return self.parameters + self.optimizer + self.reference + self.batch
    return (
        self.arguments
        + (self.temporaries or 0)
        + (self.code or 0)
        + max((self.outputs or 0) - (self.aliased or 0), 0)
    )

  def text(self) -> str:
    g = lambda b: "n/a" if b is None else f"{b / GIB:.3f} GiB"
    parts = [
        f"memory per device, {self.step} ({self.devices} {self.platform} "
        f"devices, {self.param_count:,} parameters):",
        f"parameters {g(self.parameters)}",
        f"optimizer state {g(self.optimizer)}",
        f"reference {g(self.reference)}",
        f"batch {g(self.batch)}",
        f"temporaries {g(self.temporaries)}",
        f"code {g(self.code)}",
        f"peak about {g(self.peak)}",
        f"limit {g(self.limit)}" if self.limit else "no limit known",
    ]
    return parts[0] + " " + ", ".join(parts[1:])

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), peak=self.peak)

  def check(self) -> None:
    """Raises `DoesNotFit` when the peak exceeds the limit."""
    if self.limit and self.peak > self.limit:
      raise DoesNotFit(
          f"the {self.step} step needs about {self.peak / GIB:.2f} GiB per "
          f"device, over the limit of {self.limit / GIB:.2f} GiB: "
          + self.text()
          + ". Shard further (mesh), lower the batch or sequence lengths, "
          "or set remat, attention=dot_product, rl.logprob_chunk, "
          "param_dtype=bfloat16"
      )


def device_limit(max_device_gib: float = 0.0) -> Optional[int]:
  """`max_device_gib` in bytes, else the first device's own limit where the
  backend reports one (GPU, TPU), else None (CPU)."""
  if max_device_gib:
    return int(float(max_device_gib) * GIB)
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return stats.get("bytes_limit") or None


def _with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      shardings,
  )


def abstract_train_state(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    with_reference: bool,
    rules: shd.Rules = shd.DEFAULT_RULES,
):
  """(graphdef, abstract TrainState, its shardings) of a model of `cfg`:
  what `train_state.create_train_state` would build, without allocating."""
  from search_r3_jax.core.weights.convert import abstract_model

  graphdef, abstract = abstract_model(cfg)
  param_sh = shd.state_shardings(abstract, mesh, rules)
  params = _with_shardings(abstract, param_sh)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_sh = opt_state_shardings(tx, params, param_sh, mesh)
  replicated = NamedSharding(mesh, P())
  state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      params=params,
      opt_state=_with_shardings(opt_abstract, opt_sh),
      ref_params=params if with_reference else None,
  )
  shardings = TrainState(
      step=replicated,
      params=param_sh,
      opt_state=opt_sh,
      ref_params=param_sh if with_reference else None,
  )
  return graphdef, state, shardings


def abstract_batch(
    shapes: Mapping[str, tuple], dtypes: Mapping[str, Any], shardings
) -> dict:
  return {
      k: jax.ShapeDtypeStruct(tuple(shape), dtypes[k], sharding=shardings[k])
      for k, shape in shapes.items()
  }


def report(
    step_name: str,
    jitted,
    args: tuple,
    state: TrainState,
    batch: Mapping,
    limit: Optional[int] = None,
):
  """Compiles `jitted` for `args` (abstract) and reports per device.

  Returns:
    (MemoryReport, the compiled step).
  """
  compiled = jitted.lower(*args).compile()
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend without it)
    stats = None
  get = lambda name: None if stats is None else int(getattr(stats, name))
  mesh_devices = {
      d for x in jax.tree.leaves(state.params) for d in x.sharding.device_set
  }
  r = MemoryReport(
      step=step_name,
      devices=len(mesh_devices),
      platform=next(iter(mesh_devices)).platform,
      parameters=per_device_bytes(state.params),
      optimizer=per_device_bytes(state.opt_state),
      reference=per_device_bytes(state.ref_params),
      batch=per_device_bytes(dict(batch)),
      param_count=element_count(state.params),
      arguments=get("argument_size_in_bytes"),
      outputs=get("output_size_in_bytes"),
      aliased=get("alias_size_in_bytes"),
      temporaries=get("temp_size_in_bytes"),
      code=get("generated_code_size_in_bytes"),
      limit=limit,
  )
  return r, compiled


def reuse_compiled(planned, model_cfg: ModelConfig, state, jitted):
  """The step compiled for the report where the loaded model and its state
  are what was planned (same config, same shardings), so the step is not
  compiled twice; else `jitted`.

  Args:
    planned: (the planned ModelConfig, the compiled step, the abstract
      state's shardings).
  """
  planned_cfg, compiled, planned_sh = planned
  if planned_cfg != model_cfg:
    return jitted
  arrays, planned_leaves = jax.tree.leaves(state), jax.tree.leaves(planned_sh)
  if jax.tree.structure(state) != jax.tree.structure(planned_sh):
    return jitted
  same = all(
      x.sharding.is_equivalent_to(s, x.ndim)
      for x, s in zip(arrays, planned_leaves)
  )
  return compiled if same else jitted
