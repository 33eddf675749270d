"""Config blocks shared by the experiment files in `configs/`.

Each block is built once here, and where a dataclass owns the defaults (the
environment's `EnvConfig`, the rewards' `DEFAULT_WEIGHTS`) the block is read
from it, so a default is written in one place. An experiment file composes
the blocks and changes only what it is about:

    c = config_blocks.base(stage=2, workdir="runs/rl")
    c.env = config_blocks.env(refresh_every=5)
"""

from __future__ import annotations

import dataclasses

import ml_collections

from search_r3_jax.retrieval.env_config import EnvConfig
from search_r3_jax.training.analyses import AnalysisConfig
from search_r3_jax.training.rewards import DEFAULT_WEIGHTS

# The random 2-layer model with SmolLM2's tokenizer that every `tiny`
# variant trains: prime-ish small sizes, seconds per step on a CPU.
TINY_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
)


def base(stage: int, workdir: str) -> ml_collections.ConfigDict:
  """The model, mesh and bookkeeping fields every training config has."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.workdir = workdir  # --workdir overrides
  c.seed = 0
  # Model: a preset, HF directory or GGUF file. `init_from` (a workdir or
  # checkpoint) starts from trained parameters instead; `random_init` (a
  # dict of ModelConfig overrides) from a random model of `model`'s
  # tokenizer.
  c.model = "smollm2-135m"
  c.model_dir = ml_collections.FieldReference(None, field_type=str)
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.random_init = ml_collections.FieldReference(None, field_type=dict)
  c.compute_dtype = "float32"
  c.param_dtype = "float32"
  # How the blocks compute, not what: "einsum" or "dot_product"
  # (jax.nn.dot_product_attention); rematerialisation per block "none",
  # "full" or "dots_saveable" (core/config.py).
  c.attention = "einsum"
  c.remat = "none"
  c.mesh = (1, -1, 1)  # ('data', 'fsdp', 'tensor'); -1 is "the rest"
  c.log_every = 1
  c.keep_checkpoints = 3
  return c


def data(**overrides) -> ml_collections.ConfigDict:
  """The data source: `wiki_fanout` (the embedded default), or "beir" /
  "triples" with `path`."""
  d = ml_collections.ConfigDict()
  d.name = "wiki_fanout"
  d.path = ml_collections.FieldReference(None, field_type=str)
  d.data_dir = ml_collections.FieldReference(None, field_type=str)
  d.split = "train"
  # One BM25-mined hard negative per example (plus in-batch negatives): the
  # CPU default; raise it where there is compute.
  d.num_negatives = 1
  d.update(overrides)
  return d


def optimizer(
    c: ml_collections.ConfigDict, **overrides
) -> ml_collections.ConfigDict:
  """AdamW with warmup and cosine decay over `c.total_steps` (a reference:
  `--config.total_steps` moves the schedule with it)."""
  o = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-4,
          warmup_steps=16,
          total_steps=c.get_ref("total_steps"),
          end_lr_fraction=0.1,
          weight_decay=0.01,
          b1=0.9,
          b2=0.95,
          clip_norm=1.0,
          grad_accum_steps=1,
          # The learning rate of `<|embed_token|>`'s row relative to the
          # rest (stage 1 raises it: see train_state.scale_token_rows).
          embed_token_lr_scale=1.0,
      )
  )
  o.update(overrides)
  return o


def evaluation(**overrides) -> ml_collections.ConfigDict:
  """Dev evaluation: the splits, the corpus (every gold page of the
  evaluated questions plus sampled distractors up to `corpus_size`; 0 is
  the full corpus), documents cut to `doc_len` tokens."""
  e = ml_collections.ConfigDict(
      dict(
          splits=("dev_sub", "dev_top"),
          corpus_size=2000,
          doc_len=128,
          batch_size=32,
          max_queries=0,
          at_start=True,
      )
  )
  e.update(overrides)
  return e


def env(**overrides) -> ml_collections.ConfigDict:
  """The retrieval environment: `EnvConfig`'s fields and defaults."""
  values = dataclasses.asdict(EnvConfig())
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(
        f"unknown environment setting(s) {unknown}; known: " f"{sorted(values)}"
    )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def rewards(**overrides) -> dict:
  """Reward name -> weight, from `rewards.DEFAULT_WEIGHTS`."""
  return dict(DEFAULT_WEIGHTS, **overrides)


def reasoning(**overrides) -> ml_collections.ConfigDict:
  """Stage 1's reasoning queries: `analyses.AnalysisConfig`'s fields and
  defaults (the share of training queries the starting model writes an
  analysis for, its budget and sampling, the rejection filter), and
  `batch_share`, the share of each batch that is reasoning queries."""
  values = dataclasses.asdict(AnalysisConfig())
  # The share of every batch that is reasoning queries: plain examples give
  # way to the kept analyses' queries, in turn, where a batch has fewer.
  values["batch_share"] = 0.5
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(
        f"unknown reasoning setting(s) {unknown}; known: {sorted(values)}"
    )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def stage1(arg: str = "") -> ml_collections.ConfigDict:
  """Stage 1 on the embedded default (configs/sft.py, and the first half of
  the main job in configs/rl.py); `arg` "tiny" is the seconds-long variant
  for tests."""
  c = base(stage=1, workdir="runs/sft")
  c.data = data()
  # Tokens per query row (prompt + response): a reasoning query needs about
  # 59 for its template, up to 35 for the query and the rest of the row for
  # the analysis.
  c.query_len = 128
  c.doc_len = 128  # tokens per document row (prompt + text)
  c.reasoning = reasoning()

  # Optimisation. `loss.weights` names registered losses (training/losses.py).
  c.batch_size = 8
  c.total_steps = 160
  # `<|embed_token|>`'s row learns 30x faster than the rest: from the mean
  # row at 1e-4 it does not win at the end of the suffix in a CPU-sized run.
  c.optimizer = optimizer(c, embed_token_lr_scale=30.0)
  c.loss = ml_collections.ConfigDict(
      dict(
          weights=dict(sft=1.0, kl=1.0, infonce=1.0, triplet=1.0),
          tau=0.05,
          margin=0.2,
          in_batch=True,
      )
  )

  # Evaluation and checkpoints.
  c.eval_every = 80
  c.checkpoint_every = 20
  # Reasoning queries are evaluated with stage 2's budget of 48 tokens.
  c.eval = evaluation(max_new_tokens=48)

  if arg == "tiny":
    c.random_init = dict(TINY_MODEL)
    c.batch_size = 4
    c.total_steps = 6
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.embed_token_lr_scale = 1.0
    c.query_len = 80
    c.doc_len = 64
    c.reasoning.update(max_new_tokens=8, batch_size=8)
    c.eval_every = 3
    c.checkpoint_every = 2
    c.eval.update(
        corpus_size=64,
        doc_len=32,
        batch_size=16,
        max_queries=16,
        at_start=False,
    )
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: tiny")
  return c
