"""Train state, optimizer and the sharded creation of both.

The state is a plain pytree (`TrainState`) so the step can be one pure,
jitted, donated function. Parameters are sharded by `sharding.py`'s rules,
optimizer moments like their parameters; the step is jitted with exactly
those shardings in and out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from search_r3_jax.core.config import OPTIMIZER_STATE_DTYPES
from search_r3_jax.core.model import Decoder


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


def scale_token_rows(
    token_ids: tuple[int, ...], factor: float
) -> optax.GradientTransformation:
  """Multiplies the updates of the given tokens' rows of the embedding
  table (`embed`, [V, D]) and columns of an untied output head (`lm_head`,
  [D, V]) by `factor`; every other update passes unchanged.

  A token added to the vocabulary (`<|embed_token|>`) starts as the mean
  row; under Adam every coordinate moves at most about the learning rate
  per step, so at a fine-tuning rate its logit climbs far too slowly to
  win where the training text puts it. A larger rate for its row alone
  lets it, without touching the rest of the model.
  """
  ids = jnp.asarray(token_ids, jnp.int32)

  def scale(path, u):
    # A parameter's path ends with its name, then (nnx) the `value` field.
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    name = keys[-2] if len(keys) > 1 and keys[-1] == "value" else keys[-1]
    if name == "embed" and u.ndim == 2:
      return u.at[ids].multiply(factor)
    if name == "lm_head" and u.ndim == 2:
      return u.at[:, ids].multiply(factor)
    return u

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


STATE_DTYPES = OPTIMIZER_STATE_DTYPES


class MasterState(NamedTuple):
  """`float32_master`'s state: float32 copies of the parameters and the
  inner optimizer's state over them."""

  master: Any
  inner: Any


def float32_master(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Runs `inner` on float32 master copies of the parameters.

  Parameters stored in bfloat16 (or float16) keep about 3 significant
  digits: an update below a parameter's rounding step (a fine-tuning rate
  of 1e-5 against weights of 1e-2 is one) is lost when added to it. Here
  the gradients are cast to float32, `inner` (and its moments) run on the
  float32 master, and the update handed back takes each parameter exactly
  to its master rounded to the parameter's dtype (it is float32, so
  `optax.apply_updates` adds it without rounding first).
  """
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init(params):
    master = f32(params)
    return MasterState(master, inner.init(master))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("float32_master needs the parameters")
    step, inner_state = inner.update(f32(updates), state.inner, state.master)
    master = optax.apply_updates(state.master, step)
    out = jax.tree.map(
        lambda m, p: m.astype(p.dtype).astype(jnp.float32)
        - p.astype(jnp.float32),
        master,
        params,
    )
    return out, MasterState(master, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: ml_collections.ConfigDict, embed_token_ids: tuple[int, ...] = ()
):
  """AdamW with linear warmup, cosine decay and global-norm clipping.

  Reads cfg.learning_rate, warmup_steps, total_steps, weight_decay, b1, b2,
  clip_norm, grad_accum_steps, `embed_token_lr_scale`: the learning
  rate of `embed_token_ids`' rows relative to the rest (`scale_token_rows`;
  1, or absent, leaves them alone), and `state_dtype`: "" (the moments in
  the parameters' dtype), "float32" (float32 moments over float32 master
  copies of the parameters, `float32_master`: for bfloat16 parameters) or
  "bfloat16" (the first moment stored in bfloat16; optax keeps the second
  in the parameters' dtype, so both are bfloat16 for bfloat16 parameters). Weight decay skips vectors
  (norms, biases).

  `warmup_steps` and `total_steps` count steps of the train loop; with
  gradient accumulation over k steps the optimizer updates every k-th step,
  so its schedule runs over total_steps / k updates.

  Returns:
    (optax transformation, learning-rate schedule as a function of the loop
    step).
  """
  k = max(int(cfg.grad_accum_steps), 1)
  warmup = max(int(cfg.warmup_steps) // k, 1)
  # Warmup starts at peak / warmup_steps rather than 0, so step 0 learns too.
  inner = optax.warmup_cosine_decay_schedule(
      init_value=cfg.learning_rate / warmup,
      peak_value=cfg.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(int(cfg.total_steps) // k, warmup + 1),
      end_value=cfg.learning_rate * cfg.get("end_lr_fraction", 0.1),
  )
  schedule = (lambda step: inner(step // k)) if k > 1 else inner
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  state_dtype = str(cfg.get("state_dtype", ""))
  if state_dtype not in STATE_DTYPES:
    raise ValueError(
        f"optimizer.state_dtype={state_dtype!r}; known: {STATE_DTYPES}"
    )
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(
          inner,
          b1=cfg.b1,
          b2=cfg.b2,
          weight_decay=cfg.weight_decay,
          mask=decay_mask,
          mu_dtype=jnp.bfloat16 if state_dtype == "bfloat16" else None,
      ),
  )
  row_scale = float(cfg.get("embed_token_lr_scale", 1.0))
  if row_scale != 1.0 and embed_token_ids:
    tx = optax.chain(tx, scale_token_rows(tuple(embed_token_ids), row_scale))
  if state_dtype == "float32":
    tx = float32_master(tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx, schedule


def create_train_state(model: Decoder, tx, mesh, with_reference: bool = True):
  """Splits `model` and builds its state on the mesh.

  Returns:
    (graphdef, state, state_shardings).
  """
  graphdef, params = nnx.split(model)
  opt_shardings = opt_state_shardings(tx, params, shardings_of(params), mesh)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    ref = (
        jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
        if with_reference
        else None
    )
  step = jax.device_put(
      jnp.zeros((), jnp.int32),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  state = TrainState(
      step=step, params=params, opt_state=opt_state, ref_params=ref
  )
  return graphdef, state, shardings_of(state)


def opt_state_shardings(tx, params, param_shardings, mesh):
  """Shardings of `tx.init(params)`: moments (and master copies) shaped like
  a parameter take that parameter's sharding, so FSDP covers them too;
  counters and the like are replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return optax.tree_map_params(
      tx,
      lambda _, sharding: sharding,
      jax.eval_shape(tx.init, params),
      param_shardings,
      transform_non_params=lambda _: replicated,
  )


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def gradient_step(state: TrainState, loss_fn, tx, schedule):
  """One optimizer update of `state` by the gradient of
  `loss_fn(params) -> (loss, parts)`; returns (new state, metrics)."""
  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(
      parts,
      loss=loss,
      grad_norm=optax.global_norm(grads),
      lr=schedule(state.step),
  )
  return (
      state.replace(step=state.step + 1, params=params, opt_state=opt_state),
      metrics,
  )
