r"""Evaluation program: a model on the dev questions, reasoning off and on,
BM25 beside.

    python -m search_r3_jax.eval --config=configs/eval.py --workdir=runs/rl
    python -m search_r3_jax.eval --config=configs/eval.py \
        --config.model=smollm2-135m --output=runs/eval_base
    python -m search_r3_jax.eval --config=configs/eval.py:tiny --output=/tmp/e

The model is a training workdir (`--workdir`, its latest checkpoint) or
`config.model` (a preset, HF directory or GGUF file). The data is the
config's: `wiki_fanout`'s full corpus of 10,033 leads by default, or any
BEIR-layout folder with `--config.data.path=DIR` (corpus.jsonl,
queries.jsonl, qrels/<split>.tsv; its `test` and `dev` qrels are evaluated,
or every qrels split where it has neither, unless `--config.eval.splits`
names them). The corpus is searched exactly or with ScaNN
(`--config.eval.engine=scann`). Writes into `--output` (default
<workdir>/eval):

  results.json   every figure, the settings, the times
  results.md     the table: a row per setting, nDCG@10 / R@10 / R@100 per
                 split, the share of queries that emitted the token
  results.png    the same figures as bars
  runs/<split>.<setting>.trec
                 the ranking per setting (reasoning-off, reasoning-on, bm25)
                 in the TREC run format trec_eval and BEIR read: `query-id Q0
                 doc-id rank score tag`, the top 100 per query (a
                 title's spaces written as `_`)
  runs/<split>.qrels
                 the judgements the figures were computed on, with the
                 same ids, in TREC's qrels format (`query-id 0 doc-id grade`)
  samples.jsonl  per query and model setting: the analysis, whether the
                 model emitted `<|embed_token|>` itself, the gold documents
                 and the top 10 hits with their scores
  cache/         the corpus embeddings, keyed by the model and the document
                 settings: a second run of the same model and documents (say
                 with only the reasoning setting changed) does not encode the
                 corpus again

Progress bars with an ETA cover the corpus encoding and each query set.

Every setting is checked before anything is written or loaded
(`config_check.py`); a bad one, like any error of input, is one line
`error: ...` and exit status 2 (`cli.run`; `--verbose` shows the traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from search_r3_jax import cli
from search_r3_jax import config_check
from search_r3_jax.core import distributed
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.errors import UserError
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.data import sources as data_sources
from search_r3_jax.retrieval import evaluation
from search_r3_jax.retrieval import metrics as metrics_lib
from search_r3_jax.training.runtime import say
from search_r3_jax.training.trainer import finished_steps
from search_r3_jax.training.workdir import is_workdir
from search_r3_jax.training.workdir import load_workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config (configs/eval.py[:variant])."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training workdir to evaluate (else config.model)."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output folder (default: <workdir>/eval)."
)


def model_identity(workdir, cfg) -> dict:
  """What names the evaluated parameters: the workdir and its checkpoint
  step, or the model path/preset."""
  if workdir:
    return dict(
        workdir=os.path.abspath(workdir), step=finished_steps(workdir) or None
    )
  return dict(model=cfg.model, model_dir=cfg.get("model_dir"))


def cache_key(identity: dict, doc_ids, doc_len: int) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(identity, sort_keys=True).encode())
  h.update(str(doc_len).encode())
  for d in doc_ids:
    h.update(d.encode() + b"\0")
  return h.hexdigest()[:16]


def markdown(results: dict) -> str:
  """The results table: one row per setting, nDCG@10 / Recall@10 /
  Recall@100 per split, and the emitted share for reasoning rows."""
  splits = results["splits"]
  head = ["setting"] + [
      f"{s} {m}" for s in splits for m in ("nDCG@10", "R@10", "R@100")
  ]
  head.append("emitted")
  rows = []
  for name, flat in results["rows"].items():
    tag = "+reasoning" if name == "reasoning on" else ""
    cells = [name]
    for s in splits:
      for m in ("ndcg@10", "recall@10", "recall@100"):
        cells.append(f"{flat[f'{s}{tag}/{m}']:.3f}")
    em = [flat.get(f"{s}+reasoning/emitted") for s in splits]
    cells.append(
        " / ".join(f"{e:.2f}" for e in em) if tag and None not in em else ""
    )
    rows.append(cells)
  lines = [
      "| " + " | ".join(head) + " |",
      "|" + " --- |" * len(head),
  ]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


RUN_TAGS = {
    "reasoning off": "reasoning-off",
    "reasoning on": "reasoning-on",
    "BM25": "bm25",
}
WIKI_SPLITS = ("dev_sub", "dev_top")  # configs/eval.py's, wiki_fanout's own
BEIR_SPLITS = ("test", "dev")  # evaluated where a BEIR folder has them


def write_trec_run(path: str, run: dict, tag: str) -> None:
  """`run` ({query id: {doc id: score}}) as a TREC run file: one line
  `query-id Q0 doc-id rank score tag` per hit, best first (ties by doc
  id descending, trec_eval's order, so the ranks are those the figures
  were computed on), queries in their order."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for qid, hits in run.items():
      for rank, doc in enumerate(metrics_lib.ranked(hits), 1):
        f.write(f"{qid} Q0 {trec_id(doc)} {rank} {hits[doc]:.6f} {tag}\n")
  os.replace(tmp, path)


def trec_id(doc: str) -> str:
  """A document id as one whitespace-free TREC field: wiki_fanout's ids
  are page titles, written as in Wikipedia's URLs (spaces as `_`)."""
  return re.sub(r"\s", "_", doc)


def write_trec_qrels(path: str, qrels: dict) -> None:
  """The judgements the figures were computed on, as a TREC qrels file
  (`query-id 0 doc-id grade`), with the run files' document ids."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for qid, rel in qrels.items():
      for doc, grade in rel.items():
        f.write(f"{qid} 0 {trec_id(doc)} {int(grade)}\n")
  os.replace(tmp, path)


def write_plot(path: str, results: dict) -> None:
  """results.png: nDCG@10 and Recall@10 per split, a bar per setting."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  splits, rows = results["splits"], results["rows"]
  metrics = (("ndcg@10", "nDCG@10"), ("recall@10", "Recall@10"))
  fig, axes = plt.subplots(
      1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False
  )
  width = 0.8 / max(len(rows), 1)
  x = np.arange(len(splits))
  for ax, (metric, label) in zip(axes[0], metrics):
    for i, (name, flat) in enumerate(rows.items()):
      tag = "+reasoning" if name == "reasoning on" else ""
      values = [flat[f"{sp}{tag}/{metric}"] for sp in splits]
      bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width)
      bars.set_label(name)
      ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, splits)
    ax.set_ylim(0, 1.08)
    ax.set_title(label)
  axes[0][0].legend(fontsize=8, loc="lower left")
  fig.suptitle(
      f"{results['corpus_documents']} documents, engine "
      f"{results['engine']}",
      fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=110)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def resolve_data(cfg):
  """The config with what `data.path` implies filled in: a path is a BEIR
  folder (`data.name` beir), and with the wiki_fanout splits left as they
  are, the folder's own evaluation splits (its test and dev qrels, or all
  of them where it has neither)."""
  cfg = cfg.copy_and_resolve_references()
  if cfg.data.get("path") and cfg.data.name == "wiki_fanout":
    cfg.data.name = "beir"
  if cfg.data.name == "beir" and tuple(cfg.eval.splits) == WIKI_SPLITS:
    with cfg.unlocked():
      have = [
          s
          for s in data_sources.builder_for(cfg.data).info.splits
          if s != "corpus"
      ]
      cfg.eval.splits = tuple(s for s in BEIR_SPLITS if s in have) or tuple(
          sorted(have)
      )
  return cfg


def evaluate(cfg, workdir=None, output=None) -> dict:
  """Runs the evaluation and writes its files; returns results.json's
  content."""
  # Every setting and path first: a bad one costs nothing.
  config_check.check_config(cfg, "eval")
  cfg = resolve_data(cfg)
  if not workdir and not cfg.model:
    raise UserError("give --workdir or config.model")
  if workdir and not is_workdir(workdir):
    raise FileNotFoundError(
        f"--workdir={workdir}: not a training workdir (no config.json "
        "and checkpoints/)"
    )
  output = output or (os.path.join(workdir, "eval") if workdir else None)
  if not output:
    raise UserError("give --output (no workdir to write into)")
  t0 = time.perf_counter()
  mesh = shd.make_mesh(tuple(cfg.mesh))
  loaded = (
      load_workdir(workdir, mesh=mesh)
      if workdir
      else load_decoder(cfg.model, model_dir=cfg.get("model_dir"), mesh=mesh)
  )
  policy = Policy.from_model(loaded.model, loaded.tokenizer, mesh)
  # Written once the model loaded: a missing or corrupt one leaves nothing.
  # On a pod every process computes the same figures (the encodes are
  # collective) and process 0 writes the files.
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(os.path.join(output, "cache"), exist_ok=True)
  ev = cfg.eval
  evaluator = evaluation.Evaluator.from_config(cfg.data, ev, progress=True)
  identity = model_identity(workdir, cfg)
  key = cache_key(identity, evaluator.doc_ids, ev.doc_len)
  cached = os.path.join(output, "cache", f"docs-{key}.npy")
  timing = {}
  t = time.perf_counter()
  if distributed.broadcast(os.path.exists(cached)):
    docs = np.load(cached)
    say(f"corpus embeddings from {cached}")
    timing["cache_hit"] = True
  else:
    say(f"encoding {len(evaluator.doc_ids)} documents")
    docs = evaluator.documents(policy)
    if primary:
      np.save(cached + ".tmp.npy", docs)
      os.replace(cached + ".tmp.npy", cached)
    timing["cache_hit"] = False
  timing["encode_seconds"] = time.perf_counter() - t
  rows, samples, runs = {}, [], {}
  for reasoning in ev.reasoning:
    t = time.perf_counter()
    name = "reasoning on" if reasoning else "reasoning off"
    rows[name] = evaluator.flat(
        policy,
        modes=(bool(reasoning),),
        max_new_tokens=int(ev.max_new_tokens),
        samples=samples,
        docs=docs,
        runs=runs,
        sample_plain=True,
    )
    timing[f"{name} seconds"] = time.perf_counter() - t
    say(f"{name}: {json.dumps(rows[name])}")
  if ev.bm25:
    rows["BM25"] = evaluation.flat_figures(evaluator.bm25(runs=runs))
  timing["total_seconds"] = time.perf_counter() - t0
  results = dict(
      model=identity,
      data=dict(name=cfg.data.name, path=cfg.data.get("path")),
      engine=evaluator.engine,
      corpus_documents=len(evaluator.doc_ids),
      doc_len=int(ev.doc_len),
      max_new_tokens=int(ev.max_new_tokens),
      splits=list(evaluator.splits),
      queries={s: len(sp.queries) for s, sp in evaluator.splits.items()},
      rows=rows,
      timing=timing,
  )
  if primary:
    write_outputs(output, results, samples, runs, evaluator)
  say(markdown(results))
  return results


def write_outputs(output: str, results: dict, samples, runs, evaluator) -> None:
  """results.json, results.md, samples.jsonl, runs/ and results.png."""
  with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results))
  with open(os.path.join(output, "samples.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(s) + "\n" for s in samples)
  os.makedirs(os.path.join(output, "runs"), exist_ok=True)
  for split in sorted({split for _, split in runs}):
    write_trec_qrels(
        os.path.join(output, "runs", f"{split}.qrels"),
        evaluator.splits[split].qrels,
    )
  for (name, split), run in runs.items():
    write_trec_run(
        os.path.join(output, "runs", f"{split}.{RUN_TAGS[name]}.trec"),
        run,
        RUN_TAGS[name],
    )
  write_plot(os.path.join(output, "results.png"), results)


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise UserError("give --config=configs/eval.py[:variant]")
  evaluate(_CONFIG.value, _WORKDIR.value, _OUTPUT.value)


if __name__ == "__main__":
  cli.run(main)
