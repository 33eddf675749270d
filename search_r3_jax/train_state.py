"""Train state, optimizer and the sharded creation of both.

The state is a plain pytree (`TrainState`) so the step can be one pure,
jitted, donated function. Its shardings are read off the arrays after they
are created sharded (parameters from `sharding.py`'s rules, optimizer moments
by propagation from the parameters), and the step is jitted with exactly
those as in and out shardings.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from search_r3_jax.model import Decoder


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's parameters (an nnx State).
    opt_state: optax state.
    ref_params: frozen parameters of the reference model (the initial
      model), or None when no loss needs it.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any = None


def make_optimizer(cfg: ml_collections.ConfigDict):
  """AdamW with linear warmup, cosine decay and global-norm clipping.

  Reads cfg.learning_rate, warmup_steps, total_steps, weight_decay, b1, b2,
  clip_norm, grad_accum_steps. Weight decay skips vectors (norms, biases).

  Returns:
    (optax transformation, learning-rate schedule).
  """
  # Warmup starts at peak / warmup_steps rather than 0, so step 0 learns too.
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=cfg.learning_rate / max(int(cfg.warmup_steps), 1),
      peak_value=cfg.learning_rate,
      warmup_steps=max(int(cfg.warmup_steps), 1),
      decay_steps=max(int(cfg.total_steps), int(cfg.warmup_steps) + 1),
      end_value=cfg.learning_rate * cfg.get("end_lr_fraction", 0.1))
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule


def create_train_state(model: Decoder, tx, mesh,
                       with_reference: bool = True):
  """Splits `model` and builds its state on the mesh.

  Returns:
    (graphdef, state, state_shardings).
  """
  graphdef, params = nnx.split(model)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(params)
    ref = (jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
           if with_reference else None)
  step = jax.device_put(jnp.zeros((), jnp.int32),
                        jax.sharding.NamedSharding(
                            mesh, jax.sharding.PartitionSpec()))
  state = TrainState(step=step, params=params, opt_state=opt_state,
                     ref_params=ref)
  return graphdef, state, shardings_of(state)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)
