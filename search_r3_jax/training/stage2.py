r"""Stage 2: GRPO over reasoning and embedding, inside the retrieval loop.

    python -m search_r3_jax.train --config=configs/rl.py
    python -m search_r3_jax.train --config=configs/rl.py:tiny --workdir=/tmp/t

Each step:
  1. rollout: `queries_per_step` training queries, `group_size` samples of
     reasoning + `<|embed_token|>` each, from the current policy (the jitted
     sampler, KV cache);
  2. forward: one pass of the sampling parameters over prompt + response
     (+ the embed suffix where the token was not emitted) gives the old
     log-probabilities and every rollout's embedding;
  3. search + reward: the embeddings are searched in the environment's index
     and scored by the registered rewards; advantages are group-normalised;
     the environment marks the gold and retrieved documents;
  4. update: `inner_epochs` calls of the jitted, donated GRPO step;
  5. refresh: the environment re-encodes the regions that drifted and the
     documents the step touched, with the new parameters.

The environment's corpus is a seeded sample of `train_corpus.size`
documents of the whole corpus (0: all of it), drawn from the document ids
alone, documents cut to `eval.doc_len` tokens. Training queries are the data
set's training pairs whose positive is in that corpus (for wiki_fanout: page
titles and first sentences), the positive being the one gold document. No
evaluation question chooses either; the evaluation has its own corpus
(`eval.corpus_size`: every gold page of the evaluated dev questions plus
sampled distractors, or the full corpus). Where the two corpora are the
same documents, the environment's first index is seeded with the step-0
evaluation's document embeddings.

Outputs in the workdir, besides stage 1's (config.json, metrics.jsonl, tb/,
plots/, checkpoints/): env/<step>/ (the environment at each checkpoint, for
resume) and samples/step_<n>.jsonl (the reasoning the model wrote for each
evaluated dev question).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Optional, Sequence

import jax
import numpy as np

from search_r3_jax.core import distributed
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.ops import round_up
from search_r3_jax.core.policy import Policy
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.tokenizer import embed_suffix_ids
from search_r3_jax.data import sources as data_lib
from search_r3_jax.data.common import split_fields
from search_r3_jax.data.common import to_python
from search_r3_jax.retrieval import environment as environment_lib
from search_r3_jax.retrieval import evaluation
from search_r3_jax.retrieval import sharded as sharded_lib
from search_r3_jax.retrieval.environment import document_encoder
from search_r3_jax.retrieval.environment import EnvConfig
from search_r3_jax.retrieval.environment import RetrievalEnvironment
from search_r3_jax.retrieval.index import read_meta
from search_r3_jax.retrieval.sharded import ShardedEnvironment
from search_r3_jax.training import advantages as advantages_lib
from search_r3_jax.training import grpo
from search_r3_jax.training import losses as losses_lib
from search_r3_jax.training import memory
from search_r3_jax.training import rewards as rewards_lib
from search_r3_jax.training import rollouts as rollouts_lib
from search_r3_jax.training import train_state as ts_lib
from search_r3_jax.training import trainer
from search_r3_jax.training.checkpoint import cause
from search_r3_jax.training.rollouts import Rollouts
from search_r3_jax.training.runtime import say
from search_r3_jax.training.trainer import Guard
from search_r3_jax.training.trainer import ResumeConfigError
from search_r3_jax.training.workdir import load_model
from search_r3_jax.training.workdir import planned_model

RANK_BINS = (("rank_1", 1, 1), ("rank_2_3", 2, 3), ("rank_4_10", 4, 10))


# ------------------------------------------------------------------ queries


def training_queries(
    data_cfg, corpus: dict[str, str], kinds: Sequence[str] = ()
) -> list[tuple[str, tuple[str, ...]]]:
  """(query, gold doc ids) of the training split `data_cfg.split`, keeping
  the gold documents that are in `corpus` and the queries left with one.

  The split is either training pairs with a `positive_id` (wiki_fanout's
  `train`, a triples file that names its positives; `kinds` keeps only those
  query kinds, e.g. wiki_fanout's "title" / "first_sentence") or judged
  queries (a BEIR folder's `train` qrels: every document judged relevant,
  score > 0, is gold). Order: the data set's.
  """
  builder = data_lib.builder_for(data_cfg)
  if data_cfg.split not in builder.info.splits:
    raise ValueError(
        f"data {data_cfg.name!r} has no split "
        f"{data_cfg.split!r}; it has {sorted(builder.info.splits)}"
    )
  names = set(split_fields(builder.info, data_cfg.split))
  if "positive_id" not in names and "doc_ids" not in names:
    raise ValueError(
        f"data {data_cfg.name!r} split {data_cfg.split!r}: "
        "stage 2 needs the gold documents of each training "
        "query (a positive_id, or judged doc_ids); this split "
        f"has the fields {sorted(names)}"
    )
  out = []
  for rec in builder.as_data_source(split=data_cfg.split):
    rec = to_python(rec)
    if kinds and "query_kind" in rec and rec["query_kind"] not in kinds:
      continue
    if "positive_id" in rec:
      gold = [rec["positive_id"]]
    else:
      gold = [d for d, s in zip(rec["doc_ids"], rec["scores"]) if s > 0]
    gold = tuple(d for d in gold if d in corpus)
    if gold:
      out.append((rec["query"], gold))
  if not out:
    raise ValueError(
        f"data {data_cfg.name!r} split {data_cfg.split!r}: no "
        f"training query (of kinds {list(kinds) or 'any'}) has "
        f"a gold document among the {len(corpus)} corpus "
        "documents"
    )
  return out


class QueryStream:
  """Training queries in a fresh seeded order every epoch, resumable.

  On a pod each process draws from its own shard of every epoch's order:
  entries p, p + n, p + 2n, ... of it (the epoch cut to a multiple of the n
  processes), so the processes' draws, interleaved, are one process's."""

  def __init__(
      self,
      pairs: list[tuple[str, tuple[str, ...]]],
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
  ):
    self.pairs = list(pairs)
    self.seed = int(seed)
    self.process_index, self.process_count = process_index, process_count
    if len(self.pairs) < process_count:
      raise ValueError(
          f"{len(self.pairs)} training queries cannot be shared by "
          f"{process_count} processes"
      )
    self.epoch, self.cursor = 0, 0

  def _order(self) -> np.ndarray:
    order = np.random.default_rng([self.seed, self.epoch]).permutation(
        len(self.pairs)
    )
    if self.process_count > 1:
      order = order[: len(order) - len(order) % self.process_count]
      order = order[self.process_index :: self.process_count]
    return order

  def next(self, n: int) -> list[tuple[str, tuple[str, ...]]]:
    out, order = [], self._order()
    while len(out) < n:
      if self.cursor == len(order):
        self.epoch, self.cursor = self.epoch + 1, 0
        order = self._order()
      out.append(self.pairs[order[self.cursor]])
      self.cursor += 1
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self.pairs)}

  def set_state(self, state: dict) -> None:
    if state.get("size") != len(self.pairs):
      raise ValueError(
          f"the saved query position is for {state.get('size')}"
          f" training queries, this run has {len(self.pairs)}: "
          "the data or the corpus changed since the checkpoint"
      )
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ------------------------------------------------------------------ pieces


def embed_suffix(tokenizer, prompts) -> list[int]:
  """What ends a rollout that did not emit the token: " The embedding is
  <|embed_token|>", the same ids `SearchR3.encode_queries` appends."""
  return embed_suffix_ids(tokenizer, prompts, leading_space=True)


def aux_documents(
    env, emb: np.ndarray, gold: Sequence[Sequence[str]], k: int
) -> np.ndarray:
  """[N, k, D] stored embeddings: each row's first gold document, then its
  highest-ranked non-gold documents in the index (the auxiliary InfoNCE's
  negatives)."""
  width = max((len(g) for g in gold), default=0)
  if getattr(env, "collective", False):  # one search width on every process
    width = max(int(w) for w in distributed.allgather(width))
  hits = env.search(emb, k + width)
  chosen = []
  for i, (ids, g) in enumerate(zip(hits.ids, gold)):
    negs = [d for d in ids if d not in g][: k - 1]
    if len(negs) < k - 1:
      raise ValueError(
          f"aux_documents: the index holds {len(negs)} "
          f"non-gold documents for row {i}, {k - 1} needed "
          "(lower rl.aux_documents)"
      )
    chosen += [g[0]] + negs
  # One read of the stored vectors for every row.
  return env.embeddings(chosen).reshape(len(gold), k, emb.shape[1])


def longest_row(tok, cfg) -> int:
  """The longest GRPO row a config allows with tokenizer `tok`: the
  reasoning prompt around a query of `rl.max_query_tokens`,
  `rl.max_new_tokens` sampled and the embed suffix, in `rl.length_bucket`s."""
  rl = cfg.rl
  prompts = PromptConfig()
  template = len(tok.embedding_prompt(prompts, "query", "x", reasoning=True))
  longest = (
      template
      - 1
      + int(rl.max_query_tokens)
      + int(rl.max_new_tokens)
      + len(embed_suffix(tok, prompts))
  )
  return round_up(longest, int(rl.length_bucket))


def plan_memory(cfg, model_cfg, mesh, *, seq_len: int, limit=None):
  """The GRPO update compiled ahead of time from abstract shapes for rows
  of `seq_len` tokens: (its `memory.MemoryReport`, the compiled update).
  Nothing is allocated."""
  rl = cfg.rl
  tx, schedule = ts_lib.make_optimizer(cfg.optimizer)
  graphdef, state, shardings = memory.abstract_train_state(
      model_cfg, tx, mesh, with_reference=bool(cfg.loss.beta)
  )
  n = int(rl.group_size) * int(rl.queries_per_step)
  sampling = dict(
      temperature=float(rl.temperature),
      valid_vocab=int(model_cfg.vocab_size),
      logprob_chunk=int(rl.get("logprob_chunk", 0)),
      response_window=int(rl.max_new_tokens),
  )
  step_fn, batch_sh = grpo.make_grpo_step(
      graphdef,
      tx,
      schedule,
      dict(cfg.loss.to_dict(), **sampling),
      mesh,
      shardings,
      batch_size=n,
  )
  docs = int(rl.aux_documents) if cfg.loss.aux_weight else 1
  spec = grpo.batch_shapes(n, seq_len, docs, model_cfg.hidden_size)
  batch = memory.abstract_batch(
      {k: v[0] for k, v in spec.items()},
      {k: v[1] for k, v in spec.items()},
      batch_sh,
  )
  return memory.report(
      "stage 2 update", step_fn, (state, batch), state, batch, limit
  )


class _OwnQueries:
  """A sharded environment whose searches and stored-vector reads take each
  process's own queries and ids (their numbers may differ): what scoring
  one process's rollouts needs. Every call is a collective, so `score`
  calls `search` even with nothing of its own to search."""

  collective = True

  def __init__(self, env):
    self.env = env

  def search(self, queries, k=None):
    return self.env.search(queries, k, per_process=True)

  def embeddings(self, ids):
    return self.env.embeddings(ids, per_process=True)


def _whole_step(ro: Rollouts, sc: dict) -> tuple[np.ndarray, np.ndarray, dict]:
  """(emitted, response lengths, scores) of every process's rollouts, in
  the order of the step's rows (host numbers only: rewards, ranks,
  emission, lengths), for the step's metrics."""
  if jax.process_count() == 1:
    return np.asarray(ro.has_embed, bool), ro.response_lengths(), sc
  mine = dict(
      reward=np.asarray(sc["reward"], np.float64).tolist(),
      best_rank=np.asarray(sc["best_rank"]).tolist(),
      has_embed=np.asarray(ro.has_embed, bool).tolist(),
      lengths=ro.response_lengths().tolist(),
      terms={
          k: np.asarray(v, np.float64).tolist() for k, v in sc["terms"].items()
      },
  )
  parts = distributed.allgather(mine)
  cat = lambda get: np.asarray([x for p in parts for x in get(p)])
  every = dict(
      reward=cat(lambda p: p["reward"]),
      best_rank=cat(lambda p: p["best_rank"]),
      terms={k: cat(lambda p, k=k: p["terms"][k]) for k in sc["terms"]},
  )
  return (
      cat(lambda p: p["has_embed"]).astype(bool),
      cat(lambda p: p["lengths"]),
      every,
  )


def rollout_metrics(
    ro, sc, group_size: int, max_new_tokens: int
) -> dict[str, float]:
  """The step's figures of rollouts `ro` and their scores `sc`."""
  return step_metrics(
      ro.has_embed, ro.response_lengths(), sc, group_size, max_new_tokens
  )


def step_metrics(
    has_embed: np.ndarray,
    lengths: np.ndarray,
    sc: dict,
    group_size: int,
    max_new_tokens: int,
) -> dict[str, float]:
  """`rollout_metrics` from the rollouts' emission flags and lengths.

  Of the rollouts without the token, `budget_rate` is the share of all
  rollouts that used the whole reasoning budget (`max_new_tokens`); the
  others ended their turn before emitting it.
  """
  has_embed = np.asarray(has_embed, bool)
  out_of_budget = ~has_embed & (np.asarray(lengths) >= max_new_tokens)
  reward = np.asarray(sc["reward"], np.float64)
  groups = reward.reshape(-1, group_size)
  best = np.asarray(sc["best_rank"])
  out = {
      "reward_mean": reward.mean(),
      "reward_std": reward.std(),
      "reward_group_std": groups.std(1).mean(),
      "embed_rate": float(np.mean(has_embed)),
      "budget_rate": float(np.mean(out_of_budget)),
      "reasoning_tokens": float(np.mean(lengths)),
  }
  for name, values in sc["terms"].items():
    out[f"reward_{name}"] = float(np.mean(values))
  for name, lo, hi in RANK_BINS:
    out[name] = float(np.mean((best >= lo) & (best <= hi)))
  out["rank_miss"] = float(np.mean(best == 0))
  return out


# ------------------------------------------------------------------ program


def check_config(cfg) -> None:
  """Refuses stage-2 settings that cannot run, naming the field."""
  rl = cfg.rl
  for name, low in (
      ("queries_per_step", 1),
      ("group_size", 2),
      ("max_new_tokens", 1),
      ("inner_epochs", 1),
      ("length_bucket", 1),
      ("max_query_tokens", 1),
  ):
    if int(rl[name]) < low:
      raise ValueError(
          f"rl.{name} must be >= {low}, got {rl[name]}"
          + (
              " (GRPO compares rollouts within a group)"
              if name == "group_size"
              else ""
          )
      )
  if cfg.loss.aux_weight and int(rl.aux_documents) < 2:
    raise ValueError(
        "rl.aux_documents must be >= 2 (the gold page and at "
        f"least one negative), got {rl.aux_documents}"
    )
  if not 0 < float(rl.top_p) <= 1 or float(rl.temperature) <= 0:
    raise ValueError(
        f"rl.temperature must be > 0 and rl.top_p in (0, 1]; "
        f"got {rl.temperature}, {rl.top_p}"
    )
  advantages_lib.ADVANTAGES.check([rl.get("advantage", "grpo")], "rl.advantage")
  losses_lib.LOSSES.check([cfg.loss.get("policy", "grpo")], "loss.policy")
  rewards_lib.REWARDS.check(cfg.rewards, "rewards")


# Environment settings a resumed run takes over; the others shape the saved
# index, regions and graph, so changing them needs a new workdir.
ENV_APPLIED_ON_RESUME = (
    "k",
    "probes_per_region",
    "drift_threshold",
    "drift_scale",
    "refresh_every",
    "rebuild_fraction",
    "full_refresh_every",
    "touch_neighbors",
)


@dataclasses.dataclass
class StepOutput:
  """One stage-2 step: its metrics, and the rollouts and scores behind them
  (for benchmarks and inspection)."""

  values: dict[str, float]
  rollouts: Rollouts
  scores: dict


class Stage2:
  """Stage 2 for the trainer loop: rollout, forward, search and reward,
  GRPO update, refresh.

  Attributes:
    state: the `TrainState` (replaced by every update).
    env: the `RetrievalEnvironment` (None until `prepare` or `resume`).
    evaluator: the dev evaluation over `corpus`.
    corpus: the environment's documents {id: text}.
    stream: the training queries.
  """

  name = "stage 2"
  # A resumed run keeps its model, data, seed, environment corpus, the
  # stage 1 it started from and its index structure.
  resume_refuses = (
      trainer.KEEPS_ON_RESUME
      + (
          "eval.splits",
          "eval.doc_len",
          "train_corpus",
          "stage1",
      )
      + tuple(
          f"env.{f.name}"
          for f in dataclasses.fields(EnvConfig)
          if f.name not in ENV_APPLIED_ON_RESUME
      )
  )
  # A workdir made before an environment field existed ran as its default
  # (env.shard_by_process: one whole environment per process).
  resume_defaults = {
      f"env.{f.name}": f.default
      for f in dataclasses.fields(EnvConfig)
      if f.default is not dataclasses.MISSING
  }

  def __init__(self, cfg, workdir: Optional[str] = None):
    self.cfg = cfg
    rl = cfg.rl
    check_config(cfg)
    self.group, self.nq = int(rl.group_size), int(rl.queries_per_step)
    if self.nq % jax.process_count():
      raise ValueError(
          f"rl.queries_per_step = {self.nq} does not divide over "
          f"{jax.process_count()} processes"
      )
    self.mesh = shd.make_mesh(tuple(cfg.mesh))
    self.memory = None
    if cfg.get("memory_report", True):
      # The update at its longest rows, sized before anything is allocated.
      model_cfg, tok = planned_model(cfg)
      self.memory = plan_memory(
          cfg,
          model_cfg,
          self.mesh,
          seq_len=longest_row(tok, cfg),
          limit=memory.device_limit(cfg.get("max_device_gib", 0.0)),
      )[0]
      say(self.memory.text())
      self.memory.check()
    loaded = load_model(cfg, self.mesh)
    self.tokenizer = loaded.tokenizer
    tx, schedule = ts_lib.make_optimizer(cfg.optimizer)
    self.graphdef, self.state, shardings = ts_lib.create_train_state(
        loaded.model, tx, self.mesh, with_reference=bool(cfg.loss.beta)
    )
    self._policy = Policy(
        self.graphdef,
        self.state.params,
        self.tokenizer,
        PromptConfig(),
        self.mesh,
    )
    # The update's log-probabilities are the sampler's: at its temperature,
    # over the tokenizer's ids.
    self.sampling = dict(
        temperature=float(rl.temperature),
        valid_vocab=int(self.tokenizer.vocab_size),
        logprob_chunk=int(rl.get("logprob_chunk", 0)),
        # Only the responses' positions are scored (the prompt's logits
        # are never used): at most max_new_tokens per row.
        response_window=int(rl.max_new_tokens),
    )
    self.step_fn, self.batch_sh = grpo.make_grpo_step(
        self.graphdef,
        tx,
        schedule,
        dict(cfg.loss.to_dict(), **self.sampling),
        self.mesh,
        shardings,
        batch_size=self.group * self.nq,
    )
    full = data_lib.eval_data(cfg.data, tuple(cfg.eval.splits))
    self.evaluator = evaluation.Evaluator.from_config(cfg.data, cfg.eval, full)
    # The environment's corpus: a seeded sample of the whole corpus
    # (`train_corpus`), drawn without looking at any evaluation question.
    tc = cfg.train_corpus
    self.corpus = evaluation.sample_corpus(full[0], int(tc.size), int(tc.seed))
    # Each process draws its share of every step's queries.
    self.stream = QueryStream(
        training_queries(cfg.data, self.corpus, tuple(cfg.data.query_kinds)),
        cfg.seed,
        jax.process_index(),
        jax.process_count(),
    )
    self.env_cfg = EnvConfig.from_mapping(cfg.env.to_dict())
    self.suffix = embed_suffix(self.tokenizer, self._policy.prompts)
    self.env: Optional[RetrievalEnvironment] = None
    self._eval_docs: Optional[np.ndarray] = None  # the last evaluation's
    self._update_finite = True
    # env/<step>/: the environment saved beside each checkpoint.
    self.env_root = os.path.join(workdir, "env") if workdir else None

  # -- the policy ------------------------------------------------------------

  def policy(self) -> Policy:
    """The current parameters as a `Policy`."""
    return self._policy.with_params(self.state.params)

  def encoder(self, per_process: bool = False):
    """The document encoder of the current parameters; `per_process`: each
    process encodes its own documents (a sharded environment's refresh)."""
    return document_encoder(
        self.policy(),
        max_length=self.cfg.eval.doc_len,
        batch_size=self.cfg.eval.batch_size,
        per_process=per_process,
    )

  @property
  def sharded(self) -> bool:
    cfg = getattr(self, "env_cfg", None)
    return bool(getattr(cfg, "shard_by_process", False))

  def _env_class(self):
    return ShardedEnvironment if self.sharded else RetrievalEnvironment

  # -- the trainer's hooks ---------------------------------------------------

  def summary(self) -> str:
    return (
        f"stage 2: {len(self.stream.pairs)} training queries, environment "
        f"of {len(self.corpus)} documents, {self.nq} queries x "
        f"{self.group} rollouts per step"
    )

  def position(self) -> dict:
    """The query stream's position; on a pod one per process, in process
    order (process 0 writes the checkpoint's data position)."""
    if jax.process_count() == 1:
      return {"queries": self.stream.get_state()}
    return {
        "queries_by_process": distributed.allgather(self.stream.get_state())
    }

  def resume(self, position: dict, step: int) -> None:
    n = jax.process_count()
    saved = position.get("queries_by_process")
    had = len(saved) if saved is not None else 1
    if had != n:
      raise ResumeConfigError(
          f"step {step}'s query positions were saved by {had} "
          f"process{'es' if had > 1 else ''}, this run has {n}: resume with "
          f"{had}, or use a new --workdir"
      )
    self.stream.set_state(
        saved[jax.process_index()] if saved is not None else position["queries"]
    )
    self.env = self._env_class().load(
        os.path.join(self.env_root, str(step)), self.corpus
    )
    # The refresh policy follows this run's config (`ENV_APPLIED_ON_RESUME`;
    # the trainer refused changes to the rest).
    self.env.cfg = dataclasses.replace(
        self.env.cfg,
        **{k: getattr(self.env_cfg, k) for k in ENV_APPLIED_ON_RESUME},
    )

  def build_env(self, vectors: Optional[np.ndarray] = None, step: int = 0):
    """The environment over `corpus`, from `vectors` (one per document, e.g.
    the evaluation's) or encoded with the current parameters."""
    self.env = self._env_class()(
        self.corpus,
        None if vectors is not None else self.encoder(self.sharded),
        self.env_cfg,
        step=step,
        vectors=vectors,
    )
    return self.env

  def prepare(self) -> None:
    """Builds the environment on a fresh run, seeded with the step-0
    evaluation's document embeddings when there was one (the same model and
    documents: nothing is encoded twice)."""
    if self.env is None:
      same = self._eval_docs is not None and list(self.corpus) == list(
          self.evaluator.doc_ids
      )
      self.build_env(self._eval_docs if same else None)

  def baseline(self) -> dict[str, float]:
    return evaluation.flat_figures(self.evaluator.bm25())

  @classmethod
  def evaluation_settings(cls, cfg) -> dict:
    return trainer.evaluation_settings(
        cfg, modes=(False, True), max_new_tokens=cfg.rl.max_new_tokens
    )

  def evaluate(self, step: int) -> tuple[dict[str, float], list[dict]]:
    """Dev figures with reasoning off (`split/metric`) and on
    (`split+reasoning/metric`), and the analyses the model wrote."""
    m = self.policy()
    docs = self.evaluator.documents(m)
    samples = []
    flat = self.evaluator.flat(
        m, max_new_tokens=self.cfg.rl.max_new_tokens, samples=samples, docs=docs
    )
    self._eval_docs = docs
    emitted = [v for k, v in flat.items() if k.endswith("+reasoning/emitted")]
    if emitted and not any(emitted) and not self.cfg.rl.fallback_reward:
      say(
          f"step {step}: the model emitted <|embed_token|> in none of its "
          "evaluated analyses; with rl.fallback_reward=False (the paper's "
          "rule) rollouts without it all score the format penalty and GRPO "
          "has no signal between them. Start from stage 1 (the default "
          "main job) or set rl.fallback_reward=True."
      )
    return flat, samples

  def postfix(self, values: dict) -> dict[str, str]:
    return dict(
        reward=f"{values['reward_mean']:.3f}",
        emit=f"{values['embed_rate']:.2f}",
        s=f"{values['step_seconds']:.1f}",
    )

  def update_is_finite(self) -> bool:
    return self._update_finite  # checked after every update, see `update`

  def save_extra(self, step: int) -> None:
    if self.sharded:  # every process writes its block
      self.env.save(os.path.join(self.env_root, str(step)))
      return
    # Every process holds the same environment; process 0 writes it and
    # the pod learns whether that worked.
    failed = None
    if jax.process_index() == 0:
      try:
        self.env.save(os.path.join(self.env_root, str(step)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        if jax.process_count() == 1:
          raise
        failed = cause(e)
    failed = distributed.broadcast(failed)
    if failed is not None:
      raise OSError(f"process 0 could not write the environment: {failed}")

  def prune_extra(self, kept_steps: set[int]) -> None:
    """Drops saved environments whose checkpoint orbax has dropped."""
    if (
        not kept_steps
        or jax.process_index() != 0
        or not os.path.isdir(self.env_root)
    ):
      return
    newest = max(kept_steps)
    for name in os.listdir(self.env_root):
      if name.isdigit() and int(name) not in kept_steps and int(name) < newest:
        shutil.rmtree(os.path.join(self.env_root, name), ignore_errors=True)

  @classmethod
  def extras(cls, workdir: str, step: int) -> dict[str, str]:
    return {"env": os.path.join(workdir, "env", str(step))}

  @classmethod
  def check_extra(cls, workdir: str, step: int) -> Optional[str]:
    """What is wrong with the environment saved with `step`, from its files
    (None: it looks complete; a damaged array shows when `resume` loads
    it)."""
    path = cls.extras(workdir, step)["env"]
    if not os.path.isdir(path):
      return f"no environment: {path} is missing"
    if os.path.exists(os.path.join(path, sharded_lib.MANIFEST)):
      # A sharded environment: every block it names, each complete.
      try:
        manifest = read_meta(
            os.path.join(path, sharded_lib.MANIFEST),
            "sharded environment",
            sharded_lib.FORMAT_VERSION,
            ("shards",),
        )
      except (OSError, ValueError) as e:
        return f"unreadable environment: {cause(e)}"
      for i in range(int(manifest["shards"])):
        block = os.path.join(path, sharded_lib.shard_dir(i, manifest["shards"]))
        why = cls._check_env_dir(block)
        if why is not None:
          return why
      return None
    return cls._check_env_dir(path)

  @staticmethod
  def _check_env_dir(path: str) -> Optional[str]:
    if not os.path.isdir(path):
      return f"no environment: {path} is missing"
    missing = [
        name
        for name in ("environment.json", "environment.npz", "index")
        if not os.path.exists(os.path.join(path, name))
    ]
    if missing:
      return f"incomplete environment: {path} has no " + ", ".join(missing)
    try:
      read_meta(
          os.path.join(path, "environment.json"),
          "environment",
          environment_lib.FORMAT_VERSION,
          ("config", "step", "size"),
      )
    except (OSError, ValueError) as e:
      return f"unreadable environment: {cause(e)}"
    return None

  # -- one step, in its phases -----------------------------------------------

  def _put(self, key: str, x: np.ndarray, ro: Rollouts) -> jax.Array:
    """One array of the update's batch from this process's rows of it (the
    rollouts it sampled, `ro`): no process holds another's rows.

    Raises:
      ValueError: the update's batch sharding puts other rows on this
        process's devices than the sampler did.
    """
    sharding = self.batch_sh[key]
    shape = (self.group * self.nq,) + x.shape[1:]
    rows = distributed.process_rows(sharding, shape)
    mine = ro.first_query * self.group
    if (rows.start, rows.stop) != (mine, mine + len(x)):
      raise ValueError(
          f"the update's batch puts rows {rows.start}..{rows.stop - 1} on "
          f"process {jax.process_index()}, whose rollouts are rows "
          f"{mine}..{mine + len(x) - 1}: the mesh's batch axes must order "
          "processes alike for sampling and training"
      )
    return jax.make_array_from_process_local_data(sharding, x, shape)

  def rollout(self, step: int) -> tuple[list, Rollouts]:
    """Draws `queries_per_step` training queries and samples `group_size`
    reasoning rollouts of each from the current policy: (every query of the
    step with its gold, in one process's order; the rollouts this process
    sampled, whole groups from `first_query` on)."""
    rl = self.cfg.rl
    # This process's share of the step's queries; the step's rollouts are
    # sampled for all of them together, in one process's order.
    batch_q = self.stream.next(self.nq // jax.process_count())
    if jax.process_count() > 1:
      batch_q = [
          (q, tuple(g))
          for q, g in distributed.interleave(distributed.allgather(batch_q))
      ]
    ro = rollouts_lib.sample(
        self.policy(),
        [q for q, _ in batch_q],
        group_size=self.group,
        max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature,
        top_p=rl.top_p,
        seed=self.cfg.seed * 1_000_003 + step,
        max_query_tokens=rl.max_query_tokens,
        local=True,
    )
    return batch_q, ro

  def forward(self, ro: Rollouts) -> tuple[dict, jax.Array, np.ndarray]:
    """The GRPO batch on the device, the sampling policy's old
    log-probabilities and the embedding of each of this process's
    rollouts (one forward pass)."""
    tok = self.tokenizer
    longest = max(
        (
            len(p) + len(r) + len(self.suffix)
            for p, r in zip(ro.prompts, ro.responses)
        ),
        default=1,
    )
    # One shape on every process: the longest row of the whole step.
    longest = max(int(x) for x in distributed.allgather(longest))
    # Lengths in buckets, so the forward and the update compile a few
    # shapes, not one per step.
    host = rollouts_lib.grpo_batch(
        ro,
        embed_token_id=tok.embed_token_id,
        pad_id=tok.pad_id,
        seq_len=round_up(longest, self.cfg.rl.length_bucket),
        suffix=self.suffix,
        end_ids=tok.eos_ids,
    )
    grpo.check_window(host["mask"], self.sampling["response_window"])
    dev = {k: self._put(k, v, ro) for k, v in host.items()}
    old_logp, emb = grpo.policy_outputs(
        self.graphdef,
        self.state.params,
        dev["tokens"],
        dev["lengths"],
        dev["embed_pos"],
        targets=dev["targets"],
        mask=dev["mask"],
        **self.sampling,
    )
    # This process's rows only, each whole (the hidden axis gathered
    # within the process where the model axis splits it).
    emb = jax.device_put(
        emb, shd.batch_sharding(self.mesh, 2, batch_size=emb.shape[0])
    )
    return dev, old_logp, distributed.local_rows(emb)

  def reward(
      self, ro: Rollouts, gold: list[list[str]], emb: np.ndarray
  ) -> tuple[dict, np.ndarray]:
    """Searches and rewards this process's rollouts (`gold`: every query's
    of the step), marks what the whole step touched in the environment;
    returns the scores of this process's rollouts and the auxiliary
    InfoNCE's documents."""
    rl = self.cfg.rl
    env = self.env
    if self.sharded and jax.process_count() > 1:
      env = _OwnQueries(env)  # each process searches its own rollouts
    mine = gold[ro.first_query : ro.first_query + ro.size // self.group]
    sc = rollouts_lib.score(
        env,
        ro,
        mine,
        group_size=self.group,
        weights=dict(self.cfg.rewards),
        k=self.env_cfg.k,
        embeddings=emb if rl.fallback_reward else None,
        advantage=rl.get("advantage", "grpo"),
    )
    if self.cfg.loss.aux_weight:
      docs = aux_documents(
          env, emb, [mine[q] for q in ro.query_index], rl.aux_documents
      )
    else:  # the loss skips the auxiliary InfoNCE; a placeholder of one row
      docs = np.zeros((len(emb), 1, emb.shape[1]), np.float32)
    # Every process's environment (or block) marks what the whole step
    # touched: the queries' gold and every process's retrieved lists.
    retrieved = [
        r for part in distributed.allgather(sc["retrieved"]) for r in part
    ]
    self.env.observe(gold, retrieved)
    return sc, docs

  def update(self, batch: dict, guard: Optional[Guard]) -> dict[str, float]:
    """`inner_epochs` GRPO steps on one batch, each guarded; then one
    document's forward with the new parameters."""
    for _ in range(self.cfg.rl.inner_epochs):
      self.state, metrics = self.step_fn(self.state, batch)
      values = {k: float(v) for k, v in distributed.to_host(metrics).items()}
      if guard is not None:
        guard(values)
    # The loss and gradient above were computed before the update; an
    # exploding update leaves both finite and the parameters useless. One
    # document's forward with the new parameters catches it before they
    # reach the refresh or a checkpoint.
    probe = self.encoder()(self.env.texts[:1])
    self._update_finite = bool(np.isfinite(probe).all())
    values["update_finite"] = float(self._update_finite)
    if guard is not None:
      guard(values)
    return values

  def run_step(self, step: int, guard: Optional[Guard] = None) -> StepOutput:
    """One loop step, timed phase by phase."""
    times = {}
    t = time.perf_counter()
    batch_q, ro = self.rollout(step)
    times["time_rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    dev, old_logp, emb = self.forward(ro)
    times["time_forward"] = time.perf_counter() - t

    t = time.perf_counter()
    gold = [list(g) for _, g in batch_q]
    sc, docs = self.reward(ro, gold, emb)
    times["time_reward"] = time.perf_counter() - t

    t = time.perf_counter()
    batch = dict(
        dev,
        old_logp=old_logp,
        advantages=self._put("advantages", sc["advantages"], ro),
        docs=self._put("docs", docs, ro),
    )
    values = self.update(batch, guard)
    times["time_update"] = time.perf_counter() - t

    t = time.perf_counter()
    report = self.env.maybe_refresh(step + 1, self.encoder(self.sharded))
    times["time_refresh"] = time.perf_counter() - t

    emitted, lengths, every = _whole_step(ro, sc)
    values.update(
        step_metrics(
            emitted, lengths, every, self.group, self.cfg.rl.max_new_tokens
        )
    )
    values.update(times)
    values["step_seconds"] = sum(times.values())
    values["rollout_tokens"] = float(np.sum(lengths))
    values["rollout_tokens_per_s"] = values["rollout_tokens"] / max(
        times["time_rollout"], 1e-9
    )
    if report is not None:
      values.update(
          refresh_reencoded=report["reencoded"],
          refresh_fraction=report["reencoded_fraction"],
          refresh_full=float(report["kind"] == "full"),
          refresh_drift_mean=report["drift_mean"],
          refresh_drifted_regions=report["drifted_regions"],
      )
    return StepOutput(values, ro, sc)

  def step(self, step: int, guard: Optional[Guard] = None) -> dict:
    return self.run_step(step, guard).values


__all__ = [
    "QueryStream",
    "Stage2",
    "StepOutput",
    "check_config",
    "training_queries",
]
