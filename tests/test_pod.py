"""Many processes on one machine: `launch/local_pod.sh` starts a pod of JAX
processes with their own fake CPU devices over gloo collectives, and the
programs give on it what one process with all the devices gives.

Pods of 2 processes x 4 devices against one process of 8 devices (the
pytest process, conftest's 8 fake devices). Tolerances: stage 1's losses
agree to 1e-5 relative (the same global batches, reduced in another order);
stage 2's losses to 5e-3 after 4 steps (Adam at lr 1e-3 carries the
rounding of the first steps on), its rewards to 1e-6 (a cosine in each
fallback reward), its emission rates and evaluations exactly.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = str(ROOT / "launch" / "local_pod.sh")
CHECKS = str(ROOT / "tests" / "pod_checks.py")
# Stage 1 tiny with a global batch the 8 devices divide.
SFT = ["--config=configs/sft.py:tiny", "--config.batch_size=8"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each process gets its own device count
  env["JAX_PLATFORMS"] = "cpu"
  # tests/pod_checks.py runs as a script: the package from this checkout.
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  return env


def pod(n, *cmd, timeout=900, **kw):
  return subprocess.run(
      [POD, str(n), "--", *cmd],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
      **kw,
  )


def train_pod(workdir, *args, timeout=900):
  return pod(
      2,
      sys.executable,
      "-m",
      "search_r3_jax.train",
      f"--workdir={workdir}",
      *args,
      timeout=timeout,
  )


def rows(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def one_process(config_args, workdir):
  """The same run in this process (8 devices): `--config=FILE:VARIANT`
  and `--config.FIELD=VALUE` overrides of bool, int or str fields."""
  from conftest import load_config

  # Not search_r3_jax.train: its flags would clash with the eval
  # program's, which other tests import into this process.
  from search_r3_jax.training import trainer
  from search_r3_jax.training.stage1 import Stage1
  from search_r3_jax.training.stage2 import Stage2

  path, variant = config_args[0].split("=", 1)[1].split(":")
  overrides = {}
  for arg in config_args[1:]:
    field, value = arg[len("--config.") :].split("=", 1)
    if value in ("True", "False"):
      value = value == "True"
    elif value.isdigit():
      value = int(value)
    overrides[field] = value
  cfg = load_config(pathlib.Path(path).stem, variant, overrides)
  trainer.train(cfg, str(workdir), Stage2 if cfg.stage == 2 else Stage1)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("pod_sft")
  run = train_pod(d / "pod", *SFT)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  one_process(SFT, d / "one")
  return d / "pod", d / "one", run


def _close(a, b, rtol):
  return abs(a - b) <= rtol * max(1.0, abs(b))


def test_every_process_says_its_devices(sft_runs):
  out = sft_runs[2].stdout
  assert "[p0] process 0/2: 4 local cpu devices" in out
  assert "[p1] process 1/2: 4 local cpu devices" in out
  assert "of 8 global" in out
  assert (
      "[p1] process 1/2: mesh data 1 x fsdp 8 x tensor 1, this process's "
      "devices at mesh positions 4..7" in out
  )


def test_stage1_on_two_processes_equals_one_process(sft_runs):
  pod_dir, one_dir, _ = sft_runs
  a, b = rows(pod_dir), rows(one_dir)
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6))
  for x, y in zip(a, b):
    for key in ("loss", "sft", "infonce", "triplet", "kl"):
      assert _close(x[key], y[key], 1e-5), (x["step"], key, x[key], y[key])
  ea, eb = rows(pod_dir, "eval"), rows(one_dir, "eval")
  assert len(ea) == len(eb) == 2
  for x, y in zip(ea, eb):
    for key in y:
      if "ndcg" in key or "recall" in key or key.endswith("emitted"):
        assert _close(x[key], y[key], 1e-6), (key, x[key], y[key])
  # One set of files for the pod, written by process 0.
  assert sorted(os.listdir(pod_dir / "checkpoints")) == ["2", "4", "6"]
  assert not list(pod_dir.glob("analyses.*.jsonl"))
  assert not (pod_dir / "run.lock").exists()


def _rl_args(sft_workdir):
  # Rollouts that do not emit the token are scored by their fallback
  # embedding, so the rewards depend on the retrieval, not only the format.
  return [
      "--config=configs/rl.py:tiny",
      f"--config.init_from={sft_workdir}",
      "--config.rl.fallback_reward=True",
  ]


@pytest.fixture(scope="module")
def rl_one(sft_runs, tmp_path_factory):
  d = tmp_path_factory.mktemp("rl_one")
  one_process(_rl_args(sft_runs[1]), d)
  return d


def test_stage2_on_two_processes_equals_one_process(sft_runs, rl_one, tmp_path):
  run = train_pod(tmp_path / "pod", *_rl_args(sft_runs[1]))
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  a, b = rows(tmp_path / "pod"), rows(rl_one)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
  for x, y in zip(a, b):
    assert x["embed_rate"] == y["embed_rate"], x["step"]
    # Fallback rewards carry a cosine: equal to float32 rounding.
    assert _close(x["reward_mean"], y["reward_mean"], 1e-6), x["step"]
    for key in ("loss", "kl"):
      assert _close(x[key], y[key], 5e-3), (x["step"], key, x[key], y[key])
  ea, eb = rows(tmp_path / "pod", "eval"), rows(rl_one, "eval")
  assert [r["step"] for r in ea] == [r["step"] for r in eb] == [0, 2, 4]
  for x, y in zip(ea, eb):
    for key in y:
      if "ndcg" in key or "recall" in key:
        assert _close(x[key], y[key], 1e-6), (key, x[key], y[key])
  # The query positions of both processes are in the checkpoint.
  meta = tmp_path / "pod" / "checkpoints" / "4" / "data" / "metadata"
  position = json.loads(meta.read_text())
  assert len(position["queries_by_process"]) == 2
  assert sorted(os.listdir(tmp_path / "pod" / "env")) == ["2", "4"]


def test_stage2_with_the_environment_sharded_by_process(
    sft_runs, rl_one, tmp_path
):
  """Each process holds half the environment: the first step searches the
  same vectors (merged top-k) as one process's whole environment, so its
  rewards are the same; later refreshes pick their regions per block, so
  the runs part there. Each step's environment is saved as two blocks and a
  manifest, and a rerun resumes from it."""
  workdir = tmp_path / "pod"
  args = [*_rl_args(sft_runs[1]), "--config.env.shard_by_process=True"]
  run = train_pod(workdir, *args)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  a, b = rows(workdir), rows(rl_one)
  assert [r["step"] for r in a] == [0, 1, 2, 3]
  assert _close(a[0]["reward_mean"], b[0]["reward_mean"], 1e-6)
  assert _close(a[0]["loss"], b[0]["loss"], 1e-5)
  assert sorted(os.listdir(workdir / "env" / "4")) == [
      "manifest.json",
      "shard-00000-of-00002",
      "shard-00001-of-00002",
  ]
  manifest = json.loads((workdir / "env" / "4" / "manifest.json").read_text())
  assert manifest["shards"] == 2 and manifest["size"] == 48
  # Two more steps, resumed from step 4's blocks.
  more = train_pod(workdir, *args, "--config.total_steps=5")
  assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
  assert "resumed from" in more.stdout
  assert [r["step"] for r in rows(workdir)] == [0, 1, 2, 3, 4]


def test_sharded_environment_on_two_processes(tmp_path):
  run = pod(
      2, sys.executable, CHECKS, "sharded_environment", str(tmp_path / "env")
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  for i in range(2):
    assert f"[p{i}] ok sharded_environment process {i}" in run.stdout


def _process_pid(workdir, index):
  """The pid of the pod's process `index` running on `workdir` (its command
  line names the workdir, its environment the process id)."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      cmd = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
      env = pathlib.Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
    except OSError:
      continue
    if (
        f"--workdir={workdir}".encode() in cmd
        and b"search_r3_jax.train" in cmd
        and f"SEARCH_R3_PROCESS_ID={index}".encode() in env
    ):
      return int(entry)
  return None


def test_a_killed_process_stops_the_pod_and_a_rerun_resumes(sft_runs, tmp_path):
  workdir = tmp_path / "pod"
  proc = subprocess.Popen(
      [
          POD,
          "2",
          "--",
          sys.executable,
          "-m",
          "search_r3_jax.train",
          f"--workdir={workdir}",
          *SFT,
      ],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  committed = workdir / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
  deadline = time.time() + 600
  while not committed.exists() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint 2 within 10 minutes"
    time.sleep(0.2)
  assert proc.poll() is None, "the pod ended before it could be killed"
  time.sleep(1.0)  # orbax renames the step into place: let it finish
  victim = _process_pid(workdir, 1)
  assert victim is not None
  os.kill(victim, signal.SIGKILL)
  killed = time.time()
  out, err = proc.communicate(timeout=120)
  stopped = time.time() - killed
  assert proc.returncode == 137, (proc.returncode, err[-2000:])
  assert stopped < 60, f"the pod took {stopped:.0f} s to stop"
  assert "local_pod: process 1 (pid" in err and "status 137" in err, err
  assert not rows(workdir)[-1]["step"] >= 5, "the run had finished"
  # The rerun resumes from the last checkpoint and ends as the
  # uninterrupted pod did.
  again = train_pod(workdir, *SFT)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "resumed from" in again.stdout
  a, b = rows(workdir), rows(sft_runs[0])
  assert [r["step"] for r in a] == list(range(6))
  for x, y in zip(a, b):
    assert _close(x["loss"], y["loss"], 1e-6), (x["step"], x["loss"], y["loss"])


def test_sharded_index_on_two_processes_equals_one_index(tmp_path):
  run = pod(2, sys.executable, CHECKS, "sharded_index", str(tmp_path / "idx"))
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  for i in range(2):
    assert f"[p{i}] ok sharded_index process {i}" in run.stdout
  assert sorted(os.listdir(tmp_path / "idx")) == [
      "manifest.json",
      "shard-00000-of-00002",
      "shard-00001-of-00002",
  ]


def test_each_process_encodes_its_own_documents(sft_runs):
  run = pod(2, sys.executable, CHECKS, "per_process_encode", str(sft_runs[1]))
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "[p0] ok per_process_encode process 0 rows 12" in run.stdout
  assert "[p1] ok per_process_encode process 1 rows 11" in run.stdout


def test_local_pod_names_the_process_that_failed():
  code = (
      "import os, sys, time\n"
      "if os.environ['SEARCH_R3_PROCESS_ID'] == '2': sys.exit(3)\n"
      "time.sleep(120)\n"
  )
  t = time.time()
  run = subprocess.run(
      [POD, "--grace", "5", "3", "--", sys.executable, "-c", code],
      env=_env(),
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert run.returncode == 3
  assert "local_pod: process 2 (pid" in run.stderr
  assert "exited with status 3" in run.stderr
  assert time.time() - t < 30


def test_local_pod_help_and_bad_arguments():
  run = subprocess.run([POD, "--help"], capture_output=True, text=True)
  assert run.returncode == 0 and "usage: launch/local_pod.sh" in run.stdout
  for args, says in (
      (["x", "--", "true"], "give the number of processes"),
      (["2"], "no command given"),
      (["--devices", "0", "2", "--", "true"], "--devices must be"),
  ):
    run = subprocess.run([POD, *args], capture_output=True, text=True)
    assert run.returncode == 2 and says in run.stderr, (args, run.stderr)


def test_a_pod_refuses_a_workdir_another_run_holds(tmp_path):
  """Process 0 takes the workdir's lock for the pod; when another run holds
  it, every process stops with the holder named."""
  import socket

  workdir = tmp_path / "held"
  workdir.mkdir()
  holder = dict(host=socket.gethostname(), pid=os.getpid(), started="then")
  (workdir / "run.lock").write_text(json.dumps(holder))
  run = train_pod(workdir, *SFT, timeout=300)
  assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
  for i in range(2):
    assert f"[p{i}] error: {workdir} is in use by another run" in run.stdout
  assert f"process {os.getpid()}" in run.stdout
  assert json.loads((workdir / "run.lock").read_text()) == holder
  assert not (workdir / "checkpoints").exists()


def test_evaluation_on_two_processes_equals_one_process(sft_runs, tmp_path):
  """The eval program on a pod: the same figures as in one process, the
  files written once."""
  workdir = sft_runs[1]
  run = pod(
      2,
      sys.executable,
      "-m",
      "search_r3_jax.eval",
      "--config=configs/eval.py:tiny",
      f"--workdir={workdir}",
      f"--output={tmp_path / 'pod'}",
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  # One process with 8 devices, as its own program (the eval and train
  # programs' flags cannot share this test process).
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8")
  single = subprocess.run(
      [
          sys.executable,
          "-m",
          "search_r3_jax.eval",
          "--config=configs/eval.py:tiny",
          f"--workdir={workdir}",
          f"--output={tmp_path / 'one'}",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.loads((tmp_path / "one" / "results.json").read_text())
  got = json.loads((tmp_path / "pod" / "results.json").read_text())
  assert got["rows"].keys() == one["rows"].keys()
  for name, figures in one["rows"].items():
    for key, value in figures.items():
      assert _close(got["rows"][name][key], value, 1e-6), (name, key)
  read = lambda d: [
      json.loads(line) for line in (tmp_path / d / "samples.jsonl").open()
  ]
  a, b = read("pod"), read("one")
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert (x["query"], x["top"]) == (y["query"], y["top"])
    assert [h[0] for h in x["hits"]] == [h[0] for h in y["hits"]]
