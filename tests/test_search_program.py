"""The search program: `index` then `query` on a fixture corpus."""

import os
import pathlib
import subprocess
import sys

from test_search import _exact_top
from test_search import _write_jsonl
from test_search import DOCS
from test_search import QUERIES

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_search_program_index_then_query(tiny, tiny_dir, tmp_path):
  docs = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
  env = dict(os.environ, XLA_FLAGS="")
  base = [sys.executable, "-m", "search_r3_jax.search"]
  subprocess.run(
      base
      + [
          "index",
          f"--input={docs}",
          f"--index={tmp_path / 'idx'}",
          f"--model={tiny_dir}",
          "--engine=exact",
      ],
      cwd=ROOT,
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=300,
  )
  # The model is the one the index names; queries come from stdin.
  out = subprocess.run(
      base + ["query", f"--index={tmp_path / 'idx'}", "--k=2"],
      input="\n".join(QUERIES) + "\n",
      cwd=ROOT,
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=300,
  ).stdout
  blocks = [b for b in out.strip().split("\n\n")]
  assert len(blocks) == len(QUERIES)
  want = _exact_top(tiny, DOCS, QUERIES, k=2)
  for block, query, ids in zip(blocks, QUERIES, want):
    lines = block.splitlines()
    assert lines[0] == f"query: {query}"
    rows = [l.split("\t") for l in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert [r[2] for r in rows] == ids
