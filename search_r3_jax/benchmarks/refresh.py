"""Selective refresh against a full re-encode, under real training drift.

    python -m search_r3_jax.benchmarks.refresh            # about 15 minutes on 2 CPU cores
    python -m search_r3_jax.benchmarks.refresh --quick    # a few minutes
    python -m search_r3_jax.benchmarks.refresh --corpus_size=0   # all 10,033 leads

Part 1, the environment. The embedded default model (SmolLM2-135M; with
`--init_from=runs/sft` the stage-1 model that stage 2 starts from) encodes
the embedded corpus (Wikipedia leads; on CPU a documented subset: every gold
page of the dev_sub questions plus seeded distractors up to `corpus_size`,
each document cut to `doc_len` tokens). Then, `refreshes` times: the model
takes `steps_between` real AdamW steps of the stage-1 loss (CE + KL +
InfoNCE + triplet on the wiki_fanout training pairs, batch 8, a constant
`learning_rate`, 3e-6 by default, a stage-2 rate), and each step marks its touched
documents in the environment as a stage-2 step would (the batch's gold pages
and the index's top-k for the batch's query embeddings, plus the gold pages'
graph neighbours). Two environments over the same documents then refresh with the
new parameters:

  * selective: `RetrievalEnvironment.refresh` (probes, drifted regions,
    touched documents) at every refresh;
  * full: every document re-encoded, the index, regions and graph rebuilt.
    Its work is N documents per refresh by definition; it is run (and
    timed) after every `fidelity_every` refreshes and after the last, since
    a full re-encode of the corpus is the slow part on a CPU.

The full one is also the ground truth: fidelity is recall@10 of the
selective environment's index (ScaNN, as used in training) against exact
search over the freshly re-encoded corpus, for the dev_sub questions encoded
with the current parameters; the headline figure is the one after the last
refresh, where staleness has accumulated longest. `stale_recall_at_10` is the same figure for an
index (same engine) never refreshed since the start, to show what the
refresh buys.
`reencoded_fraction` is documents encoded by the selective refreshes (probes
included) over those encoded by the full ones.

Part 2, the index. On `synthetic_n` clustered synthetic unit vectors
(1,000 Gaussian centres, per-coordinate noise equal to the centres' spread,
dimension `synthetic_dim`), ScaNN with the corpus-size parameters against
the jitted exact search on 1,000 queries from the same distribution:
recall@10 and queries per second of both, and the time to upsert 1% of the
vectors (moved) against a full rebuild.

The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags
import numpy as np

from search_r3_jax.core.ops import l2_normalize

QUICK = flags.DEFINE_bool("quick", False, "A small run (a few minutes).")
CORPUS_SIZE = flags.DEFINE_integer(
    "corpus_size", 2500, "Documents (gold pages + distractors); 0: all."
)
DOC_LEN = flags.DEFINE_integer("doc_len", 64, "Tokens per document.")
MAX_QUERIES = flags.DEFINE_integer(
    "max_queries", 0, "dev_sub questions for fidelity (0: all)."
)
REFRESHES = flags.DEFINE_integer("refreshes", 3, "Refreshes to run.")
STEPS_BETWEEN = flags.DEFINE_integer(
    "steps_between", 2, "Optimizer steps before each refresh."
)
BATCH = flags.DEFINE_integer("batch_size", 8, "Training examples per step.")
LR = flags.DEFINE_float(
    "learning_rate",
    3e-6,
    "Learning rate: between GRPO's usual 1e-6 and the "
    "1e-5 that stage 1's schedule ends at (its peak is 1e-4).",
)
THRESHOLD = flags.DEFINE_float(
    "drift_threshold", None, "Region drift threshold (default: EnvConfig)."
)
PROBES = flags.DEFINE_integer(
    "probes_per_region", None, "Probes per region (default: EnvConfig)."
)
SYNTH_N = flags.DEFINE_integer(
    "synthetic_n", 100_000, "Synthetic vectors for part 2 (0 skips it)."
)
SYNTH_DIM = flags.DEFINE_integer(
    "synthetic_dim", 128, "Dimension of the synthetic vectors."
)
ENCODE_BATCH = flags.DEFINE_integer("encode_batch", 32, "Encoding batch.")
FIDELITY_EVERY = flags.DEFINE_integer(
    "fidelity_every",
    1,
    "Measure fidelity (a full re-encode) after every "
    "this many refreshes, and after the last; 0: after the last only.",
)
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start from this model (a stage-1 workdir, HF dir or "
    ".gguf) instead of the embedded default.",
)


def _overlap_at_10(a_rows: np.ndarray, b_rows: np.ndarray) -> float:
  return float(
      np.mean(
          [len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(a_rows, b_rows)]
      )
  )


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _say(msg: str) -> None:
  print(msg, flush=True)


def environment_part(
    corpus_size: int,
    doc_len: int,
    max_queries: int,
    refreshes: int,
    steps_between: int,
    batch_size: int,
    env_overrides: dict,
    lr: float | None,
    init_from: str | None,
    fidelity_every: int,
) -> dict:
  import jax

  from search_r3_jax import SearchR3
  from search_r3_jax.benchmarks.common import repo_config
  from search_r3_jax.core import sharding as shd
  from search_r3_jax.data import sources as data_lib
  from search_r3_jax.retrieval import evaluation
  from search_r3_jax.retrieval.environment import document_encoder
  from search_r3_jax.retrieval.environment import EnvConfig
  from search_r3_jax.retrieval.environment import RetrievalEnvironment
  from search_r3_jax.retrieval.index import VectorIndex
  from search_r3_jax.training import stage1 as sft

  cfg = repo_config("sft")
  cfg.batch_size = batch_size
  cfg.optimizer.warmup_steps = 1
  cfg.optimizer.total_steps = 10_000  # the peak rate throughout
  if lr is not None:
    cfg.optimizer.learning_rate = lr
  corpus, splits = data_lib.eval_data(cfg.data, ("dev_sub",))
  corpus, splits = evaluation.subset(corpus, splits, corpus_size, max_queries)
  queries = splits["dev_sub"].queries
  qids = list(queries)
  _say(
      f"corpus {len(corpus)} documents (cut to {doc_len} tokens), "
      f"{len(qids)} dev_sub questions"
  )

  mesh = shd.make_mesh(tuple(cfg.mesh))
  model = SearchR3.from_pretrained(init_from or cfg.model, mesh=mesh)
  env_cfg = EnvConfig(**env_overrides)

  def current_model(params):
    return model.policy.with_params(params)

  def encoder(m):
    return document_encoder(
        m, max_length=doc_len, batch_size=ENCODE_BATCH.value
    )

  graphdef, state, step_fn, batch_sh, batcher = sft.stage1_step(
      cfg, model, mesh
  )
  loader = data_lib.train_loader(
      cfg.data, batch_size=cfg.batch_size, seed=cfg.seed
  )

  t = time.perf_counter()
  enc0 = encoder(current_model(state.params))
  initial = enc0(list(corpus.values()))
  t_initial = time.perf_counter() - t
  _say(f"initial encode of {len(corpus)} documents: {t_initial:.1f}s")
  # Both environments start from the same encoding.
  selective = RetrievalEnvironment(corpus, cfg=env_cfg, vectors=initial)
  full = RetrievalEnvironment(corpus, cfg=env_cfg, vectors=initial)
  # Never refreshed; the same engine as the selective environment's.
  stale = VectorIndex.build(list(corpus), initial, 0, engine=env_cfg.engine)

  rng = jax.random.key(cfg.seed)
  rows, step = [], 0
  train_seconds = 0.0
  for r in range(refreshes):
    for _ in range(steps_between):
      examples = loader.next_batch()
      host = batcher(examples)
      batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
      t = time.perf_counter()
      state, metrics = step_fn(state, batch, rng)
      loss = float(jax.device_get(metrics["loss"]))
      train_seconds += time.perf_counter() - t
      step += 1
      # What a stage-2 step touches: gold pages and the top-k retrieved.
      m = current_model(state.params)
      q = m.encode_queries(
          [e["query"] for e in examples],
          progress=False,
          batch_size=len(examples),
      )
      gold = [
          e["positive_id"] for e in examples if e.get("positive_id") in corpus
      ]
      selective.observe(gold, selective.search(q).ids)
      _say(f"step {step}: loss {loss:.4f}")
    m = current_model(state.params)
    enc = encoder(m)
    rep_sel = selective.refresh(step, enc)
    row = {
        "step": step,
        "selective_kind": rep_sel["kind"],
        "selective_reencoded": rep_sel["reencoded"],
        "selective_refreshed": rep_sel["refreshed"],
        # A full refresh encodes every document, by definition.
        "full_reencoded": len(corpus),
        "drift_mean": rep_sel["drift_mean"],
        "drift_max": rep_sel["drift_max"],
        "score_max": rep_sel["score_max"],
        "drifted_regions": rep_sel["drifted_regions"],
        "regions": rep_sel["regions"],
        "touched": rep_sel["touched"],
        "selective_seconds": rep_sel["time_total"],
    }
    last = r == refreshes - 1
    if last or (fidelity_every and (r + 1) % fidelity_every == 0):
      # The full refresh, timed; its fresh vectors are the ground truth.
      rep_full = full.refresh(step, enc, full=True)
      q = m.encode_queries(
          [queries[i] for i in qids],
          progress=False,
          batch_size=ENCODE_BATCH.value,
      )
      truth = full.index.search(q, 10, exact=True).rows
      # Rows are document positions in all three stores (corpus order).
      row.update(
          full_seconds=rep_full["time_total"],
          fidelity_recall_at_10=_overlap_at_10(
              selective.search(q, 10).rows, truth
          ),
          stale_recall_at_10=_overlap_at_10(stale.search(q, 10).rows, truth),
          scann_recall_at_10_fresh=_overlap_at_10(
              full.search(q, 10).rows, truth
          ),
      )
    rows.append(row)
    _say("refresh " + json.dumps(row))
  measured = [x for x in rows if "fidelity_recall_at_10" in x]
  sel = sum(x["selective_reencoded"] for x in rows)
  ful = sum(x["full_reencoded"] for x in rows)
  total_steps = max(step, 1)
  return {
      "corpus_documents": len(corpus),
      "doc_len": doc_len,
      "queries": len(qids),
      "refreshes": refreshes,
      "steps_between": steps_between,
      "learning_rate": cfg.optimizer.learning_rate,
      "model": init_from or cfg.model,
      "env": {k: v for k, v in env_cfg.__dict__.items()},
      "reencoded_fraction": sel / max(ful, 1),
      # Measured after the last refresh (and every `fidelity_every`).
      "fidelity_recall_at_10": rows[-1]["fidelity_recall_at_10"],
      "fidelity_min": float(min(x["fidelity_recall_at_10"] for x in measured)),
      "stale_recall_at_10": rows[-1]["stale_recall_at_10"],
      "scann_recall_at_10_fresh": rows[-1]["scann_recall_at_10_fresh"],
      "full_refreshes_by_selective": sum(
          x["selective_kind"] == "full" for x in rows
      ),
      "selective_docs_per_step": sel / total_steps,
      "full_docs_per_step": ful / total_steps,
      "selective_seconds_per_step": sum(x["selective_seconds"] for x in rows)
      / total_steps,
      # Every refresh of the full strategy costs what the measured ones did.
      "full_seconds_per_step": float(
          np.mean([x["full_seconds"] for x in measured])
      )
      * refreshes
      / total_steps,
      "train_seconds_per_step": train_seconds / total_steps,
      "initial_encode_seconds": t_initial,
      "per_refresh": rows,
  }


def index_part(n: int, dim: int, seed: int = 0) -> dict:
  from search_r3_jax.retrieval.index import VectorIndex

  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(1000, dim)).astype(np.float32)

  def points(m):
    x = centres[rng.integers(0, len(centres), m)] + rng.normal(
        size=(m, dim)
    ).astype(np.float32)
    return l2_normalize(x).astype(np.float32)

  x, q = points(n), points(1000)
  ids = [f"v{i}" for i in range(n)]
  exact = VectorIndex.build(ids, x, engine="exact")
  truth = exact.search(q, 10).rows  # compiles
  t_exact = float(
      np.median([_timed(lambda: exact.search(q, 10)) for _ in range(3)])
  )
  t = time.perf_counter()
  scann = VectorIndex.build(ids, x, engine="scann")
  t_build = time.perf_counter() - t
  got = scann.search(q, 10).rows
  t_scann = float(
      np.median([_timed(lambda: scann.search(q, 10)) for _ in range(3)])
  )
  recall = _overlap_at_10(got, truth)
  # Upsert 1%: moved vectors under their own ids.
  m = max(1, n // 100)
  moved_rows = rng.choice(n, m, replace=False)
  moved = points(m)
  t = time.perf_counter()
  scann.upsert([ids[i] for i in moved_rows], moved, 1)
  t_upsert = time.perf_counter() - t
  found = scann.search(moved[:100], 1).rows[:, 0]
  return {
      "n": n,
      "dim": dim,
      "params": scann.params,
      "scann_recall_at_10": recall,
      "scann_qps": len(q) / t_scann,
      "exact_qps": len(q) / t_exact,
      "qps_ratio": t_exact / t_scann,
      "build_seconds": t_build,
      "upsert_1pct_seconds": t_upsert,
      "rebuild_over_upsert": t_build / max(t_upsert, 1e-9),
      "upserted_found_first": float(np.mean(found == moved_rows[:100])),
  }


def main(argv):
  del argv
  quick = QUICK.value
  corpus_size = (
      500 if quick and CORPUS_SIZE.value == 2500 else CORPUS_SIZE.value
  )
  doc_len = 48 if quick and DOC_LEN.value == 64 else DOC_LEN.value
  max_queries = 200 if quick and not MAX_QUERIES.value else MAX_QUERIES.value
  refreshes = 2 if quick and REFRESHES.value == 3 else REFRESHES.value
  overrides = {}
  if THRESHOLD.value is not None:
    overrides["drift_threshold"] = THRESHOLD.value
  if PROBES.value is not None:
    overrides["probes_per_region"] = PROBES.value
  synth_n = 20_000 if quick and SYNTH_N.value == 100_000 else SYNTH_N.value
  out = {
      "benchmark": "refresh",
      "quick": quick,
      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
  }
  if synth_n:
    out["index"] = index_part(synth_n, SYNTH_DIM.value)
    _say("index " + json.dumps(out["index"]))
  env = environment_part(
      corpus_size,
      doc_len,
      max_queries,
      refreshes,
      STEPS_BETWEEN.value,
      BATCH.value,
      overrides,
      LR.value,
      INIT_FROM.value,
      FIDELITY_EVERY.value,
  )
  out.update(env)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
