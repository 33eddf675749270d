"""What the command-line programs share: the entry every program's main goes
through, and the model flags of generate, encode and demo.

    if __name__ == "__main__":
      cli.run(main)

`run` turns an error of input or settings (a `UserError`, one of the
project's error classes in `USER_ERRORS`, a missing file, a usage error, an
override of a config field that does not exist) into one line
`error: ...` on stderr and exit status 2. Any other exception is a bug and
keeps its traceback; `--verbose` (or SEARCH_R3_VERBOSE=1) shows the
traceback of the user's errors too. Before `main`, a process of a pod joins
its peers (`core/distributed.py`: --coordinator, --num_processes,
--process_id, or the cluster's own description).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from search_r3_jax.core import distributed
from search_r3_jax.core.errors import UserError

VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Show the traceback of errors of input or settings too (also "
    "SEARCH_R3_VERBOSE=1).",
)
VERBOSE_ENV = "SEARCH_R3_VERBOSE"
EXIT_USER_ERROR = 2

# The project's errors of input or settings that are not `UserError`s, by
# module and class. They are looked up in sys.modules when an error is
# raised: a class whose module a program never imported cannot have been
# raised, and the programs that need none of them import none.
USER_ERRORS = (
    ("search_r3_jax.core.config", "ConfigError"),
    ("search_r3_jax.core.weights.common", "WeightsError"),
    ("search_r3_jax.data.common", "DataError"),
    ("search_r3_jax.retrieval.index", "IndexInputError"),
    ("search_r3_jax.training.checkpoint", "CheckpointError"),
    ("search_r3_jax.training.lock", "WorkdirLockedError"),
    ("search_r3_jax.training.runtime", "NonFiniteLossError"),
    ("search_r3_jax.training.trainer", "ResumeConfigError"),
)


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is the user's to fix (see the module docstring)."""
  if isinstance(error, (UserError, FileNotFoundError, app.UsageError)):
    return True
  for module, name in USER_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and isinstance(error, cls):
      return True
  return False


def verbose(argv: Optional[Sequence[str]] = None) -> bool:
  """--verbose or SEARCH_R3_VERBOSE=1; from `argv` before flags are
  parsed."""
  if os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false"):
    return True
  if argv is None:
    return bool(VERBOSE.present and VERBOSE.value)
  on = False
  for arg in argv[1:]:
    m = re.fullmatch(r"--?(no)?verbose(?:=(\S*))?", arg)
    if m:
      on = not m.group(1) and (m.group(2) or "true").lower() in ("true", "1")
  return on


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)`, with the user's errors as one line and status 2,
  and absl logging at WARNING unless --verbosity is given."""

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:
      # Library chatter (JAX's backends, orbax, TFDS) stays out of stderr.
      logging.set_verbosity(logging.WARNING)
    try:
      # Before anything touches a device: a pod's processes join here.
      distributed.initialize()
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e) or verbose():
        raise
      fail(str(e) or type(e).__name__)

  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser; an override of a config field that does not exist
  fails inside it (ml_collections raises AttributeError or KeyError), and
  is reported here by its path, with the nearest known field."""
  try:
    return app.parse_flags_with_usage(argv)
  except Exception:  # pylint: disable=broad-except
    problems = _override_problems(argv)
    if not problems or verbose(argv):
      raise
    from search_r3_jax import config_check

    fail(str(config_check.SettingsError(problems)))


def _flag_argument(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=VALUE` or `--name VALUE` in argv (the last)."""
  value = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.DOTALL)
    if m:
      if m.group(1) is not None:
        value = m.group(2)
      elif i + 1 < len(argv):
        value = argv[i + 1]
  return value


def _override_problems(argv: Sequence[str]) -> list[str]:
  """One line per `--NAME.PATH=...` override whose path is not a field of
  the config flag NAME's config."""
  paths: dict[str, list[str]] = {}
  for arg in argv[1:]:
    m = re.match(r"--?(\w+)\.([\w.]+)(=|$)", arg)
    if m and m.group(1) in flags.FLAGS:
      paths.setdefault(m.group(1), []).append(m.group(2))
  problems = []
  for name, wanted in paths.items():
    argument = _flag_argument(argv, name)
    if argument is None:
      continue
    try:
      config = flags.FLAGS[name].parser.parse(argument)
    except Exception:  # pylint: disable=broad-except
      continue  # the config file itself fails: its own error is shown
    # Imported here: it pulls in JAX and the training registries, which a
    # program whose flags parse never needs this early.
    from search_r3_jax import config_check

    problems += config_check.unknown_overrides(config, wanted, name)
  return problems


# ------------------------------------------------------------ model flags


def define_model_flags() -> None:
  """--model, --model_dir, --dtype, --mesh, --cpu_kernels: the flags of the
  programs that load a model by name (generate, encode, demo). Once per
  process: a second call (another of them imported) does nothing."""
  from search_r3_jax.core import kernels

  if "model" in flags.FLAGS:
    return

  flags.DEFINE_string(
      "model",
      "smollm2-135m",
      "Preset name, HF directory or .gguf file to load.",
  )
  flags.DEFINE_string(
      "model_dir",
      None,
      "Directory for presets that load user-provided weights "
      "(qwen2.5-1.5b-instruct).",
  )
  flags.DEFINE_enum(
      "dtype", "float32", ["float32", "bfloat16"], "Compute dtype."
  )
  flags.DEFINE_list(
      "mesh",
      ["1", "-1", "1"],
      "('data', 'fsdp', 'tensor') mesh sizes; -1 = the rest.",
  )
  flags.DEFINE_enum(
      "cpu_kernels",
      "auto",
      list(kernels.FLAG_VALUES),
      "Decode with a GGUF's own quantized blocks on the CPU kernels: auto "
      "where they apply, on (fail where they cannot), off (float32).",
  )


def load_model():
  """The model the model flags name, on the mesh --mesh names."""
  import jax

  from search_r3_jax import config_check
  from search_r3_jax.api import SearchR3
  from search_r3_jax.core import kernels

  f = flags.FLAGS
  try:
    mesh = [int(x) for x in f.mesh]
  except ValueError:
    raise UserError(
        f"--mesh={','.join(f.mesh)}: sizes must be integers"
    ) from None
  problems = config_check.mesh_problems(mesh, jax.device_count(), "--mesh")
  if problems:
    raise config_check.SettingsError(problems)
  return SearchR3.from_pretrained(
      f.model,
      model_dir=f.model_dir,
      compute_dtype=f.dtype,
      mesh_shape=mesh,
      cpu_kernels=kernels.FLAG_VALUES[f.cpu_kernels],
  )
