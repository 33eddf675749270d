"""Checkpoint save, restore and resume of a sharded train state."""

import jax
import ml_collections
import numpy as np

from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.weights import convert
from search_r3_jax.training import checkpoint
from search_r3_jax.training import train_state as ts

CFG = ModelConfig(
    vocab_size=131,
    hidden_size=44,
    intermediate_size=68,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
)
OPT = ml_collections.ConfigDict(
    dict(
        learning_rate=1e-3,
        warmup_steps=1,
        total_steps=10,
        weight_decay=0.0,
        b1=0.9,
        b2=0.95,
        clip_norm=1.0,
        grad_accum_steps=1,
    )
)


def _state(mesh, seed):
  model = convert.init_model(CFG, mesh, seed=seed)
  tx, _ = ts.make_optimizer(OPT)
  return ts.create_train_state(model, tx, mesh)[1]


def test_save_restore_round_trip(tmp_path, eight_device_mesh):
  state = _state(eight_device_mesh, seed=1)
  state = state.replace(step=state.step + 7)
  ck = checkpoint.Checkpointer(tmp_path, keep=2)
  ck.save(7, state, {"epoch": 1, "index": 42, "seed": 3})
  ck.wait()
  other = _state(eight_device_mesh, seed=2)  # same shapes, other values
  restored, data = ck.restore(other)
  assert data == {"epoch": 1, "index": 42, "seed": 3}
  assert int(restored.step) == 7
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  ck.close()


def test_keeps_the_latest_n_and_ignores_unfinished(tmp_path, one_device_mesh):
  state = _state(one_device_mesh, seed=0)
  ck = checkpoint.Checkpointer(tmp_path, keep=2)
  for step in (1, 2, 3):
    ck.save(step, state, {"index": step})
    ck.wait()
  assert ck.manager.all_steps() == [2, 3]
  ck.close()
  # A save cut short leaves a temporary directory that is not a checkpoint.
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123").mkdir()
  again = checkpoint.Checkpointer(tmp_path, keep=2)
  assert again.latest_step() == 3
  _, data = again.restore(state)
  assert data == {"index": 3}
  again.close()
