"""Exports a model as an HF directory that transformers loads by itself.

    python -m search_r3_jax.export --from=runs/rl --out=exported/rl
    python -m search_r3_jax.export --from=runs/rl/stage1 --step=32 --out=DIR
    python -m search_r3_jax.export --from=smollm2-135m --out=DIR --overwrite

`--from` is a training workdir (its latest checkpoint, or `--step`), a
preset, an HF directory or a `.gguf` file. The folder holds config.json,
model.safetensors (float32), the tokenizer with `<|embed_token|>` as a
special token, the chat template, a generation config, search_r3.json (the
prompts and the source) and a README with a transformers-only embedding
snippet. A non-empty `--out` is refused unless `--overwrite` is given; the
folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from search_r3_jax import cli
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.weights import hf_write

FROM = flags.DEFINE_string(
    "from",
    None,
    "Training workdir, preset, HF directory or .gguf file.",
    required=True,
)
OUT = flags.DEFINE_string("out", None, "Folder to write.", required=True)
STEP = flags.DEFINE_integer(
    "step", None, "A workdir's checkpoint step (default: the latest)."
)
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a non-empty --out folder."
)


def export(source: str, out: str, *, step=None, overwrite=False, mesh=None):
  """Writes the model `source` names into `out`; returns the folder."""
  from search_r3_jax.training import workdir
  from search_r3_jax.training.trainer import finished_steps

  mesh = mesh or shd.make_mesh((1, -1, 1))
  provenance = {
      "source": os.path.abspath(source) if os.path.exists(source) else source
  }
  if workdir.is_workdir(source):
    loaded = workdir.load_workdir(source, mesh=mesh, step=step)
    provenance["step"] = step if step is not None else finished_steps(source)
  else:
    if step is not None:
      raise ValueError(
          f"--step applies to a training workdir; {source} " "is not one"
      )
    loaded = load_decoder(source, mesh=mesh)
  ck = loaded.checkpoint
  return hf_write.write_hf_dir(
      loaded.model,
      loaded.tokenizer,
      out,
      base_config=ck.hf_config if ck else None,
      generation_config=(ck.extra.get("generation_config") if ck else None),
      provenance=provenance,
      overwrite=overwrite,
  )


def main(argv):
  del argv
  path = export(
      FROM.value, OUT.value, step=STEP.value, overwrite=OVERWRITE.value
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
