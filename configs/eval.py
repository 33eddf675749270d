"""Evaluation of a model on the dev questions (search_r3_jax/eval.py).

    python -m search_r3_jax.eval --config=configs/eval.py --workdir=runs/rl
    python -m search_r3_jax.eval --config=configs/eval.py \\
        --config.model=smollm2-135m --output=runs/eval_base

The full `wiki_fanout` corpus (10,033 leads, cut to 64 tokens on the CPU),
`dev_sub` and `dev_top`, reasoning off and on (greedy, at most 48 tokens:
stage 2's budget), BM25 beside, exact search (`--config.eval.engine=scann`
for ScaNN). `--config.data.path=DIR` evaluates a BEIR-layout folder instead.

`tiny` is a seconds-long variant for tests: 64 documents (every gold page
of the evaluated questions plus distractors), 8 questions per split.
"""

import ml_collections

from search_r3_jax import config_blocks as blocks


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m"  # used without --workdir
  c.model_dir = ml_collections.FieldReference(None, field_type=str)
  c.mesh = (1, -1, 1)
  c.data = blocks.data()
  c.eval = blocks.evaluation(
      corpus_size=0,
      doc_len=64,
      batch_size=32,
      max_new_tokens=48,
      reasoning=(False, True),
      bm25=True,
      engine="exact",  # or "scann"
  )
  if arg == "tiny":
    c.eval.update(corpus_size=64, doc_len=32, batch_size=16, max_queries=8)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: tiny")
  return c
