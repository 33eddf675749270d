"""The evaluation program (search_r3_jax/eval.py) on configs/eval.py:tiny:
its files, its figures against the evaluator's own, and the corpus cache."""

import importlib.util
import json
import pathlib

import pytest

from search_r3_jax import eval as eval_program
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.retrieval import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(model):
  spec = importlib.util.spec_from_file_location(
      "eval_config", ROOT / "configs" / "eval.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("tiny")
  cfg.model = str(model)
  return cfg


def test_eval_writes_its_files_and_reuses_the_corpus_embeddings(
    tiny_dir, tmp_path
):
  cfg = _config(tiny_dir)
  out = tmp_path / "eval"
  results = eval_program.evaluate(cfg, output=str(out))
  for name in ("results.json", "results.md", "samples.jsonl"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(results)
  )
  assert set(results["rows"]) == {"reasoning off", "reasoning on", "BM25"}
  assert results["corpus_documents"] == 64
  assert results["queries"] == {"dev_sub": 8, "dev_top": 8}
  on = results["rows"]["reasoning on"]
  for split in ("dev_sub", "dev_top"):
    assert 0.0 <= on[f"{split}+reasoning/emitted"] <= 1.0
  samples = [json.loads(l) for l in (out / "samples.jsonl").open()]
  assert len(samples) == 16 and {"reasoning", "emitted", "gold", "top"} <= set(
      samples[0]
  )
  table = (out / "results.md").read_text()
  assert table.count("\n") == 5 and "| BM25 |" in table
  assert not results["timing"]["cache_hit"]

  # The reasoning-off figures are the evaluator's for the same model and
  # documents.
  mesh = shd.make_mesh(tuple(cfg.mesh))  # the program's mesh
  loaded = load_decoder(str(tiny_dir), mesh=mesh)
  policy = Policy.from_model(loaded.model, loaded.tokenizer, mesh)
  ev = evaluation.Evaluator.from_config(cfg.data, cfg.eval)
  want = ev.flat(policy, modes=(False,))
  for k, v in want.items():
    assert results["rows"]["reasoning off"][k] == pytest.approx(v, abs=1e-6), k

  # A second run with only the reasoning setting changed reads the cache.
  cfg.eval.reasoning = (False,)
  again = eval_program.evaluate(cfg, output=str(out))
  assert again["timing"]["cache_hit"]
  assert set(again["rows"]) == {"reasoning off", "BM25"}
  assert again["rows"]["reasoning off"] == results["rows"]["reasoning off"]
