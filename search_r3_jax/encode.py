"""Embeds texts to a .npy file.

python -m search_r3_jax.encode --kind=query --input=queries.txt --output=q.npy

The input holds one text per line; a blank line, a file with no text, or a
byte that is not UTF-8 is refused, naming the file and line, before the model
is loaded.
"""

import pathlib

from absl import app
from absl import flags
import numpy as np

from search_r3_jax import cli
from search_r3_jax.core.errors import UserError

cli.define_model_flags()

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


def read_texts(path: pathlib.Path) -> list[str]:
  """The file's lines, each a text.

  Raises:
    FileNotFoundError: no such file.
    UserError: a byte that is not UTF-8, a blank line, or no text at all.
  """
  if not path.is_file():
    raise FileNotFoundError(f"--input: no such file {path}")
  raw = path.read_bytes()
  try:
    content = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise UserError(
        f"{path}:{line}: not UTF-8: byte 0x{raw[e.start]:02x} at byte "
        f"offset {e.start}"
    ) from None
  texts = content.splitlines()
  for n, line in enumerate(texts, 1):
    if not line.strip():
      raise UserError(f"{path}:{n}: empty line")
  if not texts:
    raise UserError(f"{path}: no texts to encode (the file is empty)")
  return texts


def main(argv):
  del argv
  if BATCH.value < 1:
    raise app.UsageError(f"--batch_size={BATCH.value}: must be >= 1")
  texts = read_texts(pathlib.Path(INPUT.value))
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
  cli.run(main)
