"""The main job on configs/rl.py:tiny: stage 1 in <workdir>/stage1, then
stage 2 from it, killed with SIGKILL inside stage 1, between the stages and
inside stage 2, and resumed each time to the same numbers as a run that was
never interrupted."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cmd(workdir):
  return [
      sys.executable,
      "-m",
      "search_r3_jax.train",
      f"--config={ROOT / 'configs' / 'rl.py'}:tiny",
      f"--workdir={workdir}",
  ]


def _env():
  return dict(os.environ, XLA_FLAGS="")  # one CPU device, like a laptop


def _run(workdir, cmd=None, timeout=900):
  """Runs the job on `workdir` (or `cmd`) to the end; its output."""
  return subprocess.run(
      cmd or _cmd(workdir),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=True,
  )


def _kill_when(workdir, marker: pathlib.Path) -> None:
  """Starts the job and kills it (SIGKILL) as soon as `marker` exists."""
  proc = subprocess.Popen(
      _cmd(workdir),
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 600
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), f"the job never wrote {marker}"


def _rows(path: pathlib.Path, kind="train"):
  rows = {}
  if path.exists():
    for line in path.read_text().splitlines():
      row = json.loads(line)
      if row["kind"] == kind:
        rows[row["step"]] = row
  return rows


def _done(workdir: pathlib.Path, step: int) -> pathlib.Path:
  return workdir / "checkpoints" / str(step) / "commit_success.txt"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("main_straight")
  out = _run(workdir)
  return workdir, out.stdout + out.stderr


def test_the_main_job_runs_stage_1_then_stage_2_from_it(straight):
  workdir, log = straight
  assert "stage 1 first" in log and "stage 2 from" in log
  s1 = workdir / "stage1"
  assert sorted(_rows(s1 / "metrics.jsonl")) == list(range(6))
  assert (s1 / "analyses.jsonl").exists()
  assert sorted(_rows(workdir / "metrics.jsonl")) == list(range(4))
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["init_from"] == str(s1)
  assert cfg["rl"]["fallback_reward"] is False  # the paper's rule


def test_stage_2_step_0_is_stage_1s_final_evaluation_not_computed_twice(
    straight, tmp_path
):
  workdir, log = straight
  assert "step-0 evaluation: the starting run's final one" in log
  s1_eval = _rows(workdir / "stage1" / "metrics.jsonl", "eval")
  s2_eval = _rows(workdir / "metrics.jsonl", "eval")
  final = s1_eval[6]
  logged = s2_eval[0]
  assert "eval_seconds" not in logged  # logged, not computed
  assert "eval_seconds" in s2_eval[4]
  figures = {k for k in final if k.startswith("dev_sub")}
  assert "dev_sub+reasoning/emitted" in figures
  assert figures == {k for k in logged if k.startswith("dev_sub")}
  for k in figures:
    assert logged[k] == final[k], k
  # The samples (the analyses the model wrote) come along.
  assert (workdir / "samples" / "step_0.jsonl").read_text() == (
      workdir / "stage1" / "samples" / "step_6.jsonl"
  ).read_text()
  # Stage 2's own evaluation of stage 1's parameters gives the same figures:
  # what was logged is what it would have computed.
  script = textwrap.dedent(f"""
      import importlib.util, json
      from search_r3_jax.training.stage2 import Stage2
      spec = importlib.util.spec_from_file_location("rl", {str(ROOT / "configs" / "rl.py")!r})
      m = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(m)
      cfg = m.get_config("tiny")
      cfg.init_from = {str(workdir / "stage1")!r}
      flat, _ = Stage2(cfg, {str(tmp_path)!r}).evaluate(0)
      print("FIGURES", json.dumps(flat))
      """)
  out = _run(None, [sys.executable, "-c", script], timeout=600)
  line = [l for l in out.stdout.splitlines() if l.startswith("FIGURES ")][-1]
  fresh = json.loads(line[len("FIGURES ") :])
  assert set(fresh) == figures
  for k in figures:
    assert fresh[k] == pytest.approx(final[k], rel=1e-6, abs=1e-9), k


def test_kill_9_inside_stage_1_between_the_stages_and_inside_stage_2(
    straight, tmp_path
):
  s1 = tmp_path / "stage1"
  _kill_when(tmp_path, _done(s1, 2))  # inside stage 1
  assert max(_rows(s1 / "metrics.jsonl")) < 5
  _kill_when(tmp_path, _done(s1, 6))  # stage 1 done, stage 2 not begun
  assert not _rows(tmp_path / "metrics.jsonl")
  _kill_when(tmp_path, _done(tmp_path, 2))  # inside stage 2
  assert max(_rows(tmp_path / "metrics.jsonl")) < 3
  out = _run(tmp_path)
  log = out.stdout + out.stderr
  assert "stage 1 first" not in log  # finished: not run again
  assert "resumed from" in log
  want_dir, _ = straight
  for sub, keys in (
      ("stage1", ("loss", "sft", "infonce")),
      (".", ("loss", "reward_mean")),
  ):
    want = _rows(want_dir / sub / "metrics.jsonl")
    got = _rows(tmp_path / sub / "metrics.jsonl")
    assert sorted(got) == sorted(want)
    for step in want:
      for k in keys:
        assert got[step][k] == pytest.approx(
            want[step][k], rel=1e-5, abs=1e-6
        ), (sub, step, k)
  # The analyses were written once, before stage 1's first step.
  assert (tmp_path / "stage1" / "analyses.jsonl").read_text() == (
      want_dir / "stage1" / "analyses.jsonl"
  ).read_text()
