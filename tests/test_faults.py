"""Faults a long unattended run meets: a checkpoint that cannot be written
(an unwritable directory, a full disk, in the checkpoint or in stage 2's
environment) stops the run with the step and the cause, and the process
exits; a damaged newest step is set aside and the run resumes from the
step before it, to the same numbers as a run that was never damaged.

The loop (`trainer.train`) runs toy stages without a model, so each run
takes a second: `Toy`'s state is a vector pulled toward one data point per
step, so every loss depends on both the restored state and the restored
data position; `ToyEnv` is stage 2 (`Stage2`'s own query stream,
environment save, load and checks) with that vector instead of a policy,
its loss reading the environment's vectors, which every step refreshes
from the vector. Faults are injected where orbax or the environment writes
(the tests run as root, where an unwritable directory cannot be made).
"""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from search_r3_jax.retrieval.env_config import EnvConfig
from search_r3_jax.retrieval.environment import RetrievalEnvironment
from search_r3_jax.training import checkpoint
from search_r3_jax.training import stage2
from search_r3_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 997  # big enough for an array file of its own
ENV_DIM = 7


def _point(index: int) -> np.ndarray:
  return np.random.default_rng(index).normal(size=DIM).astype(np.float32)


class Toy:
  """A stage without a model (trainer.Stage)."""

  name = "toy"
  resume_refuses = trainer.KEEPS_ON_RESUME

  def __init__(self, cfg, workdir=None):
    del cfg, workdir
    self.state = {
        "w": jnp.zeros(DIM, jnp.float32),
        "n": jnp.zeros((), jnp.int32),
    }
    self.index = 0

  def summary(self):
    return "toy stage"

  def position(self):
    return {"index": self.index}

  def resume(self, position, step):
    del step
    self.index = position["index"]

  def prepare(self):
    pass

  def target(self) -> np.ndarray:
    x = _point(self.index)
    self.index += 1
    return x

  def step(self, step, guard):
    del step, guard
    w = self.state["w"]
    grad = 2 * (w - self.target())
    self.state = {"w": w - 0.1 * grad, "n": self.state["n"] + 1}
    return {
        "loss": jnp.sum((grad / 2) ** 2),
        "grad_norm": jnp.linalg.norm(grad),
    }

  def update_is_finite(self):
    return True

  def baseline(self):
    return {}

  def evaluate(self, step):
    return {}, []

  def postfix(self, values):
    return {}

  def save_extra(self, step):
    pass

  def prune_extra(self, kept_steps):
    pass

  @classmethod
  def extras(cls, workdir, step):
    return {}

  @classmethod
  def check_extra(cls, workdir, step):
    return None


DOCS = {f"d{i}": f"document {i}" for i in range(12)}
PAIRS = [(f"query {i}", (f"d{i}",)) for i in range(6)]


class ToyEnv(Toy):
  """Stage 2's environment and query stream around the toy vector: the
  target is the mean of the step's gold documents' stored vectors, and
  every step marks them and refreshes what it touched from the vector."""

  name = "toy stage 2"
  extras = stage2.Stage2.extras
  check_extra = stage2.Stage2.check_extra
  save_extra = stage2.Stage2.save_extra
  prune_extra = stage2.Stage2.prune_extra
  position = stage2.Stage2.position
  resume = stage2.Stage2.resume
  sharded = stage2.Stage2.sharded
  _env_class = stage2.Stage2._env_class

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.corpus = dict(DOCS)
    self.stream = stage2.QueryStream(PAIRS, seed=0)
    self.env_root = os.path.join(workdir, "env")
    # Only the touched documents are re-encoded: the stored vectors are a
    # mix of versions that only the saved environment reproduces.
    self.env_cfg = EnvConfig(
        engine="exact", k=3, drift_threshold=1e9, rebuild_fraction=1.0
    )
    self.env = None

  def prepare(self):
    if self.env is None:
      self.env = RetrievalEnvironment(
          self.corpus, self.encode, self.env_cfg, step=0
      )

  def encode(self, texts):
    w = np.asarray(self.state["w"][:ENV_DIM])
    return np.stack(
        [
            np.random.default_rng(zlib.crc32(t.encode())).normal(size=ENV_DIM)
            + w
            for t in texts
        ]
    ).astype(np.float32)

  def target(self):
    gold = [list(g) for _, g in self.stream.next(2)]
    self._gold = gold
    x = np.zeros(DIM, np.float32)
    x[:ENV_DIM] = self.env.embeddings([g[0] for g in gold]).mean(0)
    return x

  def step(self, step, guard):
    out = super().step(step, guard)
    self.env.observe(self._gold)
    self.env.maybe_refresh(step + 1, self.encode)
    return out


def _config(**changes):
  cfg = ml_collections.ConfigDict(
      dict(
          stage=0,
          seed=0,
          total_steps=8,
          checkpoint_every=2,
          keep_checkpoints=3,
          eval_every=0,
          log_every=1,
          eval=dict(at_start=False),
      )
  )
  cfg.update(changes)
  return cfg


def _train_rows(workdir) -> dict[int, dict]:
  rows = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path, encoding="utf-8"):
      row = json.loads(line)
      if row["kind"] == "train":
        rows[row["step"]] = row
  return rows


def _steps(workdir) -> list[int]:
  return sorted(
      int(n)
      for n in os.listdir(os.path.join(workdir, "checkpoints"))
      if n.isdigit()
  )


def _non_daemon_threads() -> set[threading.Thread]:
  return {t for t in threading.enumerate() if not t.daemon}


def _same_losses(got, want, steps):
  assert sorted(got) == list(steps)
  for step in steps:
    assert got[step]["loss"] == pytest.approx(
        want[step]["loss"], rel=1e-6
    ), step


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Uninterrupted runs of both toy stages to step 8: the references."""
  out = {}
  for stage in (Toy, ToyEnv):
    workdir = tmp_path_factory.mktemp(stage.__name__)
    trainer.train(_config(), str(workdir), stage)
    out[stage] = _train_rows(workdir)
  return out


def _run_to_6(workdir, stage=Toy):
  trainer.train(_config(total_steps=6), str(workdir), stage)
  assert _steps(workdir) == [2, 4, 6]
  return workdir


# ------------------------------------------------------------------ saving


def _fail_at(monkeypatch, method: str, where: str, error: OSError):
  """Makes epath's `method` (what orbax writes with) raise `error` for
  paths containing `where`."""
  from etils.epath import gpath

  original = getattr(gpath.PosixGPath, method)

  def failing(self, *args, **kwargs):
    if where in os.fspath(self):
      raise error
    return original(self, *args, **kwargs)

  monkeypatch.setattr(gpath.PosixGPath, method, failing)


def test_a_full_disk_during_a_background_save_stops_the_run(
    tmp_path, monkeypatch
):
  """ENOSPC at the write of step 4's data position, which orbax does in
  the background: the run stops before the next save, naming the step and
  the cause, and leaves no orbax thread behind."""
  before = _non_daemon_threads()
  _fail_at(
      monkeypatch,
      "write_text",
      "checkpoints/4.orbax-checkpoint-tmp/data",
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "data/metadata"),
  )
  with pytest.raises(checkpoint.CheckpointError) as e:
    trainer.train(_config(total_steps=20), str(tmp_path), Toy)
  msg = str(e.value)
  assert msg.startswith("checkpoint of step 4 could not be written: "), msg
  assert "No space left on device" in msg
  assert "newest complete checkpoint" in msg and msg.endswith("is step 2")
  # No training past the unsaved step 4 beyond the next save's, and
  # nothing saved after it.
  assert max(_train_rows(tmp_path)) < 6
  assert _steps(tmp_path) == [2]
  assert _non_daemon_threads() <= before


def test_a_failed_save_keeps_the_environment_of_the_step_before(
    tmp_path, monkeypatch, straight
):
  """With one checkpoint kept, orbax forgets step 2 as soon as step 4's
  save starts; the save then fails in the background. Step 2 is still on
  disk and is what a resume falls back to, so its env/2/ stays, and the
  rerun from it gives the losses of an uninterrupted run."""
  _fail_at(
      monkeypatch,
      "write_text",
      "checkpoints/4.orbax-checkpoint-tmp/data",
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "data/metadata"),
  )
  cfg = _config(keep_checkpoints=1)
  with pytest.raises(checkpoint.CheckpointError, match="step 4"):
    trainer.train(cfg, str(tmp_path), ToyEnv)
  monkeypatch.undo()
  assert _steps(tmp_path) == [2]
  assert os.path.isdir(tmp_path / "env" / "2")
  trainer.train(cfg, str(tmp_path), ToyEnv)
  _same_losses(_train_rows(tmp_path), straight[ToyEnv], range(8))
  assert _steps(tmp_path) == [8]
  assert sorted(os.listdir(tmp_path / "env")) == ["8"]


def test_an_environment_that_cannot_be_written_stops_the_run(
    tmp_path, monkeypatch
):
  """Stage 2 writes env/<step>/ before the checkpoint: a full disk there
  stops the run at that step, and the checkpoint of the step is not
  written without its environment."""
  saves = []
  original = np.savez

  def savez(path, *args, **kwargs):
    if os.fspath(path).endswith("environment.npz"):
      saves.append(path)
      if len(saves) == 2:  # step 4's
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return original(path, *args, **kwargs)

  monkeypatch.setattr(np, "savez", savez)
  with pytest.raises(checkpoint.CheckpointError) as e:
    trainer.train(_config(total_steps=20), str(tmp_path), ToyEnv)
  msg = str(e.value)
  assert msg.startswith(
      f"checkpoint of step 4 could not be written: {tmp_path}/env/4: "
      "OSError: [Errno 28] No space left on device"
  ), msg
  assert max(_train_rows(tmp_path)) == 3
  assert _steps(tmp_path) == [2]
  assert sorted(os.listdir(tmp_path / "env")) == ["2"]  # no half-written one


CHILD = """
import errno, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_faults
from etils.epath import gpath
from search_r3_jax.training import trainer

original = gpath.PosixGPath.mkdir
def mkdir(self, *args, **kwargs):
  if "checkpoints/4.orbax-checkpoint-tmp" in os.fspath(self):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(self))
  return original(self, *args, **kwargs)
gpath.PosixGPath.mkdir = mkdir
trainer.train(test_faults._config(total_steps=20), {workdir!r}, test_faults.Toy)
"""


def test_an_unwritable_checkpoint_directory_stops_the_process(tmp_path):
  """The step-4 directory cannot be made (what a read-only checkpoints/
  gives): the program stops at step 4 with the step and the cause, and
  exits (orbax once left threads waiting there, and the process never
  ended)."""
  code = CHILD.format(
      root=ROOT, tests=os.path.join(ROOT, "tests"), workdir=str(tmp_path)
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=dict(os.environ, XLA_FLAGS=""),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode != 0
  assert "CheckpointError: checkpoint of step 4 could not be written: " in (
      out.stderr
  ), out.stderr[-3000:]
  assert "Permission denied" in out.stderr
  assert max(_train_rows(tmp_path)) == 3
  assert _steps(tmp_path) == [2]


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path):
  """Evaluating or exporting a workdir while its run saves opens it to
  read: the save's temporary directory stays."""
  _run_to_6(tmp_path)
  tmp = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp"
  tmp.mkdir()
  assert trainer.finished_steps(str(tmp_path)) == 6
  assert tmp.is_dir()


# ------------------------------------------------------------------ resuming


def _said(capsys) -> str:
  out = capsys.readouterr()
  return out.out + out.err


def test_a_truncated_array_file_resumes_from_the_step_before(
    straight, tmp_path, capsys
):
  """Damage that only shows at read: step 6's restore fails, so step 6 is
  set aside (kept) and the run resumes from step 4, to the same losses as
  an undamaged run."""
  _run_to_6(tmp_path)
  files = glob.glob(
      str(tmp_path / "checkpoints/6/state/**/d/*"), recursive=True
  )
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  os.truncate(biggest, size // 2)
  assert checkpoint.Checkpointer(tmp_path).problem(6) is None  # looks fine
  capsys.readouterr()
  trainer.train(_config(), str(tmp_path), Toy)
  said = _said(capsys)
  aside = tmp_path / "set_aside" / "6-unreadable"
  assert f"checkpoint step 6 set aside in {aside}: restore failed: " in said
  assert "at step 4" in said  # resumed from
  # Kept, not deleted; out of orbax's sight, and why it went.
  assert (
      os.path.getsize(
          str(biggest).replace(
              str(tmp_path / "checkpoints" / "6"), str(aside / "checkpoint")
          )
      )
      == size // 2
  )
  assert "restore failed" in (aside / "reason.txt").read_text()
  assert _steps(tmp_path) == [4, 6, 8]  # the new 6 and 8
  _same_losses(_train_rows(tmp_path), straight[Toy], range(8))


def test_a_step_without_its_data_position_resumes_from_the_step_before(
    straight, tmp_path, capsys
):
  _run_to_6(tmp_path)
  os.remove(tmp_path / "checkpoints" / "6" / "data" / "metadata")
  capsys.readouterr()
  trainer.train(_config(), str(tmp_path), Toy)
  said = _said(capsys)
  assert "6-incomplete: incomplete: no data/metadata" in said
  assert (tmp_path / "set_aside" / "6-incomplete" / "checkpoint").is_dir()
  assert _steps(tmp_path) == [4, 6, 8]
  _same_losses(_train_rows(tmp_path), straight[Toy], range(8))


def test_stage2_without_the_newest_environment_resumes_from_the_step_before(
    straight, tmp_path, capsys
):
  """env/6 is gone: step 6 cannot resume stage 2; step 4 has both, and the
  run goes on from it to the numbers of a run that lost nothing."""
  _run_to_6(tmp_path, ToyEnv)
  shutil.rmtree(tmp_path / "env" / "6")
  capsys.readouterr()
  trainer.train(_config(), str(tmp_path), ToyEnv)
  said = _said(capsys)
  assert f"6-incomplete: no environment: {tmp_path}/env/6 is missing" in said
  assert _steps(tmp_path) == [4, 6, 8]
  assert sorted(os.listdir(tmp_path / "env")) == ["4", "6", "8"]
  _same_losses(_train_rows(tmp_path), straight[ToyEnv], range(8))


def test_stage2_sets_aside_a_step_with_its_environment(tmp_path):
  """An environment whose array file is cut short fails at load, inside
  the resume: the step and its environment are set aside together."""
  _run_to_6(tmp_path, ToyEnv)
  npz = tmp_path / "env" / "6" / "environment.npz"
  os.truncate(npz, os.path.getsize(npz) // 2)
  trainer.train(_config(), str(tmp_path), ToyEnv)
  aside = tmp_path / "set_aside" / "6-unreadable"
  assert (aside / "checkpoint").is_dir() and (aside / "env").is_dir()
  assert _steps(tmp_path) == [4, 6, 8]


def test_stage2_checks_the_environment_files_of_a_step(tmp_path):
  check = stage2.Stage2.check_extra
  env = tmp_path / "env" / "3"
  assert "env/3 is missing" in check(str(tmp_path), 3)
  env.mkdir(parents=True)
  (env / "index").mkdir()
  (env / "environment.npz").write_bytes(b"")
  assert check(str(tmp_path), 3).endswith("has no environment.json")
  (env / "environment.json").write_text('{"format_version": 1, "step": 3')
  assert "unreadable environment: JSONDecodeError" in check(str(tmp_path), 3)
  (env / "environment.json").write_text(
      json.dumps(dict(format_version=1, config={}, step=3, size=12))
  )
  assert check(str(tmp_path), 3) is None


def test_no_good_step_stops_the_run_listing_what_it_found(tmp_path):
  """Every step damaged: the run stops before it loads anything, listing
  each step and why, and moves nothing."""
  _run_to_6(tmp_path)
  ck = tmp_path / "checkpoints"
  os.remove(ck / "6" / "data" / "metadata")
  os.remove(ck / "4" / "commit_success.txt")
  (ck / "2" / "data" / "metadata").write_text("{}")
  config = (tmp_path / "config.json").read_text()
  with pytest.raises(checkpoint.CheckpointError) as e:
    trainer.train(_config(), str(tmp_path), Toy)
  assert str(e.value) == (
      f"no checkpoint in {ck} can be resumed from; it has "
      "step 6: incomplete: no data/metadata; "
      "step 4: incomplete: no commit_success.txt; "
      "step 2: no data position: data/metadata holds {}. Nothing "
      "was moved: repair or remove them, or use a new --workdir"
  )
  assert _steps(tmp_path) == [2, 4, 6]
  assert not (tmp_path / "set_aside").exists()
  assert (tmp_path / "config.json").read_text() == config


def test_a_restore_that_fails_for_every_step_moves_nothing(tmp_path):
  """Where no step restores (a state that no longer fits them, or all
  damaged), the steps are not to blame for sure: all stay, and the error
  lists each one's failure."""
  _run_to_6(tmp_path)

  class Wider(Toy):

    def __init__(self, cfg, workdir=None):
      super().__init__(cfg, workdir)
      self.state = dict(self.state, w=jnp.zeros(DIM + 1, jnp.float32))

  with pytest.raises(checkpoint.CheckpointError) as e:
    trainer.train(_config(), str(tmp_path), Wider)
  msg = str(e.value)
  for step in (6, 4, 2):
    assert f"step {step}: restore failed: " in msg
  assert _steps(tmp_path) == [2, 4, 6]
  assert not (tmp_path / "set_aside").exists()
