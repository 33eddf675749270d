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

The environment's corpus is the evaluation corpus (every gold page of the
evaluated dev questions plus sampled distractors up to `eval.corpus_size`,
documents cut to `eval.doc_len` tokens; 0 is the full corpus). Its first
index is seeded with the document embeddings the step-0 evaluation computed
(the same model, the same documents), so nothing is encoded twice. Training
queries are the data set's training pairs whose positive is in that corpus
(for wiki_fanout: page titles and first sentences), the positive being the
one gold document.

Outputs in the workdir, besides stage 1's (config.json, metrics.jsonl, tb/,
plots/, checkpoints/): env/<step>/ (the environment at each checkpoint, for
resume) and samples/step_<n>.jsonl (the reasoning the model wrote for each
evaluated dev question).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Sequence

import jax
import numpy as np
import tqdm
from flax import nnx

from search_r3_jax.training import checkpoint as ckpt_lib
from search_r3_jax.retrieval import evaluation
from search_r3_jax.training import grpo
from search_r3_jax.training import rollouts as rollouts_lib
from search_r3_jax.core import sharding as shd
from search_r3_jax.training import train_state as ts_lib
from search_r3_jax.api import SearchR3
from search_r3_jax.core.tokenizer import embed_suffix_ids
from search_r3_jax.data import sources as data_lib
from search_r3_jax.retrieval.environment import (EnvConfig, RetrievalEnvironment,
                                       document_encoder)
from search_r3_jax.training.runtime import (MetricWriter, NonFiniteLossError, load_model,
                                 close_run, say)

RANK_BINS = (("rank_1", 1, 1), ("rank_2_3", 2, 3), ("rank_4_10", 4, 10))


# ------------------------------------------------------------------ queries


def training_queries(data_cfg, corpus: dict[str, str],
                     kinds: Sequence[str] = ()
                     ) -> list[tuple[str, tuple[str, ...]]]:
  """(query, gold doc ids) of the training split `data_cfg.split`, keeping
  the gold documents that are in `corpus` and the queries left with one.

  The split is either training pairs with a `positive_id` (wiki_fanout's
  `train`, a triples file that names its positives; `kinds` keeps only those
  query kinds, e.g. wiki_fanout's "title" / "first_sentence") or judged
  queries (a BEIR folder's `train` qrels: every document judged relevant,
  score > 0, is gold). Order: the data set's.
  """
  from search_r3_jax.data.common import split_fields, to_python  # pylint: disable=g-import-not-at-top
  builder = data_lib.builder_for(data_cfg)
  if data_cfg.split not in builder.info.splits:
    raise ValueError(f"data {data_cfg.name!r} has no split "
                     f"{data_cfg.split!r}; it has {sorted(builder.info.splits)}")
  names = set(split_fields(builder.info, data_cfg.split))
  if "positive_id" not in names and "doc_ids" not in names:
    raise ValueError(f"data {data_cfg.name!r} split {data_cfg.split!r}: "
                     "stage 2 needs the gold documents of each training "
                     "query (a positive_id, or judged doc_ids); this split "
                     f"has the fields {sorted(names)}")
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
    raise ValueError(f"data {data_cfg.name!r} split {data_cfg.split!r}: no "
                     f"training query (of kinds {list(kinds) or 'any'}) has "
                     f"a gold document among the {len(corpus)} corpus "
                     "documents")
  return out


class QueryStream:
  """Training queries in a fresh seeded order every epoch, resumable."""

  def __init__(self, pairs: list[tuple[str, tuple[str, ...]]], seed: int):
    self.pairs = list(pairs)
    self.seed = int(seed)
    self.epoch, self.cursor = 0, 0

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(
        len(self.pairs))

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
    return {"epoch": self.epoch, "cursor": self.cursor,
            "size": len(self.pairs)}

  def set_state(self, state: dict) -> None:
    if state.get("size") != len(self.pairs):
      raise ValueError(f"the saved query position is for {state.get('size')}"
                       f" training queries, this run has {len(self.pairs)}: "
                       "the data or the corpus changed since the checkpoint")
    self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ------------------------------------------------------------------ pieces


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def embed_suffix(tokenizer, prompts) -> list[int]:
  """What ends a rollout that did not emit the token: " The embedding is
  <|embed_token|>", the same ids `SearchR3.encode_queries` appends."""
  return embed_suffix_ids(tokenizer, prompts, leading_space=True)


def aux_documents(env, emb: np.ndarray, gold: Sequence[Sequence[str]],
                  k: int) -> np.ndarray:
  """[N, k, D] stored embeddings: each row's first gold document, then its
  highest-ranked non-gold documents in the index (the auxiliary InfoNCE's
  negatives)."""
  hits = env.search(emb, k + max(len(g) for g in gold))
  out = np.zeros((len(gold), k, emb.shape[1]), np.float32)
  for i, (ids, g) in enumerate(zip(hits.ids, gold)):
    negs = [d for d in ids if d not in g][:k - 1]
    if len(negs) < k - 1:
      raise ValueError(f"aux_documents: the index holds {len(negs)} "
                       f"non-gold documents for row {i}, {k - 1} needed "
                       "(lower rl.aux_documents)")
    out[i] = env.embeddings([g[0]] + negs)
  return out


def rollout_metrics(ro, sc, group_size: int) -> dict[str, float]:
  reward = np.asarray(sc["reward"], np.float64)
  groups = reward.reshape(-1, group_size)
  best = np.asarray(sc["best_rank"])
  out = {"reward_mean": reward.mean(), "reward_std": reward.std(),
         "reward_group_std": groups.std(1).mean(),
         "embed_rate": float(np.mean(ro.has_embed)),
         "reasoning_tokens": float(ro.response_lengths().mean())}
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
  for name, low in (("queries_per_step", 1), ("group_size", 2),
                    ("max_new_tokens", 1), ("inner_epochs", 1),
                    ("length_bucket", 1), ("max_query_tokens", 1)):
    if int(rl[name]) < low:
      raise ValueError(f"rl.{name} must be >= {low}, got {rl[name]}"
                       + (" (GRPO compares rollouts within a group)"
                          if name == "group_size" else ""))
  if cfg.loss.aux_weight and int(rl.aux_documents) < 2:
    raise ValueError("rl.aux_documents must be >= 2 (the gold page and at "
                     f"least one negative), got {rl.aux_documents}")
  if not 0 < float(rl.top_p) <= 1 or float(rl.temperature) <= 0:
    raise ValueError(f"rl.temperature must be > 0 and rl.top_p in (0, 1]; "
                     f"got {rl.temperature}, {rl.top_p}")


class Stage2:
  """The pieces of the stage-2 loop for one config, and one step of it.

  Attributes:
    state: the `TrainState` (replaced by every update).
    env: the `RetrievalEnvironment` (None until `build_env` or `load_env`).
    evaluator: the dev evaluation over `corpus`.
    corpus: the environment's documents {id: text}.
    stream: the training queries.
  """

  def __init__(self, cfg):
    self.cfg = cfg
    rl = cfg.rl
    check_config(cfg)
    self.group, self.nq = int(rl.group_size), int(rl.queries_per_step)
    self.mesh = shd.make_mesh(tuple(cfg.mesh))
    model = load_model(cfg, self.mesh)
    self.tokenizer, self.prompts = model.tokenizer, model.prompts
    tx, schedule = ts_lib.make_optimizer(cfg.optimizer)
    self.graphdef, self.state, shardings = ts_lib.create_train_state(
        model.model, tx, self.mesh, with_reference=bool(cfg.loss.beta))
    self.step_fn, self.batch_sh = grpo.make_grpo_step(
        self.graphdef, tx, schedule, cfg.loss.to_dict(), self.mesh, shardings,
        batch_size=self.group * self.nq)
    self.evaluator = evaluation.Evaluator.from_config(cfg.data, cfg.eval)
    self.corpus = dict(zip(self.evaluator.doc_ids, self.evaluator.doc_texts))
    self.stream = QueryStream(
        training_queries(cfg.data, self.corpus, tuple(cfg.data.query_kinds)),
        cfg.seed)
    self.env_cfg = EnvConfig.from_mapping(cfg.env.to_dict())
    self.suffix = embed_suffix(self.tokenizer, self.prompts)
    self.env = None

  def view(self) -> SearchR3:
    """The current policy as a `SearchR3`."""
    return SearchR3(nnx.merge(self.graphdef, self.state.params),
                    self.tokenizer, self.mesh, prompts=self.prompts)

  def encoder(self):
    return document_encoder(self.view(), max_length=self.cfg.eval.doc_len,
                            batch_size=self.cfg.eval.batch_size)

  def build_env(self, vectors: np.ndarray | None = None, step: int = 0):
    """The environment over `corpus`, from `vectors` (one per document, e.g.
    the evaluation's) or encoded with the current parameters."""
    self.env = RetrievalEnvironment(
        self.corpus, None if vectors is not None else self.encoder(),
        self.env_cfg, step=step, vectors=vectors)
    return self.env

  def evaluate(self) -> tuple[dict, np.ndarray, list[dict]]:
    """Dev figures with reasoning off (`split/metric`) and on
    (`split+reasoning/metric`), the document embeddings, and the analyses."""
    t = time.perf_counter()
    m = self.view()
    docs = self.evaluator.documents(m)
    flat, samples = {}, []
    for reasoning in (False, True):
      figures = self.evaluator.score(m, docs, reasoning=reasoning,
                                     max_new_tokens=self.cfg.rl.max_new_tokens,
                                     samples=samples)
      tag = "+reasoning" if reasoning else ""
      flat.update({f"{split}{tag}/{k}": v for split, d in figures.items()
                   for k, v in d.items()})
    flat["eval_seconds"] = time.perf_counter() - t
    return flat, docs, samples

  def _put(self, key: str, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.batch_sh[key], x)

  def step(self, step: int, check=None) -> dict[str, float]:
    """One loop step (rollout, forward, search + reward, update, refresh);
    returns its metrics, the time of each phase included. `check(values)`
    sees each update's metrics before the next (the non-finite guard)."""
    rl, env, tok = self.cfg.rl, self.env, self.tokenizer
    times = {}
    t = time.perf_counter()
    batch_q = self.stream.next(self.nq)
    ro = rollouts_lib.sample(
        self.view(), [q for q, _ in batch_q], group_size=self.group,
        max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
        top_p=rl.top_p, seed=self.cfg.seed * 1_000_003 + step,
        max_query_tokens=rl.max_query_tokens)
    times["time_rollout"] = time.perf_counter() - t

    t = time.perf_counter()
    longest = max(len(p) + len(r) + len(self.suffix)
                  for p, r in zip(ro.prompts, ro.responses))
    # Lengths in buckets, so the forward and the update compile a few
    # shapes, not one per step.
    host = rollouts_lib.grpo_batch(
        ro, embed_token_id=tok.embed_token_id, pad_id=tok.pad_id,
        seq_len=_round_up(longest, rl.length_bucket), suffix=self.suffix)
    dev = {k: self._put(k, v) for k, v in host.items()}
    old_logp, emb = grpo.policy_outputs(self.graphdef, self.state.params,
                                        dev["tokens"], dev["lengths"],
                                        dev["embed_pos"])
    emb = np.asarray(jax.device_get(emb))
    times["time_forward"] = time.perf_counter() - t

    t = time.perf_counter()
    gold = [list(g) for _, g in batch_q]
    sc = rollouts_lib.score(env, ro, gold, group_size=self.group,
                            weights=dict(self.cfg.rewards), k=self.env_cfg.k,
                            embeddings=emb if rl.fallback_reward else None)
    if self.cfg.loss.aux_weight:
      docs = aux_documents(env, emb, [gold[q] for q in ro.query_index],
                           rl.aux_documents)
    else:  # the loss skips the auxiliary InfoNCE; a placeholder of one row
      docs = np.zeros((len(emb), 1, emb.shape[1]), np.float32)
    env.observe(gold, sc["retrieved"])
    times["time_reward"] = time.perf_counter() - t

    t = time.perf_counter()
    batch = dict(dev, old_logp=old_logp,
                 advantages=self._put("advantages", sc["advantages"]),
                 docs=self._put("docs", docs))
    for _ in range(rl.inner_epochs):
      self.state, metrics = self.step_fn(self.state, batch)
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if check is not None:
        check(values)
    # The loss and gradient above were computed before the update; an
    # exploding update leaves both finite and the parameters useless. One
    # document's forward with the new parameters catches it before they
    # reach the refresh or a checkpoint.
    encode = self.encoder()  # the updated parameters
    probe = encode(self.env.texts[:1])
    values["update_finite"] = float(np.isfinite(probe).all())
    if check is not None:
      check(values)
    times["time_update"] = time.perf_counter() - t

    t = time.perf_counter()
    report = env.maybe_refresh(step + 1, encode)
    times["time_refresh"] = time.perf_counter() - t

    values.update(rollout_metrics(ro, sc, self.group))
    values.update(times)
    values["step_seconds"] = sum(times.values())
    values["rollout_tokens"] = float(ro.response_lengths().sum())
    values["rollout_tokens_per_s"] = values["rollout_tokens"] / max(
        times["time_rollout"], 1e-9)
    if report is not None:
      values.update(refresh_reencoded=report["reencoded"],
                    refresh_fraction=report["reencoded_fraction"],
                    refresh_full=float(report["kind"] == "full"),
                    refresh_drift_mean=report["drift_mean"],
                    refresh_drifted_regions=report["drifted_regions"])
    self.last_rollouts, self.last_scores = ro, sc
    return values


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Runs stage 2; returns the last evaluation's flat figures."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  loop = Stage2(cfg)
  env_root = os.path.join(workdir, "env")
  samples_dir = os.path.join(workdir, "samples")
  say(f"stage 2: {len(loop.stream.pairs)} training queries, environment of "
      f"{len(loop.corpus)} documents, {loop.nq} queries x {loop.group} "
      "rollouts per step")

  checkpoints = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)
  start = checkpoints.latest_step() or 0
  if start:
    loop.state, position = checkpoints.restore(loop.state)
    loop.stream.set_state(position["queries"])
    loop.env = RetrievalEnvironment.load(os.path.join(env_root, str(start)),
                                         loop.corpus)
    if loop.env.cfg != loop.env_cfg:
      changed = {k: (v, getattr(loop.env_cfg, k))
                 for k, v in dataclasses.asdict(loop.env.cfg).items()
                 if getattr(loop.env_cfg, k) != v}
      say(f"note: the environment resumes with its saved settings; the "
          f"config's differ (saved, config): {changed}")
    say(f"resumed from {checkpoints.directory} at step {start}")
  writer = MetricWriter(workdir)
  if start:
    writer.truncate_after(start)

  def evaluate(step: int) -> tuple[dict, np.ndarray]:
    flat, docs, samples = loop.evaluate()
    writer.write(step, flat, kind="eval")
    if jax.process_index() == 0:
      os.makedirs(samples_dir, exist_ok=True)
      with open(os.path.join(samples_dir, f"step_{step}.jsonl"), "w",
                encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    say(f"eval at step {step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in flat.items() if "ndcg" in k or
        k == "eval_seconds"))
    return flat, docs

  last_eval: dict = {}
  if loop.env is None:
    docs = None
    if cfg.eval.at_start:
      last_eval, docs = evaluate(0)
    t = time.perf_counter()
    loop.build_env(docs)
    say(f"environment ready in {time.perf_counter() - t:.1f}s ("
        + ("seeded with the step-0 evaluation's document embeddings)"
           if docs is not None else "encoded)"))

  def save(done: int) -> None:
    loop.env.save(os.path.join(env_root, str(done)))
    checkpoints.save(done, loop.state, {"queries": loop.stream.get_state()})
    keep = set(checkpoints.manager.all_steps()) | {done}
    for name in os.listdir(env_root):
      if name.isdigit() and int(name) not in keep and int(name) < done:
        shutil.rmtree(os.path.join(env_root, name), ignore_errors=True)

  bar = tqdm.tqdm(total=cfg.total_steps, initial=start, desc="stage 2",
                  unit="step", disable=jax.process_index() != 0)
  try:
    for step in range(start, cfg.total_steps):
      def check(values, step=step):
        # A finite loss with a non-finite gradient would still poison the
        # parameters, so both must be finite.
        updated = values.get("update_finite", 1.0)
        if not (np.isfinite(values["loss"])
                and np.isfinite(values["grad_norm"]) and updated):
          raise NonFiniteLossError(
              f"step {step}: loss is {values['loss']}, gradient norm "
              f"{values['grad_norm']}"
              + ("" if updated else ", and the updated parameters' forward "
                 "is not finite") + "; stopping. The last checkpoint in "
              f"{checkpoints.directory} is intact: step "
              f"{checkpoints.latest_step()}")

      values = loop.step(step, check)
      done = step + 1
      if step % cfg.log_every == 0 or done == cfg.total_steps:
        writer.write(step, values)
      bar.set_postfix(reward=f"{values['reward_mean']:.3f}",
                      emit=f"{values['embed_rate']:.2f}",
                      s=f"{values['step_seconds']:.1f}")
      bar.update(1)
      # Evaluate before saving: a run killed in between repeats the
      # evaluation on resume instead of losing it.
      if (cfg.eval_every and done % cfg.eval_every == 0) or (
          done == cfg.total_steps):
        last_eval, _ = evaluate(done)
      if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
        save(done)
  finally:
    close_run(workdir, bar, checkpoints, writer)
  return last_eval


__all__ = ["QueryStream", "Stage2", "check_config", "train_and_evaluate",
           "training_queries"]
