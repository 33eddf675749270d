"""Loading a bfloat16 checkpoint of several files: tensor by tensor through
a memory map, against reading the whole file for each tensor.

    python -m search_r3_jax.benchmarks.load_weights            # SmolLM2-135M's shape
    python -m search_r3_jax.benchmarks.load_weights --quick    # a 6-layer cut of it

A random model of SmolLM2-135M's shape (30 layers, hidden 576, vocabulary
49,152; `--quick` keeps 6 layers) is written by transformers in bfloat16,
split into files of at most `--shard_mb` MB with an index, beside the
embedded default's tokenizer. Both sides load it into bfloat16 parameters
sharded over the same mesh through the same layout conversion:

  * this project: `load_decoder`, each device's shard of each tensor read
    from the mapped file (`weights/safetensors_mmap.py`);
  * the reference: the reader this project used before, which went through
    `safetensors.flax.load_file` for a bfloat16 tensor (numpy cannot hold
    one), reading the whole file once per tensor, and assembled float32
    host copies of every parameter before placing them.

Reported: seconds per load (median of `--repeats`), the peak of host
memory allocated through Python and numpy during the load (tracemalloc;
the reference's whole-file reads are made by a Rust extension outside its
view, so its figure is a lower bound) and the ratio; every parameter of the
two loads is checked equal first. One JSON line last.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
import tracemalloc

from absl import app
from absl import flags
import jax
import numpy as np

from search_r3_jax.benchmarks import common

_QUICK = flags.DEFINE_bool("quick", False, "6 layers and one timed load.")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 64, "Largest file of the split.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed loads per side.")


def write_fixture(d: pathlib.Path, num_layers: int, shard_mb: int) -> None:
  """A random bfloat16 model of SmolLM2-135M's shape in several files."""
  import torch
  import transformers

  from search_r3_jax.core.weights.presets import load_checkpoint

  base = load_checkpoint("smollm2-135m")
  hf = dict(base.hf_config, num_hidden_layers=num_layers)
  cfg = transformers.LlamaConfig(
      **{
          k: v
          for k, v in hf.items()
          if k in transformers.LlamaConfig().to_dict()
      }
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
  model.save_pretrained(str(d), max_shard_size=f"{shard_mb}MB")
  base.tokenizer.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(
      json.dumps(
          {
              "eos_token": base.eos_token,
              "bos_token": base.bos_token,
              "pad_token": base.pad_token,
              "chat_template": base.chat_template,
          }
      )
  )


def whole_file_reader(d: pathlib.Path):
  """The reference: the HF reader as it was, each bfloat16 tensor read by
  loading its whole file through safetensors' flax reader."""
  from safetensors import safe_open
  from safetensors.flax import load_file

  from search_r3_jax.core.weights import hf

  ckpt = hf.read_hf_dir(d)
  where = {}
  for f in sorted(d.glob("*.safetensors")):
    with safe_open(str(f), framework="flax") as st:
      for name in st.keys():
        where[name] = f

  def get_tensor(name):
    return np.asarray(load_file(str(where[name]))[name], dtype=np.float32)

  ckpt.get_tensor = get_tensor
  ckpt.lazy_tensors = False  # float32 host copies of every parameter
  return ckpt


def load(ckpt_or_dir, mesh):
  from search_r3_jax.core import loading

  if isinstance(ckpt_or_dir, pathlib.Path):
    return loading.load_decoder(
        str(ckpt_or_dir), param_dtype="bfloat16", mesh=mesh
    )
  return loading.decoder_from_checkpoint(
      ckpt_or_dir, param_dtype="bfloat16", mesh=mesh
  )


def measure(make, mesh, repeats: int) -> tuple[float, float, object]:
  """(median seconds, peak traced host MB, the last load)."""
  times, peak, loaded = [], 0.0, None
  for _ in range(repeats):
    del loaded
    tracemalloc.start()
    t = time.perf_counter()
    loaded = load(make(), mesh)
    jax.block_until_ready(jax.tree.leaves(loaded.model))
    times.append(time.perf_counter() - t)
    peak = max(peak, tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.stop()
  return float(np.median(times)), peak, loaded


def main(argv):
  del argv
  from flax import nnx

  from search_r3_jax.core import sharding as shd

  layers = 6 if _QUICK.value else 30
  repeats = 1 if _QUICK.value else _REPEATS.value
  mesh = shd.make_mesh((1, -1, 1))
  with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    write_fixture(d, layers, _SHARD_MB.value)
    files = sorted(d.glob("*.safetensors"))
    total_mb = sum(f.stat().st_size for f in files) / 2**20
    print(
        f"fixture: {layers} layers, {len(files)} files, {total_mb:.0f} MB "
        f"bfloat16; mesh {dict(mesh.shape)} on {jax.devices()[0].platform}"
    )
    ours_s, ours_mb, ours = measure(lambda: d, mesh, repeats)
    print(f"this project: {ours_s:.2f} s per load, peak {ours_mb:.0f} MB")
    ref_s, ref_mb, ref = measure(lambda: whole_file_reader(d), mesh, repeats)
    print(f"reference:    {ref_s:.2f} s per load, peak {ref_mb:.0f} MB")
    a = nnx.to_flat_state(nnx.state(ours.model, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(ref.model, nnx.Param)))
    for path, v in a:
      np.testing.assert_array_equal(
          np.asarray(v.get_value()), np.asarray(b[path].get_value())
      )
    print("every parameter equal")
  result = dict(
      benchmark="load_weights",
      layers=layers,
      files=len(files),
      checkpoint_mb=round(total_mb, 1),
      ours_s=round(ours_s, 3),
      reference_s=round(ref_s, 3),
      speedup=round(ref_s / ours_s, 2),
      ours_peak_host_mb=round(ours_mb, 1),
      reference_peak_host_mb=round(ref_mb, 1),
  )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
