"""GGUF block-quantized weights on the CPU kernels (`quantized.py`, `kernels/`).

The packed layout must hold exactly the file's numbers, the kernel must equal
a float32 product with them, and a model decoding on them must generate what
the float32 model generates.
"""

from __future__ import annotations

import pathlib
import platform

from flax import nnx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import _byte_tokens
from test_gguf import _llama_cpp_permute
from test_gguf import byte_level_writer

from search_r3_jax import SearchR3
from search_r3_jax.core import kernels
from search_r3_jax.core import quantized


def test_kernels_are_built_here():
  """The suite needs a C++ compiler: the kernels are part of what it checks,
  so their absence fails here rather than skipping the rest."""
  ok, why = kernels.status()
  assert ok, why


def _codes(kind: str, rows: int, cols: int, seed: int = 0):
  """gguf's own quantization of a random matrix: (raw blocks, its floats)."""
  qt = gguf.GGMLQuantizationType[kind]
  x = np.random.default_rng(seed).standard_normal((rows, cols))
  raw = gguf.quants.quantize(x.astype(np.float32), qt)
  return raw, gguf.quants.dequantize(raw, qt).astype(np.float32)


def _packed(kind: str, n: int, k: int, layers: int = 1):
  """A stack of `layers` random [K, N] matrices packed, and their floats."""
  mats, floats = [], []
  for l in range(layers):
    raw, w = _codes(kind, n, k, seed=l)
    mats.append(quantized.pack_rows(*quantized.unpack_gguf_rows(kind, raw, k)))
    floats.append(w.T)
  return quantized._stack(mats), np.stack(floats)  # pylint: disable=protected-access


# ------------------------------------------------------------------ layout


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(16, 32), (37, 96), (5, 64)])
def test_packing_keeps_the_gguf_numbers(kind, n, k):
  """Unpack -> pack -> dequantize gives gguf's dequantization bit for bit
  (N not a multiple of 16 is padded with zero columns)."""
  pm, w = _packed(kind, n, k)
  dq = quantized.dequantize(pm)
  assert dq.shape == (k, -(-n // 16) * 16)
  np.testing.assert_array_equal(dq[:, :n], w[0])
  np.testing.assert_array_equal(dq[:, n:], 0.0)


def test_q4_0_becomes_q4_1_exactly():
  raw, w = _codes("Q4_0", 8, 64)
  q, d, m = quantized.unpack_gguf_rows("Q4_0", raw, 64)
  assert q.dtype == np.uint8 and q.max() <= 15
  np.testing.assert_array_equal(m, -8.0 * d)
  np.testing.assert_array_equal(
      q.astype(np.float32) * np.repeat(d, 32, 1) + np.repeat(m, 32, 1), w
  )


# ------------------------------------------------------------------ kernel


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_kernel_equals_float32_product(kind, rows):
  """Every layer of a stack, picked by a traced index inside a scan, for
  row counts below, at and above the kernel's 8-row chunk."""
  n, k, layers = 80, 96, 3
  pm, w = _packed(kind, n, k, layers)
  pm = quantized.PackedMatrix(
      *(None if a is None else jnp.asarray(a) for a in pm)
  )
  x = np.random.default_rng(7).standard_normal((rows, k)).astype(np.float32)

  @jax.jit
  def run(x):
    def body(_, l):
      return None, kernels.qmatmul(x, pm.qs, pm.d, pm.m, l)

    return jax.lax.scan(body, None, jnp.arange(layers))[1]

  got = np.asarray(run(x))
  want = np.einsum("mk,lkn->lmn", x.astype(np.float64), w)
  assert got.shape == (layers, rows, n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_kernel_rejects_a_layer_out_of_range():
  pm, _ = _packed("Q8_0", 16, 32, layers=2)
  x = jnp.ones((1, 32), jnp.float32)
  with pytest.raises(
      Exception, match=r"layer index out of range: 2 not in \[0, 2\)"
  ):
    jax.block_until_ready(kernels.qmatmul(x, pm.qs, pm.d, None, 2))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="x86 instruction-set flags",
)
@pytest.mark.parametrize(
    "flags",
    [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
    ids=["avx2", "portable"],
)
def test_narrower_builds_compute_the_same(tmp_path, flags):
  """The AVX2 and the portable code paths, built on this machine by turning
  the wider instructions off, give the AVX-512 path's products."""
  targets = kernels.register(
      kernels.build(tmp_path, flags),
      suffix="_" + "_".join(f.strip("-") for f in flags),
  )
  x = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
  for kind in ("Q4_1", "Q8_0"):
    pm, w = _packed(kind, 48, 96, layers=2)
    got = kernels.qmatmul(x, pm.qs, pm.d, pm.m, 1, targets=targets)
    np.testing.assert_allclose(
        got, x.astype(np.float64) @ w[1], rtol=1e-5, atol=1e-4, err_msg=kind
    )


def test_failed_build_names_the_compiler_output(tmp_path, monkeypatch):
  fake = tmp_path / "fake-cxx"
  fake.write_text("#!/bin/sh\necho 'error: no kernels today' >&2\nexit 1\n")
  fake.chmod(0o755)
  monkeypatch.setenv("CXX", str(fake))
  out = tmp_path / "cache"
  with pytest.raises(kernels.KernelBuildError, match="no kernels today"):
    kernels.build(out)
  assert not list(out.iterdir())  # nothing half-written left behind


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv(kernels.DISABLE_ENV, "0")
  ok, why = kernels.status.__wrapped__()
  assert not ok and kernels.DISABLE_ENV in why


# ---------------------------------------------------- the embedded default


def test_smollm2_packs_every_group_from_the_file(smollm2):
  """Q4_1 blocks and the Q8_0 head, fused and un-permuted, hold exactly the
  float32 parameters the model was loaded with."""
  qw = smollm2.quantized
  assert qw is not None
  assert dict(qw.outputs) == {
      "qkv": 960,
      "wo": 576,
      "gate_up": 3072,
      "w_down": 576,
      "head": 49152,
  }
  assert quantized.nbytes(qw) < 0.25 * 4 * 134e6  # vs float32 weights
  p = {n: np.asarray(v.get_value()) for n, v in smollm2.model.blocks.items()}
  for layer in (0, 29):
    wants = {
        "qkv": np.concatenate(
            [p[n][layer].reshape(576, -1) for n in ("wq", "wk", "wv")], 1
        ),
        "wo": p["wo"][layer].reshape(-1, 576),
        "gate_up": np.concatenate([p["w_gate"][layer], p["w_up"][layer]], 1),
        "w_down": p["w_down"][layer],
    }
    for name, want in wants.items():
      np.testing.assert_array_equal(
          quantized.dequantize(qw.mats[name], layer)[:, : want.shape[1]],
          want,
          err_msg=f"{name} layer {layer}",
      )
  embed = np.asarray(smollm2.model.embed.get_value())
  np.testing.assert_array_equal(
      quantized.dequantize(qw.mats["head"])[:, :49152], embed[:49152].T
  )


def test_smollm2_kernel_decoding_equals_float32_decoding(smollm2):
  prompts = [
      smollm2.chat_prompt(t)
      for t in ("Name a large river.", "What is two plus two?", "Say hello.")
  ]
  kw = dict(
      max_new_tokens=12,
      temperature=0.7,
      top_k=40,
      top_p=0.9,
      seed=3,
      stop_ids=(),
  )
  fast = smollm2.generate_ids(prompts, **kw)
  slow = SearchR3(
      smollm2.model, smollm2.tokenizer, smollm2.mesh, prompts=smollm2.prompts
  ).generate_ids(prompts, **kw)
  np.testing.assert_array_equal(fast.tokens, slow.tokens)
  np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-4)


# --------------------------------------------- small quantized GGUF files

_D, _HEADS, _KV, _HD, _FFN, _LAYERS = 64, 2, 1, 32, 96, 2


def _write_quantized(path: pathlib.Path, arch: str, types: dict) -> None:
  """A two-layer model whose matrices are block-quantized by `types`
  (tensor kind -> GGUF type name, or one per layer; F16 is not packable)."""
  rng = np.random.default_rng(5)
  tokens = ["<|endoftext|>"] + _byte_tokens()
  w = byte_level_writer(
      path,
      arch,
      layers=_LAYERS,
      hidden=_D,
      ffn=_FFN,
      heads=_HEADS,
      kv_heads=_KV,
      rope_base=1e4,
  )

  def add(name, kind, shape, permute_heads=0, layer=0):
    x = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    if permute_heads and arch == "llama":
      x = _llama_cpp_permute(x, permute_heads)
    t = types.get(kind, "F32")
    qt = gguf.GGMLQuantizationType[t if isinstance(t, str) else t[layer]]
    if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      w.add_tensor(
          name, x.astype(np.float16 if qt.name == "F16" else np.float32)
      )
    else:
      q = gguf.quants.quantize(x, qt)
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)

  add("token_embd.weight", "embed", (len(tokens), _D))
  if arch == "qwen2":
    add("output.weight", "head", (len(tokens), _D))
  w.add_tensor("output_norm.weight", np.ones(_D, np.float32))
  for i in range(_LAYERS):
    b = f"blk.{i}."
    w.add_tensor(
        b + "attn_norm.weight",
        1 + 0.1 * rng.standard_normal(_D).astype(np.float32),
    )
    w.add_tensor(
        b + "ffn_norm.weight",
        1 + 0.1 * rng.standard_normal(_D).astype(np.float32),
    )
    add(b + "attn_q.weight", "q", (_HEADS * _HD, _D), _HEADS, layer=i)
    add(b + "attn_k.weight", "k", (_KV * _HD, _D), _KV, layer=i)
    add(b + "attn_v.weight", "v", (_KV * _HD, _D), layer=i)
    add(b + "attn_output.weight", "o", (_D, _HEADS * _HD), layer=i)
    add(b + "ffn_gate.weight", "gate", (_FFN, _D), layer=i)
    add(b + "ffn_up.weight", "up", (_FFN, _D), layer=i)
    add(b + "ffn_down.weight", "down", (_D, _FFN), layer=i)
    if arch == "qwen2":
      for n, rows in (("q", _HEADS * _HD), ("k", _KV * _HD), ("v", _KV * _HD)):
        w.add_tensor(
            b + f"attn_{n}.bias",
            0.1 * rng.standard_normal(rows).astype(np.float32),
        )
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


_CASES = {
    # Q4_0 and Q4_1 fuse into one Q4_1 group; the F16 value projection
    # keeps q/k/v on the float32 path; the Q8_0 embedding is the head.
    "llama": (
        {
            "q": "Q4_0",
            "k": "Q4_1",
            "v": "F16",
            "o": "Q8_0",
            "gate": "Q4_1",
            "up": "Q4_0",
            "down": "Q8_0",
            "embed": "Q8_0",
        },
        {"wo", "gate_up", "w_down", "head"},
    ),
    # Biases on q/k/v, an untied Q4_1 head, a float32 embedding.
    "qwen2": (
        {
            "q": "Q4_1",
            "k": "Q4_1",
            "v": "Q4_1",
            "o": "Q4_1",
            "gate": "Q8_0",
            "up": "Q8_0",
            "down": "Q4_1",
            "head": "Q4_1",
        },
        {"qkv", "wo", "gate_up", "w_down", "head"},
    ),
    # Types that change between layers (as llama.cpp's mixes do): Q4_0 and
    # Q4_1 share a layout and stack; Q8_0 over Q4_1 cannot, so that group
    # stays on the float32 path.
    "qwen2-mixed-layers": (
        {
            "q": ("Q4_0", "Q4_1"),
            "k": "Q4_1",
            "v": ("Q4_1", "Q4_0"),
            "o": "Q8_0",
            "gate": ("Q8_0", "Q4_1"),
            "up": ("Q8_0", "Q4_1"),
            "down": ("Q4_1", "Q8_0"),
            "head": "Q8_0",
        },
        {"qkv", "wo", "head"},
    ),
}


@pytest.mark.parametrize("arch", sorted(_CASES))
def test_quantized_gguf_decodes_like_float32(tmp_path, arch, one_device_mesh):
  types, groups = _CASES[arch]
  f = tmp_path / f"{arch}.gguf"
  _write_quantized(f, arch.split("-")[0], types)
  fast = SearchR3.from_pretrained(
      str(f), mesh=one_device_mesh, cpu_kernels=True
  )
  slow = SearchR3.from_pretrained(
      str(f), mesh=one_device_mesh, cpu_kernels=False
  )
  assert slow.quantized is None
  assert set(fast.quantized.mats) == groups
  # The packed head covers the file's 258 rows; the embed token's new row
  # and the padding come from the float32 head.
  assert fast.quantized.width("head") == 258 < fast.cfg.vocab_size
  # Fewer head rows when the loader re-initialised one inside the file's
  # vocabulary: the packed rows stop there.
  from search_r3_jax.core.weights.gguf import read_gguf

  short = quantized.pack_checkpoint(read_gguf(f).get_blocks, fast.cfg, 100)
  assert short.width("head") == 100
  np.testing.assert_array_equal(
      quantized.dequantize(short.mats["head"])[:, :100],
      quantized.dequantize(fast.quantized.mats["head"])[:, :100],
  )

  # One decoder forward over few rows: the kernels against float32.
  g, state = nnx.split(fast.model)
  tokens = jnp.asarray([[5, 77, 200, 3], [9, 9, 40, 258]], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(4), tokens.shape)
  valid = jnp.ones(tokens.shape, bool)

  @jax.jit
  def forward(state, qw):
    return nnx.merge(g, state)(tokens, pos, valid, quantized=qw)[:2]

  lq, hq = forward(state, fast.quantized)
  lf, hf = forward(state, None)
  np.testing.assert_allclose(hq, hf, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lq, lf, rtol=1e-5, atol=1e-4)

  prompts = [[5, 77, 200], [9, 9, 40, 41, 42, 43, 44]]
  kw = dict(max_new_tokens=10, stop_ids=())
  for sampling in ({}, dict(temperature=0.9, top_k=20, top_p=0.9, seed=4)):
    a = fast.generate_ids(prompts, **kw, **sampling)
    b = slow.generate_ids(prompts, **kw, **sampling)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_replaced_parameters_leave_the_packed_weights(
    tmp_path, one_device_mesh
):
  """Training writes new parameters; generation must follow them, not the
  frozen copy packed at load time."""
  f = tmp_path / "m.gguf"
  _write_quantized(f, "qwen2", _CASES["qwen2"][0])
  m = SearchR3.from_pretrained(str(f), mesh=one_device_mesh)
  assert m.quantized is not None
  var = m.model.blocks["w_down"]
  var.set_value(var.get_value() * 0.0)
  prompts = [[5, 77, 200]]
  got = m.generate_ids(prompts, max_new_tokens=6, stop_ids=())
  assert m.quantized is None
  want = SearchR3(m.model, m.tokenizer, m.mesh).generate_ids(
      prompts, max_new_tokens=6, stop_ids=()
  )
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.logprobs, want.logprobs)


def test_cpu_kernels_true_says_why_it_cannot(
    tmp_path, tiny_dir, one_device_mesh, eight_device_mesh
):
  f = tmp_path / "m.gguf"
  _write_quantized(f, "qwen2", _CASES["qwen2"][0])
  with pytest.raises(ValueError, match="8 devices"):
    SearchR3.from_pretrained(str(f), mesh=eight_device_mesh, cpu_kernels=True)
  with pytest.raises(ValueError, match="float32"):
    SearchR3.from_pretrained(
        str(f), mesh=one_device_mesh, compute_dtype="bfloat16", cpu_kernels=True
    )
  with pytest.raises(ValueError, match="no block-quantized"):
    SearchR3.from_pretrained(
        str(tiny_dir), mesh=one_device_mesh, cpu_kernels=True
    )
  # Left to decide, the same loads fall back to the float32 path.
  assert (
      SearchR3.from_pretrained(str(f), mesh=eight_device_mesh).quantized is None
  )
