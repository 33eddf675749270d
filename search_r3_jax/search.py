"""Searches a user's own documents with a model.

    python -m search_r3_jax.search index --input=docs.jsonl --index=my_index
    python -m search_r3_jax.search index --input=beir/scifact --index=idx \\
        --model=runs/rl
    python -m search_r3_jax.search query --index=my_index "who wrote hamlet"
    echo "who wrote hamlet" | python -m search_r3_jax.search query \\
        --index=my_index --reasoning --k=5

`index` embeds a JSONL file (`_id` or `id`, `text`, optional `title` per
line), a BEIR folder (its corpus.jsonl) or a folder of `.txt`/`.md` files,
and saves the index (vectors, documents, the model's name) to `--index`.
`query` answers the queries given as arguments, or one per line of stdin,
with the model the index was built with unless `--model` names another of
the same embedding width: for each query, rank, score, document id and
title, one hit per line, and with `--reasoning` the model's analysis and
whether it emitted `<|embed_token|>` itself.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from search_r3_jax import cli

cli.define_model_flags()

INPUT = flags.DEFINE_string(
    "input", None, "index: a JSONL file, a BEIR folder or a folder of texts."
)
INDEX = flags.DEFINE_string("index", None, "The index folder.", required=True)
ENGINE = flags.DEFINE_enum(
    "engine", "scann", ["scann", "exact"], "index: the search engine."
)
DOC_LEN = flags.DEFINE_integer(
    "doc_len", 512, "index: documents are cut to this many tokens."
)
BATCH = flags.DEFINE_integer("batch_size", 16, "Texts per batch.")
K = flags.DEFINE_integer("k", 10, "query: hits per query.")
REASONING = flags.DEFINE_bool(
    "reasoning", False, "query: the model analyses each query first."
)
MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 128, "query: the analysis's token budget."
)


def _model_name() -> str:
  f = flags.FLAGS
  return os.path.abspath(f.model) if os.path.exists(f.model) else f.model


def build(argv) -> None:
  from search_r3_jax.retrieval.documents import read_documents

  if argv:
    raise app.UsageError(f"index takes no arguments, got {argv}")
  if not INPUT.value:
    raise app.UsageError("index needs --input (JSONL, BEIR or text folder)")
  docs = read_documents(INPUT.value)
  model = cli.load_model()
  idx = model.index(
      docs,
      engine=ENGINE.value,
      doc_len=DOC_LEN.value,
      batch_size=BATCH.value,
      model_name=_model_name(),
  )
  idx.save(INDEX.value)
  print(f"indexed {len(idx)} documents into {INDEX.value}")


def answer(argv) -> None:
  from search_r3_jax.retrieval.documents import DocumentIndex

  if K.value < 1:
    raise app.UsageError(f"--k={K.value}: must be at least 1")
  queries = list(argv)
  if not queries:
    queries = [line.strip() for line in sys.stdin if line.strip()]
  if not queries:
    raise app.UsageError("no queries: give them as arguments or on stdin")
  info = DocumentIndex.read_info(INDEX.value)
  if not flags.FLAGS["model"].present and info.get("model"):
    flags.FLAGS.model = info["model"]
  model = cli.load_model()
  idx = model.load_index(INDEX.value)
  results = idx.search(
      queries,
      K.value,
      reasoning=REASONING.value,
      max_new_tokens=MAX_NEW.value,
      batch_size=BATCH.value,
  )
  for r in results:
    print(f"query: {r.query}")
    if r.analysis is not None:
      how = "emitted" if r.emitted else "suffix appended"
      print(f"analysis ({how}): {r.analysis.strip()}")
    for h in r.hits:
      print(f"{h.rank}\t{h.score:.4f}\t{h.id}\t{h.title}")
    print()


def main(argv):
  commands = {"index": build, "query": answer}
  if len(argv) < 2 or argv[1] not in commands:
    raise app.UsageError(
        f"usage: python -m search_r3_jax.search {{index,query}} ...; got "
        f"{argv[1:2] or 'nothing'}"
    )
  commands[argv[1]](argv[2:])


if __name__ == "__main__":
  cli.run(main)
