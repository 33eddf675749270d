"""The memory report compiled ahead of time (`training/memory.py`), the
optimizer's state dtypes, and the 1.5B recipes compiled from abstract shapes
on the 8-device fake mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from search_r3_jax import config_check
from search_r3_jax.benchmarks.common import repo_config
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.weights.presets import QWEN2_5_1_5B_CONFIG
from search_r3_jax.training import memory
from search_r3_jax.training import stage1
from search_r3_jax.training import stage2
from search_r3_jax.training import train_state
from search_r3_jax.training.workdir import load_model
from search_r3_jax.training.workdir import planned_model

QWEN_PARAMS = 1_543_714_304  # Qwen2.5-1.5B, embedding tied to the head


def _device0_bytes(tree) -> int:
  d0 = jax.devices()[0]
  return sum(
      s.data.nbytes
      for x in jax.tree.leaves(tree)
      for s in x.addressable_shards
      if s.device == d0
  )


@pytest.fixture(scope="module")
def tiny_plan():
  cfg = repo_config("sft", "tiny")
  mesh = shd.make_mesh(tuple(cfg.mesh))
  model_cfg, tok = planned_model(cfg)
  report, compiled, planned_sh = stage1.plan_memory(
      cfg, model_cfg, mesh, tok.embed_token_id
  )
  return cfg, mesh, model_cfg, report, compiled, planned_sh


def test_report_equals_the_arrays_the_run_allocates(tiny_plan):
  """Planned from shapes alone, the per-device bytes of parameters,
  optimizer state and reference are those of the arrays the run then
  allocates on a device, and the planned config is the loaded model's."""
  cfg, mesh, model_cfg, report, _, _ = tiny_plan
  loaded = load_model(cfg, mesh)
  assert loaded.model.cfg == model_cfg
  _, state, _, _, _ = stage1.stage1_step(cfg, loaded, mesh)
  assert report.devices == 8
  assert report.parameters == _device0_bytes(state.params) > 0
  assert report.optimizer == _device0_bytes(state.opt_state) > 0
  assert report.reference == _device0_bytes(state.ref_params) > 0
  assert report.param_count == sum(
      x.size for x in jax.tree.leaves(state.params)
  )
  # XLA's own account holds at least the state and the batch.
  state_and_batch = (
      report.parameters + report.optimizer + report.reference + report.batch
  )
  assert report.arguments >= state_and_batch
  assert report.temporaries > 0
  assert report.peak >= report.arguments
  assert "parameters" in report.text() and "peak about" in report.text()


def test_the_compiled_step_is_the_jitted_one(tiny_plan):
  """The run takes the step compiled for the report (not compiled twice),
  and it gives the jitted step's loss and parameters."""
  cfg, mesh, model_cfg, _, compiled, planned_sh = tiny_plan
  loaded = load_model(cfg, mesh)  # each state is donated: two models
  _, s1, jitted, batch_sh, batcher = stage1.stage1_step(cfg, loaded, mesh)
  _, s2, _, _, _ = stage1.stage1_step(cfg, load_model(cfg, mesh), mesh)
  planned = (model_cfg, compiled, planned_sh)
  assert memory.reuse_compiled(planned, loaded.model.cfg, s1, jitted) is (
      compiled
  )
  # A model other than the planned one keeps the jitted step.
  other = loaded.model.cfg.replace(remat="full")
  assert memory.reuse_compiled(planned, other, s1, jitted) is jitted
  examples = [
      dict(query=f"who wrote {i}", positive=f"document {i}", negatives=["x"])
      for i in range(cfg.batch_size)
  ]
  host = batcher(examples)
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
  rng = jax.random.key(0)
  a, ma = compiled(s1, batch, rng)
  b, mb = jitted(s2, batch, rng)
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_a_run_that_cannot_fit_stops_before_loading(monkeypatch):
  cfg = repo_config("sft", "tiny")
  cfg.max_device_gib = 0.01
  monkeypatch.setattr(
      stage1, "load_model", lambda *a: pytest.fail("the model was loaded")
  )
  with pytest.raises(memory.DoesNotFit) as e:
    stage1.Stage1(cfg)
  msg = str(e.value)
  assert "stage 1 step needs about" in msg
  assert "over the limit of 0.01 GiB" in msg
  assert "optimizer state" in msg and "temporaries" in msg


def test_stage2_reports_before_loading(monkeypatch):
  cfg = repo_config("rl", "tiny")
  cfg.max_device_gib = 0.01
  monkeypatch.setattr(
      stage2, "load_model", lambda *a: pytest.fail("the model was loaded")
  )
  with pytest.raises(memory.DoesNotFit, match="stage 2 update step needs"):
    stage2.Stage2(cfg)


@pytest.mark.parametrize("recipe", ["qwen1.5b-v5e-8", "qwen1.5b-8xh100"])
def test_qwen_recipes_compile_on_8_devices(recipe):
  """Each 1.5B recipe's stage-1 step and stage-2 update compile (without
  running) on the 8-device fake mesh from Qwen2.5-1.5B's shapes; the
  reported parameters are the model's 1,543,714,304, split 8 ways."""
  for stage, name in ((1, "sft"), (2, "rl")):
    cfg = repo_config(name, recipe)
    config_check.check_config(cfg, "train")
    mesh = shd.make_mesh(tuple(cfg.mesh))
    model_cfg = ModelConfig.from_hf(QWEN2_5_1_5B_CONFIG).replace(
        param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        attention=cfg.attention,
        remat=cfg.remat,
    )
    if stage == 1:
      report = stage1.plan_memory(cfg, model_cfg, mesh, 151665)[0]
    else:
      report = stage2.plan_memory(cfg, model_cfg, mesh, seq_len=320)[0]
    assert report.param_count == QWEN_PARAMS
    width = jnp.dtype(cfg.param_dtype).itemsize
    # Every matrix is split over the 8 devices; only vectors (norms,
    # biases: under 200,000 elements) may be replicated.
    assert 0 <= report.parameters * 8 - QWEN_PARAMS * width < 8 * 200_000 * 4
    per_param = {"": 2 * width, "float32": 12, "bfloat16": 2 + width}[
        cfg.optimizer.state_dtype
    ]
    assert abs(report.optimizer * 8 - QWEN_PARAMS * per_param) < 8e6 * 12
    assert report.temporaries > 0 and report.peak > report.arguments


def test_float32_master_keeps_updates_bfloat16_would_lose():
  """AdamW at 1e-5 on bfloat16 parameters of 0.01 to 1: added directly,
  every update is below the rounding step and the parameters never move;
  with float32 master weights they are exactly float32 training rounded."""
  w = jnp.linspace(0.01, 1.0, 257, dtype=jnp.float32).astype(jnp.bfloat16)
  params = {"w": w}
  grads = [
      {
          "w": jnp.asarray(
              np.random.default_rng(i).normal(size=257), jnp.bfloat16
          )
      }
      for i in range(30)
  ]
  inner = lambda: optax.adamw(1e-5, weight_decay=0.0)

  def run(tx, p, grad_dtype=jnp.bfloat16):
    s = tx.init(p)
    for g in grads:
      g = jax.tree.map(lambda x: x.astype(grad_dtype), g)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  plain, _ = run(inner(), params)
  np.testing.assert_array_equal(np.asarray(plain["w"]), np.asarray(w))
  master, state = run(train_state.float32_master(inner()), params)
  assert master["w"].dtype == jnp.bfloat16
  assert state.master["w"].dtype == jnp.float32
  f32, _ = run(inner(), {"w": w.astype(jnp.float32)}, jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(master["w"]), np.asarray(f32["w"].astype(jnp.bfloat16))
  )
  np.testing.assert_array_equal(
      np.asarray(state.master["w"]), np.asarray(f32["w"])
  )
  assert (np.asarray(master["w"]) != np.asarray(w)).any()


def _opt_cfg(**kw):
  c = ml_collections.ConfigDict(
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
  c.update(kw)
  return c


def test_state_dtypes():
  p = {"w": jnp.ones((3, 5), jnp.bfloat16)}
  dtypes = lambda s: {x.dtype for x in jax.tree.leaves(s) if x.ndim == 2}
  tx, _ = train_state.make_optimizer(_opt_cfg(state_dtype="bfloat16"))
  assert dtypes(tx.init(p)) == {jnp.dtype(jnp.bfloat16)}
  tx, _ = train_state.make_optimizer(_opt_cfg(state_dtype="float32"))
  assert dtypes(tx.init(p)) == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="state_dtype='fp8'"):
    train_state.make_optimizer(_opt_cfg(state_dtype="fp8"))
  cfg = repo_config("sft", "tiny")
  cfg.optimizer.state_dtype = "fp8"
  with pytest.raises(config_check.SettingsError, match="optimizer.state_dtype"):
    config_check.check_config(cfg, "train")


def test_train_program_names_the_figures_in_one_line(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parent.parent
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "search_r3_jax.train",
          f"--config={root / 'configs' / 'sft.py'}:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.max_device_gib=0.01",
      ],
      cwd=root,
      env=dict(os.environ, XLA_FLAGS=""),  # one CPU device
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert out.returncode == 2, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error: the stage 1 step needs about ")
  assert "over the limit of 0.01 GiB" in lines[0]
  assert "memory per device, stage 1 (1 cpu devices" in out.stdout
