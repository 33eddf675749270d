"""Generates replies: `python -m search_r3_jax.generate --prompt "..."`."""

import sys

from absl import app
from absl import flags

from search_r3_jax import cli

cli.define_model_flags()

PROMPT = flags.DEFINE_multi_string(
    "prompt", None, "Prompt (repeatable); default: read lines from stdin."
)
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0: off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
RAW = flags.DEFINE_bool("raw", False, "Continue raw text (no chat template).")


def main(argv):
  del argv
  prompts = PROMPT.value or [l.rstrip("\n") for l in sys.stdin if l.strip()]
  if not prompts:
    raise app.UsageError("no prompts: pass --prompt or lines on stdin")
  model = cli.load_model()
  outs = model.generate(
      prompts,
      max_new_tokens=MAX_NEW.value,
      temperature=TEMPERATURE.value,
      top_p=TOP_P.value,
      top_k=TOP_K.value,
      seed=SEED.value,
      chat=not RAW.value,
  )
  for p, o in zip(prompts, outs):
    print(f">>> {p}\n{o}\n")


if __name__ == "__main__":
  cli.run(main)
