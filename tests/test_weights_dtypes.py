"""bfloat16 and float16 safetensors, read tensor by tensor through a memory
map (`weights/safetensors_mmap.py`) and sharded as they are read."""

import json
import struct

from conftest import make_tiny_hf_dir
import jax
import ml_dtypes
import numpy as np
import pytest

from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.weights.common import WeightsError
from search_r3_jax.core.weights.hf import read_hf_dir
from search_r3_jax.core.weights.safetensors_mmap import SafetensorsFile


def _params(loaded) -> dict:
  from flax import nnx

  flat = nnx.to_flat_state(nnx.state(loaded.model, nnx.Param))
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """The same random Llama (untied head) and Qwen2 (tied, biases) stored as
  float32 in one file and as bfloat16 and float16 in several."""
  out = {}
  for arch in ("llama", "qwen2"):
    for dtype in ("float32", "bfloat16", "float16"):
      out[arch, dtype] = make_tiny_hf_dir(
          tmp_path_factory.mktemp(f"{arch}_{dtype}"),
          arch,
          seed=5,
          dtype=dtype,
          max_shard_size=None if dtype == "float32" else "12KB",
      )
  return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_file_to_half_params_equals_float32_load_cast(
    dirs, arch, dtype, eight_device_mesh
):
  """A bf16/f16 checkpoint of several files loads into bf16/f16 parameters
  sharded over 8 devices exactly as a float32 load of the same files cast to
  that dtype; on float32 parameters it equals the float32 checkpoint cast to
  the file's dtype (the embed token's mean row aside: it is the mean of the
  rounded rows)."""
  d = dirs[arch, dtype]
  assert len(list(d.glob("*.safetensors"))) > 1
  half = load_decoder(str(d), param_dtype=dtype, mesh=eight_device_mesh)
  full = load_decoder(str(d), param_dtype="float32", mesh=eight_device_mesh)
  ref = load_decoder(
      str(dirs[arch, "float32"]), param_dtype="float32", mesh=eight_device_mesh
  )
  got, want, ref_p = _params(half), _params(full), _params(ref)
  assert sorted(got) == sorted(want) == sorted(ref_p)
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  embed_id = half.tokenizer.embed_token_id
  for name in got:
    assert got[name].dtype == np_dtype, name
    np.testing.assert_array_equal(
        got[name], want[name].astype(np_dtype), err_msg=name
    )
    rounded = ref_p[name].astype(np_dtype).astype(np.float32)
    if name in ("embed", "lm_head"):
      # The rows past the file's and the embed token's are means.
      keep = np.arange(half.model.cfg.vocab_size) < embed_id
      axis = 0 if name == "embed" else 1
      rounded = np.compress(keep, rounded, axis)
      w = np.compress(keep, want[name], axis)
    else:
      w = want[name]
    np.testing.assert_array_equal(w, rounded, err_msg=name)
  # Sharded as read: a parameter spread over devices, each holding a slice.
  emb = half.model.embed[...]
  assert len({str(s.index) for s in emb.addressable_shards}) > 1


def test_mmap_reader_matches_the_files(dirs):
  """Every tensor read through the memory map equals the one the
  safetensors package (or torch, for bfloat16) reads."""
  from safetensors.torch import load_file
  import torch

  for dtype in ("float32", "bfloat16", "float16"):
    for f in sorted(dirs["qwen2", dtype].glob("*.safetensors")):
      st = SafetensorsFile(f)
      want = load_file(str(f))
      assert sorted(st.names()) == sorted(want)
      for name, t in want.items():
        got = st.tensor(name)
        assert got.shape == tuple(t.shape)
        assert not got.flags.writeable
        np.testing.assert_array_equal(
            got.astype(np.float32), t.to(torch.float32).numpy(), err_msg=name
        )


def test_checkpoint_tensors_are_views_in_the_files_dtype(dirs):
  ckpt = read_hf_dir(dirs["qwen2", "bfloat16"])
  assert ckpt.lazy_tensors
  w = ckpt.get_tensor("model.layers.0.mlp.up_proj.weight")
  assert w.dtype == ml_dtypes.bfloat16
  assert isinstance(w.base, np.memmap) or isinstance(w.base.base, np.memmap)


def _write(path, header: bytes, data: bytes = b"") -> None:
  path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_malformed_safetensors_name_the_file_and_tensor(tmp_path):
  f = tmp_path / "bad.safetensors"
  _write(f, b"{not json")
  with pytest.raises(WeightsError, match="bad.safetensors: header is not JSON"):
    SafetensorsFile(f)
  header = {"w": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 20]}}
  _write(f, json.dumps(header).encode(), b"\0" * 20)
  with pytest.raises(
      WeightsError, match=r"tensor 'w' \(BF16 \[3, 4\]\).*need 24"
  ):
    SafetensorsFile(f)
  header = {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
  _write(f, json.dumps(header).encode(), b"\0" * 8)
  with pytest.raises(WeightsError, match="tensor 'w' has dtype 'C64'"):
    SafetensorsFile(f)
  f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
  with pytest.raises(WeightsError, match="header length 10000 exceeds"):
    SafetensorsFile(f)
