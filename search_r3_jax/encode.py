"""Embeds texts to a .npy file.

python -m search_r3_jax.encode --kind=query --input=queries.txt --output=q.npy
"""

import pathlib

from absl import app
from absl import flags
import numpy as np

from search_r3_jax import cli

KIND = flags.DEFINE_enum(
    "kind", "document", ["query", "document"], "Prompt to use."
)
INPUT = flags.DEFINE_string(
    "input", None, "Text file, one text per line.", required=True
)
OUTPUT = flags.DEFINE_string("output", None, "Output .npy path.", required=True)
REASONING = flags.DEFINE_bool(
    "reasoning", False, "Queries: reason before embedding."
)
BATCH = flags.DEFINE_integer("batch_size", 16, "Texts per batch.")


def main(argv):
  del argv
  path = pathlib.Path(INPUT.value)
  if not path.exists():
    raise app.UsageError(f"--input: no such file {path}")
  texts = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      raise app.UsageError(f"{path}:{n}: empty line")
    texts.append(line)
  model = cli.load_model()
  if KIND.value == "query":
    emb = model.encode_queries(
        texts, reasoning=REASONING.value, batch_size=BATCH.value
    )
  else:
    emb = model.encode_documents(texts, batch_size=BATCH.value)
  np.save(OUTPUT.value, emb)
  print(f"wrote {emb.shape} embeddings to {OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
