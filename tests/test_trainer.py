"""The shared training loop's own rules: a resumed run applies or refuses a
changed setting by name, and every registry a config names is checked."""

import json
import os
import subprocess

import ml_collections
import pytest
from test_rl import tiny_config

from search_r3_jax import config_blocks
from search_r3_jax.training import lock
from search_r3_jax.training import stage2
from search_r3_jax.training import trainer
from search_r3_jax.training.stage1 import Stage1
from search_r3_jax.training.stage2 import Stage2


def test_flatten_names_every_leaf():
  assert trainer.flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": {}}) == {
      "a.b": 1,
      "a.c.d": [2],
      "e": {},
  }


def test_resume_applies_what_it_can_and_names_what_it_refuses():
  saved = {
      "seed": 0,
      "total_steps": 8,
      "workdir": "a",
      "optimizer": {"learning_rate": 1e-4},
      "data": {"name": "wiki_fanout", "path": None},
  }
  now = {
      "seed": 0,
      "total_steps": 10,
      "workdir": "b",
      "optimizer": {"learning_rate": 3e-4},
      "data": {"name": "wiki_fanout", "path": None},
  }
  changed = trainer.check_resume(saved, now, Stage1.resume_refuses)
  assert changed == {
      "optimizer.learning_rate": (1e-4, 3e-4),
      "total_steps": (8, 10),
  }  # the workdir is not a setting
  now["seed"], now["data"]["path"] = 3, "/elsewhere"
  with pytest.raises(trainer.ResumeConfigError) as e:
    trainer.check_resume(saved, now, Stage1.resume_refuses)
  msg = str(e.value)
  assert "data.path: saved None, now '/elsewhere'" in msg
  assert "seed: saved 0, now 3" in msg
  assert "learning_rate" not in msg  # applied fields are not in the refusal
  # A prefix refuses its whole block, but not a field that only starts alike.
  assert trainer.check_resume({"database": 1}, {"database": 2}, ("data",)) == {
      "database": (1, 2)
  }


def test_stage2_resume_takes_refresh_settings_and_refuses_index_structure():
  saved = {"env": config_blocks.env().to_dict()}
  now = {
      "env": config_blocks.env(refresh_every=7, drift_threshold=0.1).to_dict()
  }
  assert set(trainer.check_resume(saved, now, Stage2.resume_refuses)) == {
      "env.refresh_every",
      "env.drift_threshold",
  }
  for field in ("engine", "graph_k", "num_regions", "kmeans_iters", "seed"):
    changed = {"env": dict(saved["env"], **{field: "x"})}
    with pytest.raises(trainer.ResumeConfigError, match=f"env.{field}"):
      trainer.check_resume(saved, changed, Stage2.resume_refuses)
  # The environment's corpus and the stage 1 it started from: fixed on
  # resume. The evaluation's corpus is not the environment's: applied.
  for block, field in (("train_corpus", "size"), ("stage1", "total_steps")):
    with pytest.raises(trainer.ResumeConfigError, match=f"{block}.{field}"):
      trainer.check_resume(
          {block: {field: 500}}, {block: {field: 0}}, Stage2.resume_refuses
      )
  assert trainer.check_resume(
      {"eval": {"corpus_size": 500}},
      {"eval": {"corpus_size": 0}},
      Stage2.resume_refuses,
  ) == {"eval.corpus_size": (500, 0)}


def test_stage2_resumes_a_workdir_made_before_an_environment_field():
  # A config.json written before env.shard_by_process existed: the run held
  # one whole environment per process, which is the field's default.
  saved = {"env": config_blocks.env().to_dict(), "seed": 0}
  del saved["env"]["shard_by_process"]
  now = {"env": config_blocks.env().to_dict(), "seed": 0}
  assert not trainer.check_resume(
      saved, now, Stage2.resume_refuses, Stage2.resume_defaults
  )
  # Without the defaults the missing field reads as a change, and refused.
  with pytest.raises(trainer.ResumeConfigError, match="shard_by_process"):
    trainer.check_resume(saved, now, Stage2.resume_refuses)
  # Set away from its default, it is a change of the saved run, and refused
  # with the default it ran as named.
  now["env"]["shard_by_process"] = True
  with pytest.raises(trainer.ResumeConfigError) as e:
    trainer.check_resume(
        saved, now, Stage2.resume_refuses, Stage2.resume_defaults
    )
  assert (
      "env.shard_by_process: saved False (not in the saved config), now True"
      in str(e.value)
  )
  # A field applied on resume, missing from the saved config, is applied.
  del saved["env"]["refresh_every"]
  now["env"]["shard_by_process"] = False
  now["env"]["refresh_every"] += 1
  changed = trainer.check_resume(
      saved, now, Stage2.resume_refuses, Stage2.resume_defaults
  )
  assert list(changed) == ["env.refresh_every"]


def _rl_config(**changes):
  return tiny_config(changes)  # configs/rl.py:tiny with `changes` applied


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rl.advantage", "ppo", r"rl.advantage: unknown advantage estimator"),
        ("loss.policy", "reinforce", r"loss.policy: unknown loss"),
        ("rewards", {"dcg_rank": 1.0, "bleu": 1.0}, r"rewards: unknown reward"),
    ],
)
def test_stage2_refuses_unregistered_names(field, value, message):
  cfg = _rl_config()
  if field == "rewards":
    cfg.rewards = value
  else:
    cfg = _rl_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    stage2.check_config(cfg)
  stage2.check_config(_rl_config())  # the shipped config passes


def test_stage1_refuses_an_unregistered_loss_before_loading_anything():
  cfg = ml_collections.ConfigDict(
      dict(batch_size=4, loss=dict(weights=dict(sft=1.0, contrastive=1.0)))
  )
  with pytest.raises(
      ValueError,
      match=r"loss.weights: unknown loss.*" r"\['contrastive'\].*infonce",
  ):
    Stage1(cfg)


def test_config_blocks_take_their_defaults_from_the_dataclasses():
  from search_r3_jax.retrieval.environment import EnvConfig
  from search_r3_jax.training.rewards import DEFAULT_WEIGHTS

  assert EnvConfig.from_mapping(config_blocks.env().to_dict()) == EnvConfig()
  assert config_blocks.rewards() == DEFAULT_WEIGHTS
  with pytest.raises(ValueError, match="unknown environment setting"):
    config_blocks.env(refresh_evry=3)


# ------------------------------------------------------------------ lock


def _write_lock(workdir, pid, host=None):
  import socket

  (workdir / "run.lock").write_text(
      json.dumps(
          dict(host=host or socket.gethostname(), pid=pid, started="earlier")
      )
  )


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  from search_r3_jax.training.lock import WorkdirLockedError

  holder = subprocess.Popen(["sleep", "60"])
  try:
    _write_lock(tmp_path, holder.pid)
    with pytest.raises(WorkdirLockedError, match=f"process {holder.pid}"):
      trainer.train(_rl_config(), str(tmp_path), Stage2)
    assert not (tmp_path / "config.json").exists()  # nothing was touched
    # Another host's lock cannot be checked from here: refused too.
    _write_lock(tmp_path, 1, host="another-host")
    with pytest.raises(WorkdirLockedError, match="host another-host"):
      lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over_and_released_on_exit(tmp_path):
  gone = subprocess.Popen(["true"])
  gone.wait()  # a process id that no longer runs
  _write_lock(tmp_path, gone.pid)
  said = []
  with lock.WorkdirLock(str(tmp_path), say=said.append) as held:
    assert held.held and any("stale lock" in s for s in said)
    mine = json.loads((tmp_path / "run.lock").read_text())
    assert mine["pid"] == os.getpid()
    # The same process taking it again (the main job's chain) is no conflict.
    with lock.WorkdirLock(str(tmp_path)) as inner:
      assert not inner.held
    assert (tmp_path / "run.lock").exists()
  assert not (tmp_path / "run.lock").exists()
