"""Every setting is checked before any work (config_check.py), and the
programs report errors of input or settings as one line `error: ...` with
exit status 2 (cli.run), leaving the workdir unwritten."""

import os
import pathlib
import subprocess
import sys

from conftest import load_config
import ml_collections
import pytest

from search_r3_jax import cli
from search_r3_jax import config_check
from search_r3_jax.config_check import SettingsError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name, variant=""):
  return load_config(name, variant)


def _problems(cfg, kind="train", devices=1):
  return config_check.problems_of(cfg, kind, devices, 1)


def _only(cfg, kind="train", devices=1):
  """The single problem of `cfg`, raised as check_config raises it."""
  with pytest.raises(SettingsError) as e:
    config_check.check_config(cfg, kind, num_devices=devices, num_processes=1)
  assert len(e.value.problems) == 1, e.value.problems
  assert str(e.value) == f"bad setting: {e.value.problems[0]}"
  return e.value.problems[0]


# ---------------------------------------------------------------- the shipped


@pytest.mark.parametrize("variant", ["", "tiny"])
@pytest.mark.parametrize(
    "name,kind", [("sft", "train"), ("rl", "train"), ("eval", "eval")]
)
def test_the_shipped_configs_pass(name, kind, variant):
  config_check.check_config(
      _config(name, variant), kind, num_devices=1, num_processes=1
  )


# ---------------------------------------------------------------- ranges


def test_negative_learning_rate():
  cfg = _config("sft", "tiny")
  cfg.optimizer.learning_rate = -0.1
  assert _only(cfg) == "optimizer.learning_rate = -0.1: must be >= 0"


def test_warmup_longer_than_the_schedule():
  cfg = _config("sft", "tiny")
  cfg.optimizer.warmup_steps = 7  # of 6 steps
  assert _only(cfg) == (
      "optimizer.warmup_steps = 7: must be <= optimizer.total_steps (6)"
  )


def test_negative_eval_corpus_size():
  """It used to keep only the gold pages, silently."""
  cfg = _config("eval", "tiny")
  cfg.eval.corpus_size = -5
  assert _only(cfg, "eval") == (
      "eval.corpus_size = -5: must be >= 0 (0: the full corpus)"
  )


@pytest.mark.parametrize("top_p", [0.0, 1.5, float("nan")])
def test_top_p_out_of_range(top_p):
  cfg = _config("rl", "tiny")
  cfg.rl.top_p = top_p
  assert _only(cfg) == f"rl.top_p = {top_p!r}: must be in (0, 1]"


def test_negative_temperature_and_a_share_above_one():
  cfg = _config("sft", "tiny")
  cfg.reasoning.temperature = -0.5
  cfg.reasoning.batch_share = 1.5
  assert _problems(cfg) == [
      "reasoning.batch_share = 1.5: must be in [0, 1]",
      "reasoning.temperature = -0.5: must be >= 0 (0: greedy)",
  ]


def test_every_problem_is_listed_in_one_error():
  cfg = _config("sft", "tiny")
  cfg.optimizer.learning_rate = -1.0
  cfg.total_steps = 0
  cfg.eval.batch_size = 0
  with pytest.raises(SettingsError) as e:
    config_check.check_config(cfg, "train", num_devices=1, num_processes=1)
  assert str(e.value).splitlines() == [
      "5 bad settings:",
      "  eval.batch_size = 0: must be >= 1",
      "  total_steps = 0: must be >= 1",
      "  optimizer.learning_rate = -1.0: must be >= 0",
      # total_steps is a reference: the schedule follows it.
      "  optimizer.total_steps = 0: must be >= 1",
      "  optimizer.warmup_steps = 2: must be <= optimizer.total_steps (0)",
  ]


# ---------------------------------------------------------------- fields


def test_unknown_field_names_the_nearest_known_one():
  cfg = _config("sft", "tiny")
  cfg.optimizer.lr = 0.1  # a config file's typo: not locked there
  cfg.eval.corpus_sise = 10
  cfg.learning_rate = 0.1
  assert _problems(cfg) == [  # in the config's (sorted) order
      "eval.corpus_sise: unknown field; did you mean eval.corpus_size?",
      "learning_rate: unknown field; did you mean optimizer.learning_rate?",
      "optimizer.lr: unknown field; did you mean optimizer.learning_rate?",
  ]


def test_unknown_names_in_fields_of_names():
  cfg = _config("sft", "tiny")
  cfg.loss.weights.infonse = 1.0
  cfg.random_init = dict(cfg.random_init, num_layer=3)
  problems = _problems(cfg)
  assert len(problems) == 2
  assert problems[0] == (
      "loss.weights.infonse: unknown name; did you mean infonce? (known: "
      "grpo, grpo_seq, infonce, kl, sft, triplet)"
  )
  assert problems[1].startswith(
      "random_init.num_layer: unknown name; did you mean num_layers? "
      "(known: arch, vocab_size, "
  )


def test_wrong_types():
  cfg = _config("eval", "tiny")
  cfg.eval = ml_collections.ConfigDict(
      dict(cfg.eval.to_dict(), corpus_size="500", splits=("dev_sub", 3))
  )
  assert _problems(cfg, "eval") == [
      "eval.corpus_size = '500': must be an integer",
      "eval.splits = ('dev_sub', 3): must be a list of strings",
  ]


def test_nested_stage1_is_checked_as_a_stage1_config():
  cfg = _config("rl", "tiny")
  cfg.stage1.optimizer.learning_rate = -1.0
  cfg.stage1.optimizer.warmup_steps = 100
  cfg.stage1.optimizer.lr = 1.0
  assert _problems(cfg) == [
      "stage1.optimizer.lr: unknown field; did you mean "
      "stage1.optimizer.learning_rate?",
      "stage1.optimizer.learning_rate = -1.0: must be >= 0",
      "stage1.optimizer.warmup_steps = 100: must be <= "
      "stage1.optimizer.total_steps (6)",
  ]


def test_unknown_override_paths_name_the_nearest_field():
  cfg = _config("rl", "tiny")
  assert config_check.unknown_overrides(
      cfg,
      ["stage1.optimizer.lr", "total_steps", "nope.deeper", "total_steps.x"],
      "config",
  ) == [
      "--config.stage1.optimizer.lr: unknown field; did you mean "
      "--config.stage1.optimizer.learning_rate?",
      "--config.nope.deeper: unknown field",
      "--config.total_steps.x: config.total_steps is a single setting (4), "
      "it has no field 'x'",
  ]


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "mesh,message",
    [
        (
            (3, -1, 1),
            "mesh = (3, -1, 1): the fixed sizes multiply to 3, which does not "
            "divide the 8 devices",
        ),
        ((2, 2, 1), "mesh = (2, 2, 1): multiplies to 4 devices, there are 8"),
        (
            (-1, -1, 1),
            "mesh = (-1, -1, 1): at most one size may be -1 (the rest)",
        ),
        ((0, 8, 1), "mesh = (0, 8, 1): sizes must be integers >= 1, or -1"),
    ],
)
def test_mesh_that_does_not_divide_the_devices(mesh, message):
  cfg = _config("eval", "tiny")
  cfg.mesh = mesh
  assert _only(cfg, "eval", devices=8) == message


def test_batch_that_does_not_divide_the_data_parallel_axes():
  cfg = _config("sft", "tiny")  # batch_size 4
  cfg.mesh = (1, -1, 1)
  assert _only(cfg, devices=8) == (
      "batch_size = 4: must be a multiple of 8, the devices of the mesh's "
      "data x fsdp axes (mesh (1, 8, 1)); change it or the mesh"
  )
  cfg.mesh = (1, 4, 2)  # 4-way data parallel: 4 divides
  assert not _problems(cfg, devices=8)


def test_stage2_rollouts_against_the_data_parallel_axes():
  cfg = _config("rl", "tiny")  # 2 queries x 4 rollouts
  cfg.stage1_first = False  # the stage-1 block does not run
  cfg.mesh = (1, -1, 1)
  assert not _problems(cfg, devices=8)
  cfg.rl.group_size = 3
  assert _only(cfg, devices=8).startswith(
      "rl.queries_per_step x rl.group_size (2 x 3) = 6: must be a multiple "
      "of 8"
  )
  # Where stage 1 runs first, its batch counts too.
  cfg.rl.group_size = 4
  cfg.stage1_first = True
  assert _only(cfg, devices=8).startswith(
      "stage1.batch_size = 4: must be a multiple of 8"
  )


# ---------------------------------------------------------------- errors


def test_user_errors_are_told_from_bugs():
  from search_r3_jax.core.weights.common import WeightsError
  from search_r3_jax.data.common import DataError
  from search_r3_jax.training.checkpoint import CheckpointError

  for e in (
      SettingsError(["x = 1: must be >= 2"]),
      CheckpointError("checkpoint of step 4 could not be written: full"),
      DataError("f.jsonl:3: bad"),
      WeightsError("w.gguf is truncated"),
      FileNotFoundError("no such file x"),
  ):
    assert cli.is_user_error(e), e
  for e in (ValueError("a bug"), KeyError("a bug"), AttributeError("x")):
    assert not cli.is_user_error(e), e
  argv = ["prog", "--verbose"]
  assert cli.verbose(argv) and not cli.verbose(argv + ["--noverbose"])


def test_eval_checks_before_it_writes(tmp_path):
  from search_r3_jax import eval as eval_program

  cfg = _config("eval", "tiny")
  cfg.eval.corpus_size = -1
  with pytest.raises(SettingsError, match="eval.corpus_size = -1"):
    eval_program.evaluate(cfg, output=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    eval_program.evaluate(
        _config("eval", "tiny"), workdir=str(tmp_path / "missing")
    )
  assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- programs


def _program(module, *args):
  return subprocess.run(
      [sys.executable, "-m", f"search_r3_jax.{module}", *args],
      cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS=""),  # one CPU device
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


def _one_line_error(out) -> str:
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  return lines[0]


def test_train_refuses_a_bad_setting_before_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  out = _program(
      "train",
      f"--config={ROOT / 'configs' / 'sft.py'}:tiny",
      f"--workdir={workdir}",
      "--config.optimizer.learning_rate=-0.1",
  )
  assert _one_line_error(out) == (
      "error: bad setting: optimizer.learning_rate = -0.1: must be >= 0"
  )
  assert not workdir.exists()


def test_train_refuses_an_override_of_an_unknown_field(tmp_path):
  """ml_collections fails such an override inside absl's flag parsing
  (AttributeError after a long traceback, before main)."""
  workdir = tmp_path / "run"
  out = _program(
      "train",
      f"--config={ROOT / 'configs' / 'rl.py'}:tiny",
      f"--workdir={workdir}",
      "--config.stage1.optimizer.lr=0.1",
  )
  assert _one_line_error(out) == (
      "error: bad setting: --config.stage1.optimizer.lr: unknown field; "
      "did you mean --config.stage1.optimizer.learning_rate?"
  )
  assert not workdir.exists()


def test_encode_refuses_an_empty_file(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = _program("encode", f"--input={empty}", f"--output={tmp_path / 'e'}")
  assert _one_line_error(out) == (
      f"error: {empty}: no texts to encode (the file is empty)"
  )
  assert not list(tmp_path.glob("e*.npy"))


def test_a_truncated_weight_file_is_one_line(tmp_path):
  from search_r3_jax.core.weights.gguf import find_smollm2_gguf

  truncated = tmp_path / "truncated.gguf"
  with open(find_smollm2_gguf(), "rb") as f:
    truncated.write_bytes(f.read(1 << 20))  # the header and a few tensors
  texts = tmp_path / "texts.txt"
  texts.write_text("paris is a city\n")
  out = _program(
      "encode",
      f"--input={texts}",
      f"--output={tmp_path / 'e.npy'}",
      f"--model={truncated}",
  )
  line = _one_line_error(out)
  assert line.startswith(f"error: {truncated} is truncated or corrupt")
