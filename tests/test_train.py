"""The stage-1 program end to end on configs/sft.py:tiny: outputs, resume
after kill -9 at the same step and data position, and the non-finite guard."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cmd(workdir, *overrides):
  return [
      sys.executable,
      "-m",
      "search_r3_jax.train",
      f"--config={ROOT / 'configs' / 'sft.py'}:tiny",
      f"--workdir={workdir}",
      "--config.total_steps=8",
      "--config.checkpoint_every=2",
      "--config.eval_every=100",
      *overrides,
  ]


def _run(workdir, *overrides, check=True):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, like a laptop
  return subprocess.run(
      _cmd(workdir, *overrides),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=check,
  )


def _train_rows(workdir):
  """step -> the last logged train metrics of that step."""
  rows = {}
  with open(workdir / "metrics.jsonl") as f:
    for line in f:
      row = json.loads(line)
      if row["kind"] == "train":
        rows[row["step"]] = row
  return rows


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: the reference for resumed ones."""
  workdir = tmp_path_factory.mktemp("straight")
  _run(workdir)
  return workdir


def test_outputs(straight):
  cfg = json.loads((straight / "config.json").read_text())
  assert cfg["total_steps"] == 8 and cfg["batch_size"] == 4
  rows = _train_rows(straight)
  assert sorted(rows) == list(range(8))
  for k in ("loss", "sft", "kl", "infonce", "triplet", "lr", "grad_norm"):
    assert np.isfinite(rows[7][k]), k
  evals = [
      json.loads(l) for l in open(straight / "metrics.jsonl") if '"eval"' in l
  ]
  assert evals and 0 <= evals[-1]["dev_sub/ndcg@10"] <= 1
  assert (straight / "plots" / "train.png").stat().st_size > 1000
  assert any((straight / "tb").iterdir())
  steps = sorted(
      int(p.name)
      for p in (straight / "checkpoints").iterdir()
      if p.name.isdigit()
  )
  assert steps == [4, 6, 8]  # keep the latest 3


def test_resume_after_kill_9_continues_exactly(straight, tmp_path):
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.Popen(
      _cmd(tmp_path),
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  marker = tmp_path / "checkpoints" / "4" / "commit_success.txt"
  deadline = time.time() + 300
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), "the run never reached its step-4 checkpoint"
  killed_at = max(_train_rows(tmp_path))
  assert killed_at < 7, "the run finished before it could be killed"
  out = _run(tmp_path)
  assert "resumed from" in out.stderr + out.stdout
  want, got = _train_rows(straight), _train_rows(tmp_path)
  assert sorted(got) == list(range(8))
  for step in range(8):  # same data, same state: the same losses
    assert got[step]["loss"] == pytest.approx(
        want[step]["loss"], rel=1e-5, abs=1e-6
    ), step


def test_non_finite_loss_stops_with_last_checkpoint_intact(tmp_path):
  """An InfoNCE temperature of 0 makes the loss itself non-finite."""
  out = _run(
      tmp_path,
      "--config.loss.tau=0.0",
      "--config.checkpoint_every=1",
      check=False,
  )
  assert out.returncode != 0
  assert "loss is nan" in out.stderr.lower() or "loss is inf" in (
      out.stderr.lower()
  )
  assert "is intact: step None" in out.stderr
  assert "Traceback" not in out.stderr
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_exploding_update_stops_before_it_is_saved(straight, tmp_path):
  """Learning rate 1e12 without clipping, resumed from a healthy run: the
  update's loss and gradient were finite, so only the forward with the
  updated parameters can stop it, before they are saved."""
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  out = _run(
      workdir,
      "--config.total_steps=10",
      "--config.checkpoint_every=1",
      "--config.optimizer.learning_rate=1e12",
      "--config.optimizer.clip_norm=1e30",
      check=False,
  )
  assert out.returncode != 0
  assert "updated parameters' forward is not finite" in out.stderr, out.stderr[
      -2000:
  ]
  assert "is intact: step 8" in out.stderr
  # The changed settings were applied, and said so.
  assert "applied from here on" in out.stdout + out.stderr
  assert "optimizer.learning_rate 0.001 -> 1000000000000.0" in (
      out.stdout + out.stderr
  )
  # Nothing of the exploded update was saved: the newest checkpoint is
  # still step 8, and it restores finite.
  from search_r3_jax.training import checkpoint

  ck = checkpoint.Checkpointer(workdir)
  latest = ck.latest_step()
  assert latest == 8
  restored = ck.manager.restore(latest)
  leaves = jax.tree.leaves(restored["state"])
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
  ck.close()


def test_resume_refuses_a_changed_seed_and_keeps_the_run(straight, tmp_path):
  """A resumed run may not change what its checkpoints were made from: it
  stops before loading anything, naming the field, and leaves the workdir
  as it was."""
  workdir = tmp_path / "run"
  shutil.copytree(straight, workdir)
  before = (workdir / "config.json").read_text()
  out = _run(workdir, "--config.seed=7", check=False)
  assert out.returncode != 0
  assert "seed: saved 0, now 7" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert (workdir / "config.json").read_text() == before
  assert sorted(
      p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
  ) == ["4", "6", "8"]


def test_workdir_loads_as_a_model(straight):
  """from_pretrained(workdir) gives the trained parameters of the latest
  checkpoint, ready to encode."""
  from search_r3_jax import SearchR3
  from search_r3_jax.core import sharding as shd
  from search_r3_jax.training import checkpoint

  mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  m = SearchR3.from_pretrained(str(straight), mesh=mesh)
  ck = checkpoint.Checkpointer(straight)
  raw = ck.manager.restore(8)["state"]
  ck.close()
  want = np.asarray(
      raw["params"]["embed"]["value"]
      if isinstance(raw["params"]["embed"], dict)
      else raw["params"]["embed"]
  )
  np.testing.assert_array_equal(np.asarray(m.model.embed[...]), want)
  emb = m.encode_documents(["paris is a city"])
  assert emb.shape == (1, 64)


def test_a_run_killed_before_its_first_checkpoint_leaves_no_rows(tmp_path):
  """A rerun of a workdir without a checkpoint starts over, and the dead
  run's rows (here a step-0 train row and an evaluation) go with it."""
  tmp_path.mkdir(exist_ok=True)
  dead = [
      {"kind": "train", "step": 0, "loss": 99.0},
      {"kind": "eval", "step": 0, "dev_sub/ndcg@10": 0.5},
  ]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in dead)
  )
  _run(tmp_path, "--config.total_steps=2", "--config.checkpoint_every=2")
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r["step"] for r in rows if r["kind"] == "train"]
  assert train == [0, 1] and all(r.get("loss") != 99.0 for r in rows)
