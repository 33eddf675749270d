"""Every setting of a program's config, checked before any work.

    config_check.check_config(cfg, "train")   # stage 1 or 2, as cfg.stage says
    config_check.check_config(cfg, "eval")

One pass collects every problem, each one line naming the field by its
dotted path, its value and what is allowed, and raises one `SettingsError`
listing them all:

    stage1.optimizer.learning_rate = -0.1: must be >= 0
    optimizer.lr: unknown field; did you mean optimizer.learning_rate?

What a kind knows is what its own configs define: stage 1 the fields of
`config_blocks.stage1()` (configs/sft.py), stage 2 those of configs/rl.py
(whose `stage1` block is checked as a stage-1 config of its own), the
evaluation those of configs/eval.py. A field they lack is unknown (the
nearest known name is suggested), a value of another type than theirs is
wrong. Where a field holds names rather than settings (`loss.weights`,
`rewards`, `random_init`) the names are checked against what can be chosen:
the registered losses and rewards, `ModelConfig`'s fields.

Ranges are the `Rule` tables below; the rules that read several fields
(warmup within the schedule, the mesh against the devices, batch sizes
against the mesh's data-parallel axes, registered names) are functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections

from search_r3_jax import config_blocks
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ATTENTION_IMPLS
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.config import OPTIMIZER_STATE_DTYPES
from search_r3_jax.core.config import REMAT_POLICIES
from search_r3_jax.core.errors import UserError
from search_r3_jax.retrieval.env_config import EnvConfig
from search_r3_jax.training.advantages import ADVANTAGES
from search_r3_jax.training.losses import LOSSES
from search_r3_jax.training.rewards import REWARDS

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
KINDS = ("train", "stage1", "stage2", "eval")
DTYPES = ("float32", "bfloat16", "float16")
DATA_NAMES = ("wiki_fanout", "beir", "triples")


class SettingsError(UserError, ValueError):
  """Settings that cannot run; `problems` holds one line per bad field."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    if len(self.problems) == 1:
      message = f"bad setting: {self.problems[0]}"
    else:
      message = f"{len(self.problems)} bad settings:\n" + "\n".join(
          f"  {p}" for p in self.problems
      )
    super().__init__(message)


# ------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """`path` (dotted; a last part `*` is every entry of a mapping) must
  satisfy `ok`; `allowed` says what that means."""

  path: str
  ok: Callable[[Any], bool]
  allowed: str


def at_least(path: str, low, why: str = "") -> Rule:
  return Rule(path, lambda v: v >= low, f">= {low}{why}")


def above(path: str, low) -> Rule:
  return Rule(path, lambda v: v > low, f"> {low}")


def within(path: str, lo, hi, *, open_lo=False, open_hi=False) -> Rule:
  def ok(v):
    return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

  brackets = ("(" if open_lo else "[", ")" if open_hi else "]")
  return Rule(path, ok, f"in {brackets[0]}{lo}, {hi}{brackets[1]}")


def one_of(path: str, *values) -> Rule:
  return Rule(
      path, lambda v: v in values, "one of " + ", ".join(map(repr, values))
  )


# Evaluation and data: every kind has them.
_EVAL_RULES = (
    at_least("eval.corpus_size", 0, " (0: the full corpus)"),
    at_least("eval.doc_len", 1),
    at_least("eval.batch_size", 1),
    at_least("eval.max_queries", 0, " (0: all)"),
    at_least("eval.max_new_tokens", 1),
    Rule("eval.splits", lambda v: len(v) > 0, "at least one split"),
    one_of("data.name", *DATA_NAMES),
    at_least("data.num_negatives", 0),
)
_TRAIN_RULES = _EVAL_RULES + (
    at_least("total_steps", 1),
    at_least("log_every", 1),
    at_least("checkpoint_every", 1),
    at_least("eval_every", 0, " (0: only at the end)"),
    at_least("keep_checkpoints", 1),
    one_of("compute_dtype", *DTYPES),
    one_of("param_dtype", *DTYPES),
    one_of("attention", *ATTENTION_IMPLS),
    one_of("remat", *REMAT_POLICIES),
    at_least("max_device_gib", 0, " (0: the device's own limit)"),
    one_of("optimizer.state_dtype", *OPTIMIZER_STATE_DTYPES),
    at_least("optimizer.learning_rate", 0),
    at_least("optimizer.warmup_steps", 0),
    at_least("optimizer.total_steps", 1),
    within("optimizer.end_lr_fraction", 0, 1),
    at_least("optimizer.weight_decay", 0),
    within("optimizer.b1", 0, 1, open_hi=True),
    within("optimizer.b2", 0, 1, open_hi=True),
    above("optimizer.clip_norm", 0),
    at_least("optimizer.grad_accum_steps", 1),
    # 0 is let through: the non-finite guard stops such a run (its test
    # makes a non-finite loss this way).
    at_least("loss.tau", 0),
)
STAGE1_RULES = _TRAIN_RULES + (
    one_of("stage", 1),
    at_least("batch_size", 1),
    at_least("query_len", 1),
    at_least("doc_len", 1),
    within("reasoning.share", 0, 1),
    within("reasoning.batch_share", 0, 1),
    at_least("reasoning.max_new_tokens", 1),
    at_least("reasoning.temperature", 0, " (0: greedy)"),
    at_least("reasoning.filter_group", 1),
    at_least("reasoning.batch_size", 1),
    at_least("loss.margin", 0),
    at_least("loss.weights.*", 0),
)
STAGE2_RULES = _TRAIN_RULES + (
    one_of("stage", 2),
    at_least("rl.queries_per_step", 1),
    at_least("rl.group_size", 2, " (GRPO compares rollouts within a group)"),
    at_least("rl.max_new_tokens", 1),
    above("rl.temperature", 0),
    within("rl.top_p", 0, 1, open_lo=True),
    at_least("rl.max_query_tokens", 1),
    at_least("rl.length_bucket", 1),
    at_least("rl.logprob_chunk", 0, " (0: all positions at once)"),
    at_least("rl.inner_epochs", 1),
    at_least("rl.aux_documents", 0),
    at_least("loss.clip_eps", 0),
    at_least("loss.beta", 0),
    at_least("loss.aux_weight", 0),
    at_least("train_corpus.size", 0, " (0: the whole corpus)"),
)
EVAL_RULES = _EVAL_RULES + (
    Rule(
        "eval.reasoning",
        lambda v: len(v) > 0,
        "at least one of False (off), True (on)",
    ),
    one_of("eval.engine", "exact", "scann"),
)
RULES = {"stage1": STAGE1_RULES, "stage2": STAGE2_RULES, "eval": EVAL_RULES}

# Fields whose keys are names to choose from, not settings: path -> the
# names that can be chosen (a function: registries fill in on import).
OPEN_FIELDS: dict[str, Callable[[], Sequence[str]]] = {
    "loss.weights": LOSSES.names,
    "rewards": REWARDS.names,
    "random_init": lambda: [f.name for f in dataclasses.fields(ModelConfig)],
}


# ------------------------------------------------------------------ entry


def check_config(
    config: ml_collections.ConfigDict,
    kind: str,
    *,
    num_devices: Optional[int] = None,
    num_processes: Optional[int] = None,
) -> None:
  """Checks every setting of `config` before any work.

  Args:
    config: the program's config.
    kind: "train" (stage 1 or 2, as `config.stage` says), "stage1",
      "stage2" or "eval".
    num_devices: devices the mesh spans (default: all of JAX's).
    num_processes: JAX processes (default: `jax.process_count()`).

  Raises:
    SettingsError: one line per problem, all of them.
  """
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r}; known: {', '.join(KINDS)}")
  devices = num_devices if num_devices is not None else jax.device_count()
  processes = (
      num_processes if num_processes is not None else jax.process_count()
  )
  problems = problems_of(config, kind, devices, processes)
  if problems:
    raise SettingsError(problems)


def kind_of(config) -> Optional[str]:
  """A training config's kind: "stage1" or "stage2" (None: a bad stage)."""
  return {1: "stage1", 2: "stage2"}.get(_get(config, "stage", 1))


def problems_of(
    config, kind: str, devices: int, processes: int, prefix: str = ""
) -> list[str]:
  """Every problem of `config` as a `kind` config, paths under `prefix`."""
  if kind == "train":
    kind = kind_of(config)
    if kind is None:
      return [f"{prefix}stage = {_get(config, 'stage')!r}: must be 1 or 2"]
  problems: list[str] = []
  ref = reference(kind)
  # Stage 2's `stage1` block is a stage-1 config, checked as one below.
  skip = ("stage1",) if kind == "stage2" else ()
  bad_type: set[str] = set()
  if ref is not None:
    for path, line in _structure(config, ref, ref, prefix, skip=skip):
      problems.append(line)
      bad_type.add(path)
  problems += _ranges(config, RULES[kind], bad_type, prefix)
  if kind == "stage2":
    problems += _stage2(config)
    s1 = _get(config, "stage1")
    if s1 is not None:
      # Its mesh and batch only count where it runs: first, without
      # init_from (0 devices skips them).
      runs = _get(config, "stage1_first") and not _get(config, "init_from")
      problems += problems_of(
          s1,
          "stage1",
          devices if runs else 0,
          processes,
          prefix=f"{prefix}stage1.",
      )
  if kind != "eval":
    problems += _training(config, kind, prefix)
  if devices:
    problems += _placement(config, kind, devices, processes, prefix)
  return problems


# ------------------------------------------------------------ the reference


@functools.lru_cache(maxsize=None)
def reference(kind: str) -> Optional[ml_collections.ConfigDict]:
  """The config that defines `kind`'s fields and their types (None where
  its file is not there, e.g. the package without the repository)."""
  if kind == "stage1":
    return config_blocks.stage1()
  path = CONFIGS_DIR / {"stage2": "rl.py", "eval": "eval.py"}[kind]
  if not path.is_file():
    return None
  spec = importlib.util.spec_from_file_location(f"_reference_{kind}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _is_mapping(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _get(config, path: str, default=None):
  node = config
  for part in path.split("."):
    if not _is_mapping(node) or part not in node:
      return default
    node = node[part]
  return node


def _show(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict())
  return repr(value)


def _declared(parent, key):
  """The reference's type of `parent[key]` (a FieldReference's declared
  type where its default is None)."""
  if isinstance(parent, ml_collections.ConfigDict):
    return parent.get_type(key)
  return type(parent[key])


def _fits(value, ref_value, declared) -> Optional[str]:
  """None when `value` fits the reference's type, else what it must be."""
  if ref_value is None:
    if value is None or declared in (None, type(None), object):
      return None
    if declared is dict:
      return None if _is_mapping(value) else "a dict or None"
    return (
        None
        if isinstance(value, declared)
        else (f"a {declared.__name__} or None")
    )
  if isinstance(ref_value, bool):
    return None if isinstance(value, bool) else "True or False"
  if isinstance(ref_value, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else "an integer"
  if isinstance(ref_value, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if ok else "a number"
  if isinstance(ref_value, str):
    return None if isinstance(value, str) else "a string"
  if isinstance(ref_value, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      return "a list"
    if ref_value:
      what = _fits_items(value, ref_value[0])
      if what:
        return what
    return None
  return None


def _fits_items(value, example) -> Optional[str]:
  for item in value:
    what = _fits(item, example, type(example))
    if what:
      return f"a list of {what.split(' ', 1)[-1]}s"
  return None


def _structure(
    config, ref, root, prefix: str, path: str = "", skip=()
) -> Iterator[tuple[str, str]]:
  """(path, problem) for each unknown field and each wrong type; `path` is
  relative to `root` (the reference), the problems name `prefix + path`."""
  for key in list(config.keys()):
    here = f"{path}{key}"
    shown = prefix + here
    if not path and key in skip:
      continue
    if key not in ref:
      hint = _hint(key, ref, root, path, prefix)
      yield here, f"{shown}: unknown field{hint}"
      continue
    value, ref_value = config[key], ref[key]
    if here in OPEN_FIELDS:
      yield from _open(here, value, prefix)
      continue
    if _is_mapping(ref_value):
      if not _is_mapping(value):
        yield here, f"{shown} = {_show(value)}: must be a group of fields"
      else:
        yield from _structure(value, ref_value, root, prefix, here + ".")
      continue
    what = _fits(value, ref_value, _declared(ref, key))
    if what:
      yield here, f"{shown} = {_show(value)}: must be {what}"


def _open(path: str, value, prefix: str) -> Iterator[tuple[str, str]]:
  """A field of names: each must be one that can be chosen."""
  if value is None:
    return
  if not _is_mapping(value):
    yield path, f"{prefix}{path} = {_show(value)}: must be a mapping of names"
    return
  known = OPEN_FIELDS[path]()
  for name in value.keys():
    if name not in known:
      near = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
      hint = f"; did you mean {near[0]}?" if near else ""
      yield f"{path}.{name}", (
          f"{prefix}{path}.{name}: unknown name{hint} (known: "
          f"{', '.join(known)})"
      )


def _paths(ref, prefix: str = "") -> Iterator[str]:
  for key in ref.keys():
    yield prefix + key
    if _is_mapping(ref[key]) and prefix + key not in OPEN_FIELDS:
      yield from _paths(ref[key], f"{prefix}{key}.")


def _initials(name: str) -> str:
  return "".join(w[0] for w in name.split("_") if w)


def _hint(name: str, here, root, path: str, prefix: str = "") -> str:
  """'; did you mean X?' for an unknown field `name` under `path`: the same
  name elsewhere, a close spelling here, or a name with those initials
  (lr: learning_rate)."""
  elsewhere = sorted(
      (p for p in _paths(root) if p.rsplit(".", 1)[-1] == name),
      key=lambda p: (p.count("."), p),
  )
  known = list(here.keys())
  near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  initials = [k for k in known if "_" in k and _initials(k) == name]
  if elsewhere:
    return f"; did you mean {prefix}{elsewhere[0]}?"
  if near or initials:
    return f"; did you mean {prefix}{path}{(near or initials)[0]}?"
  return ""


def _values(config, path: str) -> Iterator[tuple[str, Any]]:
  """(path, value) of `path` in `config`; `a.*` gives each entry of a."""
  if path.endswith(".*"):
    base = path[:-2]
    group = _get(config, base)
    if _is_mapping(group):
      for key in group.keys():
        yield f"{base}.{key}", group[key]
    return
  missing = object()
  value = _get(config, path, missing)
  if value is not missing:
    yield path, value


def _ranges(config, rules, bad_type: set[str], prefix: str) -> list[str]:
  problems = []
  for rule in rules:
    for path, value in _values(config, rule.path):
      if path in bad_type or value is None:
        continue
      try:
        ok = bool(rule.ok(value))
      except TypeError:
        ok = False
      if not ok:
        problems.append(
            f"{prefix}{path} = {_show(value)}: must be {rule.allowed}"
        )
  return problems


# ------------------------------------------------------ cross-field rules


def _training(config, kind: str, prefix: str) -> list[str]:
  """The rules of a training config that read several fields."""
  problems = []
  warmup = _get(config, "optimizer.warmup_steps")
  total = _get(config, "optimizer.total_steps")
  if _numbers(warmup, total) and warmup > total:
    problems.append(
        f"{prefix}optimizer.warmup_steps = {warmup!r}: must be <= "
        f"{prefix}optimizer.total_steps ({total!r})"
    )
  name, path = _get(config, "data.name"), _get(config, "data.path")
  if name in ("beir", "triples") and not path:
    problems.append(
        f"{prefix}data.path = {path!r}: {prefix}data.name={name!r} needs a "
        "path"
    )
  if kind == "stage1" and name == "beir":
    problems.append(
        f"{prefix}data.name = 'beir': stage 1 trains on 'wiki_fanout' or "
        "'triples' "
        "(a BEIR folder has no training triples; mine them into a JSONL)"
    )
  init_from = _get(config, "init_from")
  if (
      isinstance(init_from, str)
      and init_from
      and "://" not in init_from
      and not os.path.exists(init_from)
  ):
    problems.append(
        f"{prefix}init_from = {init_from!r}: no such workdir or checkpoint"
    )
  return problems


def _stage2(config) -> list[str]:
  problems = []
  aux_weight, aux_docs = (
      _get(config, "loss.aux_weight"),
      _get(config, "rl.aux_documents"),
  )
  if _numbers(aux_weight, aux_docs) and aux_weight and aux_docs < 2:
    problems.append(
        f"rl.aux_documents = {aux_docs!r}: must be >= 2 while "
        "loss.aux_weight is set (the gold page and at least one negative)"
    )
  for path, registry in (("rl.advantage", ADVANTAGES), ("loss.policy", LOSSES)):
    name = _get(config, path)
    if isinstance(name, str) and name not in registry:
      near = difflib.get_close_matches(name, registry.names(), n=1)
      hint = f"; did you mean {near[0]!r}?" if near else ""
      problems.append(
          f"{path} = {name!r}: not a registered {registry.kind}{hint} "
          f"(registered: {', '.join(registry.names())})"
      )
  env = _get(config, "env")
  if _is_mapping(env):
    known = {f.name for f in dataclasses.fields(EnvConfig)}
    try:
      EnvConfig(**{k: env[k] for k in env.keys() if k in known}).check()
    except (ValueError, TypeError) as e:
      problems.append(str(e))
  if _get(config, "data.name") == "triples":
    problems.append(
        "data.name = 'triples': stage 2 reads 'wiki_fanout' or a 'beir' "
        "folder (a triples file has no corpus or evaluation queries)"
    )
  return problems


def _numbers(*values) -> bool:
  return all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
  )


def mesh_problems(shape, devices: int, field: str = "mesh") -> list[str]:
  """What is wrong with a ('data', 'fsdp', 'tensor') mesh over `devices`
  (`shd.make_mesh`'s conditions, as lines naming `field`)."""
  axes = shd.MESH_AXES
  shown = tuple(shape) if isinstance(shape, (tuple, list)) else shape
  if not isinstance(shape, (tuple, list)) or len(shape) != len(axes):
    return [f"{field} = {shown!r}: must be {len(axes)} sizes {axes}"]
  if not _numbers(*shape) or any(
      int(s) != s or (s < 1 and s != -1) for s in shape
  ):
    return [f"{field} = {shown!r}: sizes must be integers >= 1, or -1"]
  if list(shape).count(-1) > 1:
    return [f"{field} = {shown!r}: at most one size may be -1 (the rest)"]
  known = math.prod(int(s) for s in shape if s != -1)
  if -1 in shape and devices % known:
    return [
        f"{field} = {shown!r}: the fixed sizes multiply to {known}, which "
        f"does not divide the {devices} devices"
    ]
  if -1 not in shape and known != devices:
    return [
        f"{field} = {shown!r}: multiplies to {known} devices, there are "
        f"{devices}"
    ]
  return []


def resolved_mesh(shape, devices: int) -> dict[str, int]:
  """Axis -> size of a mesh `mesh_problems` accepts (-1 filled in)."""
  known = math.prod(int(s) for s in shape if s != -1)
  sizes = [devices // known if s == -1 else int(s) for s in shape]
  return dict(zip(shd.MESH_AXES, sizes))


def batch_axes() -> tuple[str, ...]:
  """The mesh axes a batch is split over (the `batch` sharding rule)."""
  axes = dict(shd.DEFAULT_RULES)["batch"]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def data_parallel(mesh: Mapping[str, int]) -> int:
  """Devices a batch is split over."""
  return math.prod(mesh.get(a, 1) for a in batch_axes())


def _placement(
    config, kind: str, devices: int, processes: int, prefix: str
) -> list[str]:
  """The mesh against the devices, and the training batch against the
  mesh's data-parallel axes (a batch they do not divide would run
  replicated, every device computing all of it)."""
  shape = _get(config, "mesh")
  if shape is None:
    return []
  problems = mesh_problems(shape, devices, f"{prefix}mesh")
  if problems or kind == "eval":
    return problems
  mesh = resolved_mesh(shape, devices)
  split = data_parallel(mesh)
  axes = " x ".join(batch_axes())
  if kind == "stage1":
    what, size = f"{prefix}batch_size", _get(config, "batch_size")
  else:
    qps, group = _get(config, "rl.queries_per_step"), _get(
        config, "rl.group_size"
    )
    if not _numbers(qps, group):
      return problems
    what, size = (
        f"{prefix}rl.queries_per_step x {prefix}rl.group_size ({qps} x "
        f"{group})",
        qps * group,
    )
  if not _numbers(size) or size < 1:
    return problems
  if size % split:
    problems.append(
        f"{what} = {size}: must be a multiple of {split}, the devices of "
        f"the mesh's {axes} axes (mesh {tuple(mesh.values())}); change it "
        "or the mesh"
    )
  elif size % processes:
    problems.append(
        f"{what} = {size}: must be a multiple of the {processes} processes"
    )
  return problems


# ------------------------------------------------------ command-line overrides


def unknown_overrides(config, paths: Sequence[str], flag: str) -> list[str]:
  """One line per `--{flag}.PATH=...` override naming no field of `config`
  (such an override fails inside absl's flag parsing, before a program's
  main runs)."""
  problems = []
  for path in paths:
    node, walked = config, ""
    for part in path.split("."):
      if _is_mapping(node) and part in node:
        node, walked = node[part], f"{walked}{part}."
        continue
      if not _is_mapping(node):
        problems.append(
            f"--{flag}.{path}: {flag}.{walked[:-1]} is a single setting "
            f"({_show(node)}), it has no field {part!r}"
        )
      else:
        hint = _hint(part, node, config, walked)
        problems.append(
            f"--{flag}.{path}: unknown field"
            + hint.replace("did you mean ", f"did you mean --{flag}.")
        )
      break
  return problems
