r"""Evaluation program: a model on the dev questions, reasoning off and on,
BM25 beside.

    python -m search_r3_jax.eval --config=configs/eval.py --workdir=runs/rl
    python -m search_r3_jax.eval --config=configs/eval.py \
        --config.model=smollm2-135m --output=runs/eval_base
    python -m search_r3_jax.eval --config=configs/eval.py:tiny --output=/tmp/e

The model is a training workdir (`--workdir`, its latest checkpoint) or
`config.model` (a preset, HF directory or GGUF file). The data is the
config's (`wiki_fanout`'s full corpus of 10,033 leads by default, or a BEIR
folder with `--config.data.name=beir --config.data.path=DIR`). Writes into
`--output` (default <workdir>/eval): results.json (every figure, the
settings, the times), results.md (the table), samples.jsonl (per reasoning
query: its analysis, whether the model emitted `<|embed_token|>` itself,
the gold and top documents) and cache/ (the corpus embeddings, keyed by the
model and the document settings: a second run of the same model and
documents does not encode the corpus again).

Every setting is checked before anything is written or loaded
(`config_check.py`); a bad one, like any error of input, is one line
`error: ...` and exit status 2 (`cli.run`; `--verbose` shows the traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from search_r3_jax import cli
from search_r3_jax import config_check
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.errors import UserError
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.data import sources as data_sources
from search_r3_jax.retrieval import evaluation
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


def evaluate(cfg, workdir=None, output=None) -> dict:
  """Runs the evaluation and writes its files; returns results.json's
  content."""
  # Every setting and path first: a bad one costs nothing.
  config_check.check_config(cfg, "eval")
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
  os.makedirs(os.path.join(output, "cache"), exist_ok=True)
  ev = cfg.eval
  evaluator = evaluation.Evaluator.from_config(cfg.data, ev)
  identity = model_identity(workdir, cfg)
  key = cache_key(identity, evaluator.doc_ids, ev.doc_len)
  cached = os.path.join(output, "cache", f"docs-{key}.npy")
  timing = {}
  t = time.perf_counter()
  if os.path.exists(cached):
    docs = np.load(cached)
    say(f"corpus embeddings from {cached}")
    timing["cache_hit"] = True
  else:
    say(f"encoding {len(evaluator.doc_ids)} documents")
    docs = evaluator.documents(policy)
    np.save(cached + ".tmp.npy", docs)
    os.replace(cached + ".tmp.npy", cached)
    timing["cache_hit"] = False
  timing["encode_seconds"] = time.perf_counter() - t
  rows, samples = {}, []
  for reasoning in ev.reasoning:
    t = time.perf_counter()
    name = "reasoning on" if reasoning else "reasoning off"
    rows[name] = evaluator.flat(
        policy,
        modes=(bool(reasoning),),
        max_new_tokens=int(ev.max_new_tokens),
        samples=samples,
        docs=docs,
    )
    timing[f"{name} seconds"] = time.perf_counter() - t
    say(f"{name}: {json.dumps(rows[name])}")
  if ev.bm25:
    rows["BM25"] = evaluation.flat_figures(evaluator.bm25())
  timing["total_seconds"] = time.perf_counter() - t0
  results = dict(
      model=identity,
      corpus_documents=len(evaluator.doc_ids),
      doc_len=int(ev.doc_len),
      max_new_tokens=int(ev.max_new_tokens),
      splits=list(evaluator.splits),
      queries={s: len(sp.queries) for s, sp in evaluator.splits.items()},
      rows=rows,
      timing=timing,
  )
  with open(os.path.join(output, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(output, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results))
  with open(os.path.join(output, "samples.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(s) + "\n" for s in samples)
  say(markdown(results))
  return results


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise UserError("give --config=configs/eval.py[:variant]")
  evaluate(_CONFIG.value, _WORKDIR.value, _OUTPUT.value)


if __name__ == "__main__":
  cli.run(main)
