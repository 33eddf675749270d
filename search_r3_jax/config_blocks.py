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
  # Before loading the model the step is compiled from abstract shapes and
  # its memory per device printed (training/memory.py); a step whose peak
  # exceeds `max_device_gib` (0: the device's own limit where JAX reports
  # one) stops the run there.
  c.memory_report = True
  c.max_device_gib = 0.0
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
          # "": Adam's moments in the parameters' dtype; "float32":
          # float32 moments over float32 master weights (for bfloat16
          # parameters); "bfloat16": the first moment in bfloat16 (the
          # second follows the parameters).
          state_dtype="",
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
  elif arg in RECIPES:
    apply_recipe(c, arg, stage=1)
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r}; known: tiny, {', '.join(RECIPES)}"
    )
  return c


# Recipes for the paper's model, Qwen2.5-1.5B-Instruct (an HF directory:
# --config.model_dir=DIR or SEARCH_R3_QWEN2_5_1_5B_DIR). Each names a
# target and the settings that size the run for it; the paper's settings
# (G = 8, clip 0.2, beta 1e-3, temperature 1, 128 reasoning tokens) are the
# stage-2 defaults already. `training/memory.py` reports what each needs
# per device before the first step (docs/accelerators.md).
RECIPES = {
    # One TPU v5e chip (Colab's TPU runtime, 16 GB of HBM): bfloat16
    # parameters and bfloat16 Adam moments, every block rematerialised,
    # small batches, and no frozen reference (its 2.9 GB): stage 1 without
    # the KL term, stage 2 with beta 0, as GRACE trains the same model.
    "qwen1.5b-v5e-1": dict(
        mesh=(1, 1, 1),
        param_dtype="bfloat16",
        state_dtype="bfloat16",
        remat="full",
        reference=False,
        stage1=dict(batch_size=4, query_len=192, doc_len=160, negatives=1),
        stage2=dict(queries_per_step=1, logprob_chunk=64),
    ),
    # A TPU v5e-8 slice (8 chips, 16 GB each): FSDP over the 8 chips,
    # bfloat16 parameters with float32 Adam moments over float32 master
    # weights, every block rematerialised.
    "qwen1.5b-v5e-8": dict(
        mesh=(1, 8, 1),
        param_dtype="bfloat16",
        state_dtype="float32",
        remat="full",
        stage1=dict(batch_size=16, query_len=256, doc_len=256, negatives=3),
        stage2=dict(queries_per_step=4, logprob_chunk=128),
    ),
    # 8 H100s (80 GB each): FSDP over the 8 GPUs, float32 parameters and
    # moments with bfloat16 matmuls (MaxText's default split), cuDNN flash
    # attention through jax.nn.dot_product_attention; the blocks are
    # rematerialised (without, XLA's estimate for batch 32 is far over 80 GB).
    "qwen1.5b-8xh100": dict(
        mesh=(1, 8, 1),
        param_dtype="float32",
        state_dtype="",
        remat="full",
        stage1=dict(batch_size=64, query_len=256, doc_len=256, negatives=3),
        stage2=dict(queries_per_step=16, logprob_chunk=128),
    ),
}


def apply_recipe(c: ml_collections.ConfigDict, name: str, stage: int) -> None:
  """Sets `c` (a stage-1 or stage-2 config) to recipe `name`."""
  r = RECIPES[name]
  c.model = "qwen2.5-1.5b-instruct"
  c.mesh = r["mesh"]
  c.param_dtype = r["param_dtype"]
  c.compute_dtype = "bfloat16"
  c.attention = "dot_product"
  c.remat = r["remat"]
  c.optimizer.state_dtype = r["state_dtype"]
  keep_reference = r.get("reference", True)
  # The full corpus, documents cut to 256 tokens.
  c.eval.update(corpus_size=0, doc_len=256, batch_size=64, max_queries=0)
  if stage == 1:
    s = r["stage1"]
    c.batch_size = s["batch_size"]
    c.query_len, c.doc_len = s["query_len"], s["doc_len"]
    c.data.num_negatives = s["negatives"]
    c.total_steps = 2000
    c.optimizer.update(learning_rate=1e-5, warmup_steps=100)
    c.reasoning.update(max_new_tokens=128, batch_size=32)
    c.eval.max_new_tokens = 128
    if not keep_reference:
      c.loss.weights.kl = 0.0
    c.eval_every = 500
    c.checkpoint_every = 250
  else:
    s = r["stage2"]
    c.rl.update(
        queries_per_step=s["queries_per_step"],
        max_new_tokens=128,
        max_query_tokens=64,
        length_bucket=64,
        logprob_chunk=s["logprob_chunk"],
    )
    c.env.update(engine="scann")
    if not keep_reference:
      c.loss.beta = 0.0
    c.train_corpus.size = 0
    c.total_steps = 500
    # GRACE's GRPO rate on the same model (PAPER.md).
    c.optimizer.update(learning_rate=1e-6, warmup_steps=10)
    c.eval_every = 100
    c.checkpoint_every = 50
