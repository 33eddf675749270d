"""Tests for the GGUF reader, against the real SmolLM2 file and tiny fakes.

transformers reads the same GGUF (`gguf_file=`) and serves as the reference
for the tokenizer and for the q/k un-permutation.
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import tokenizers

from search_r3_jax.core.weights.common import WeightsError
from search_r3_jax.core.weights.gguf import find_smollm2_gguf
from search_r3_jax.core.weights.gguf import read_gguf

# Strings for the tokenizer comparison: prose, digits, code, unicode, emoji,
# runs of spaces and newlines, contractions, chat markup.
TEXTS = [
    "Hello, world!",
    "The year 2024 had 365 days; 12345 + 678 = 13023.",
    "def f(x):\n    return x**2  # square\n\n\nprint(f(3))",
    "naïve café — 日本語, Ελληνικά, русский 😀🎉👍🏽",
    "multiple     spaces   here\t\ttabs",
    "  leading and trailing  ",
    "lines\n\n\nand\r\nwindows\n",
    "I'm sure you're right, we'll see; it's 3.14.",
    "price: $3.50 (approx.) or 1,000,000",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>a/b<file_sep>x.py",
    "",
]


@pytest.fixture(scope="module")
def path() -> pathlib.Path:
  return find_smollm2_gguf()


@pytest.fixture(scope="module")
def ckpt(path):
  return read_gguf(path)


@pytest.fixture(scope="module")
def hf_tokenizer(path):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_tensors(path) -> dict[str, np.ndarray]:
  """transformers' own dequantized, un-permuted tensors of the file."""

  import torch
  from transformers import AutoConfig
  from transformers import AutoModelForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  # `from_pretrained` wants `accelerate` for GGUF; the loader underneath only
  # needs a model for its module names, which a meta-device model gives.
  config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
  with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
  parsed = load_gguf_checkpoint(
      str(path), return_tensors=True, model_to_load=model
  )
  return {k: v.float().numpy() for k, v in parsed["tensors"].items()}


def test_find_smollm2_gguf(path):
  assert path.suffix == ".gguf" and path.is_file()


def test_config(ckpt):
  c = ckpt.hf_config
  assert c["model_type"] == "llama"
  assert c["num_hidden_layers"] == 30
  assert c["hidden_size"] == 576
  assert c["intermediate_size"] == 1536
  assert (c["num_attention_heads"], c["num_key_value_heads"]) == (9, 3)
  assert c["head_dim"] == 64
  assert c["rope_theta"] == 1e5
  assert c["rms_norm_eps"] == pytest.approx(1e-5)
  assert c["vocab_size"] == 49152
  assert c["max_position_embeddings"] == 8192
  assert c["tie_word_embeddings"] is True
  assert (ckpt.bos_token, ckpt.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert "<|im_start|>" in ckpt.chat_template


def test_tensor_names_and_shapes(ckpt):
  names = set(ckpt.tensor_names)
  assert len(names) == 2 + 30 * 9
  assert "lm_head.weight" not in names
  shapes = {
      "model.embed_tokens.weight": (49152, 576),
      "model.layers.29.self_attn.q_proj.weight": (576, 576),
      "model.layers.29.self_attn.k_proj.weight": (192, 576),
      "model.layers.29.self_attn.o_proj.weight": (576, 576),
      "model.layers.29.mlp.down_proj.weight": (576, 1536),
      "model.layers.29.mlp.up_proj.weight": (1536, 576),
      "model.norm.weight": (576,),
  }
  for name, shape in shapes.items():
    w = ckpt.get_tensor(name)
    assert w.shape == shape and w.dtype == np.float32, name
    assert np.isfinite(w).all()
  with pytest.raises(KeyError):
    ckpt.get_tensor("lm_head.weight")


def test_tensors_match_transformers(ckpt, hf_tensors):
  assert set(hf_tensors) - {"lm_head.weight"} == set(ckpt.tensor_names)
  for i in (0, 29):
    for proj in ("q_proj", "k_proj"):
      name = f"model.layers.{i}.self_attn.{proj}.weight"
      np.testing.assert_array_equal(ckpt.get_tensor(name), hf_tensors[name])
  for name in ckpt.tensor_names:
    np.testing.assert_allclose(
        ckpt.get_tensor(name),
        hf_tensors[name],
        rtol=1e-6,
        atol=1e-7,
        err_msg=name,
    )


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ckpt, hf_tokenizer, text):
  ids = ckpt.tokenizer.encode(text).ids
  assert ids == hf_tokenizer(text)["input_ids"]
  assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_special_tokens(ckpt):
  tok = ckpt.tokenizer
  assert tok.encode("<|im_start|>").ids == [1]
  assert tok.encode("<|im_end|>").ids == [2]
  assert tok.encode("x<|endoftext|>y").ids[1] == 0
  assert tok.encode("hi", add_special_tokens=True).ids == tok.encode("hi").ids


def test_tokenizer_splits_digits_first(ckpt):
  """SmolLM2 splits each digit off before the GPT-2 regex, as its own HF
  tokenizer and llama.cpp's `smollm` do, so a space run before a digit stays
  one token. (transformers' GGUF tokenizer ignores `smollm` and gives Ġ|Ġ.)
  """
  pieces = lambda s: [
      ckpt.tokenizer.id_to_token(i) for i in ckpt.tokenizer.encode(s).ids
  ]
  assert pieces("a  12") == ["a", "ĠĠ", "1", "2"]
  assert pieces("x 12345") == ["x", "Ġ", "1", "2", "3", "4", "5"]


# ---------------------------------------------------------------- tiny fakes

_HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM, _FFN = 16, 2, 1, 8, 24


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter: per head, rows [j, j + d/2] become [2j, 2j + 1]."""
  half = w.shape[0] // n_heads // 2
  out = np.empty_like(w)
  for h in range(n_heads):
    for j in range(half):
      base = h * 2 * half
      out[base + 2 * j] = w[base + j]
      out[base + 2 * j + 1] = w[base + half + j]
  return out


def _write_tiny(
    path: pathlib.Path,
    arch: str = "llama",
    *,
    skip_key=None,
    pre: str = "gpt2",
    extra_tensor=None,
    norm_dtype=np.float32,
    untied: bool = False,
) -> dict[str, np.ndarray]:
  """Writes a one-layer GGUF; returns its tensors under HF names, HF order."""
  rng = np.random.default_rng(0)
  tokens = ["<|endoftext|>"] + _byte_tokens()
  q, kv = _HEADS * _HEAD_DIM, _KV_HEADS * _HEAD_DIM
  hf = {
      "model.embed_tokens.weight": (len(tokens), _HIDDEN),
      "model.norm.weight": (_HIDDEN,),
      "model.layers.0.input_layernorm.weight": (_HIDDEN,),
      "model.layers.0.post_attention_layernorm.weight": (_HIDDEN,),
      "model.layers.0.self_attn.q_proj.weight": (q, _HIDDEN),
      "model.layers.0.self_attn.k_proj.weight": (kv, _HIDDEN),
      "model.layers.0.self_attn.v_proj.weight": (kv, _HIDDEN),
      "model.layers.0.self_attn.o_proj.weight": (_HIDDEN, q),
      "model.layers.0.mlp.gate_proj.weight": (_FFN, _HIDDEN),
      "model.layers.0.mlp.up_proj.weight": (_FFN, _HIDDEN),
      "model.layers.0.mlp.down_proj.weight": (_HIDDEN, _FFN),
  }
  if arch == "qwen2":
    hf["model.layers.0.self_attn.q_proj.bias"] = (q,)
    hf["model.layers.0.self_attn.k_proj.bias"] = (kv,)
  if untied:
    hf["lm_head.weight"] = (len(tokens), _HIDDEN)
  hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in hf.items()}
  gguf_names = {
      "model.embed_tokens.weight": "token_embd.weight",
      "model.norm.weight": "output_norm.weight",
      "lm_head.weight": "output.weight",
      "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
      "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
      "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
      "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
      "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
      "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
      "model.layers.0.self_attn.q_proj.bias": "blk.0.attn_q.bias",
      "model.layers.0.self_attn.k_proj.bias": "blk.0.attn_k.bias",
      "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
      "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
      "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
  }

  w = gguf.GGUFWriter(str(path), arch)
  keys = {
      "block_count": lambda: w.add_block_count(1),
      "context_length": lambda: w.add_context_length(128),
      "embedding_length": lambda: w.add_embedding_length(_HIDDEN),
      "feed_forward_length": lambda: w.add_feed_forward_length(_FFN),
      "head_count": lambda: w.add_head_count(_HEADS),
      "head_count_kv": lambda: w.add_head_count_kv(_KV_HEADS),
      "layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(1e-6),
      "rope_freq_base": lambda: w.add_rope_freq_base(1e6),
  }
  for key, add in keys.items():
    if key != skip_key:
      add()
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (len(tokens) - 1))
  w.add_token_merges(["Ġ t"])
  w.add_eos_token_id(0)
  for name, value in hf.items():
    if arch == "llama" and name.endswith("q_proj.weight"):
      value = _llama_cpp_permute(value, _HEADS)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      value = _llama_cpp_permute(value, _KV_HEADS)
    if name.endswith("norm.weight"):
      value = value.astype(norm_dtype)
    w.add_tensor(gguf_names[name], value)
  if extra_tensor:
    w.add_tensor(extra_tensor, np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf


def _byte_tokens() -> list[str]:
  return sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"]


def byte_level_writer(
    path: pathlib.Path,
    arch: str,
    *,
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    kv_heads: int,
    rope_base: float | None = None,
) -> gguf.GGUFWriter:
  """A GGUFWriter with the model's shape and a byte-level tokenizer of
  `["<|endoftext|>"] + _byte_tokens()` in its metadata; the caller adds the
  tensors and writes the file."""
  tokens = ["<|endoftext|>"] + _byte_tokens()
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(layers)
  w.add_context_length(128)
  w.add_embedding_length(hidden)
  w.add_feed_forward_length(ffn)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_layer_norm_rms_eps(1e-6)
  if rope_base is not None:
    w.add_rope_freq_base(rope_base)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (len(tokens) - 1))
  w.add_token_merges(["Ġ t"])
  w.add_eos_token_id(0)
  return w


@pytest.mark.parametrize(
    "arch,pre",
    [
        ("llama", "smollm"),
        ("llama", "llama-bpe"),
        ("llama", "default"),
        ("qwen2", "qwen2"),
    ],
)
def test_tiny_round_trip(tmp_path, arch, pre):
  """Tensors come back as written; only llama's q/k were permuted on disk."""
  f = tmp_path / "tiny.gguf"
  hf = _write_tiny(f, arch, pre=pre, untied=arch == "qwen2")
  ckpt = read_gguf(f)
  assert ckpt.hf_config["model_type"] == arch
  assert ckpt.hf_config["head_dim"] == _HEAD_DIM
  assert ckpt.hf_config["tie_word_embeddings"] is (arch == "llama")
  assert sorted(ckpt.tensor_names) == sorted(hf)
  for name, value in hf.items():
    np.testing.assert_array_equal(ckpt.get_tensor(name), value, err_msg=name)
  tok = ckpt.tokenizer
  assert tok.encode(" t<|endoftext|>").ids == [257, 0]
  text = "ab  12 x\n\ny ü"
  assert tok.decode(tok.encode(text).ids) == text


def _assert_says(error: pytest.ExceptionInfo, *parts) -> None:
  """The error message contains the path and the other words given."""
  for part in parts:
    assert str(part) in str(error.value), (part, str(error.value))


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    read_gguf(tmp_path / "nope.gguf")
  _assert_says(e, tmp_path / "nope.gguf")


def test_bad_magic(tmp_path):
  f = tmp_path / "model.gguf"
  f.write_bytes(b"PK\x03\x04 definitely not gguf")
  with pytest.raises(WeightsError) as e:
    read_gguf(f)
  _assert_says(e, f, "not a GGUF file")


@pytest.mark.parametrize("size", [1 << 20, 60_000_000])
def test_truncated(path, tmp_path, size):
  """Cut inside the metadata, and in the middle of the tensor data."""
  f = tmp_path / "cut.gguf"
  with open(path, "rb") as src:
    f.write_bytes(src.read(size))
  with pytest.raises(WeightsError) as e:
    read_gguf(f)
  _assert_says(e, f, "truncated or corrupt")


def test_unknown_architecture(tmp_path):
  f = tmp_path / "falcon.gguf"
  w = gguf.GGUFWriter(str(f), "falcon")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(WeightsError) as e:
    read_gguf(f)
  _assert_says(e, f, "general.architecture='falcon'")


@pytest.mark.parametrize(
    "write_kw,named",
    [
        (dict(skip_key="feed_forward_length"), "'llama.feed_forward_length'"),
        (
            dict(extra_tensor="blk.0.attn_q_norm.weight"),
            "'blk.0.attn_q_norm.weight'",
        ),
        (dict(pre="mystery"), "tokenizer.ggml.pre='mystery'"),
    ],
    ids=["missing_metadata_key", "unknown_tensor", "unknown_pre_tokenizer"],
)
def test_bad_file_names_what_is_wrong(tmp_path, write_kw, named):
  f = tmp_path / "tiny.gguf"
  _write_tiny(f, **write_kw)
  with pytest.raises(WeightsError) as e:
    read_gguf(f)
  _assert_says(e, f, named)


def test_unsupported_tensor_type(tmp_path):
  f = tmp_path / "tiny.gguf"
  _write_tiny(f, norm_dtype=np.int8)
  ckpt = read_gguf(f)  # Types are only checked when a tensor is read.
  with pytest.raises(WeightsError) as e:
    ckpt.get_tensor("model.layers.0.input_layernorm.weight")
  _assert_says(e, f, "'blk.0.attn_norm.weight'", "I8")


_QUANT_TYPES = [
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "TQ1_0",
    "TQ2_0",
    "MXFP4",
]


@pytest.mark.parametrize("qtype", _QUANT_TYPES)
def test_every_quantization_type_dequantizes(tmp_path, qtype):
  """Each type gguf can write reads back as exactly gguf's own round trip
  (for q/k after undoing the permutation, which commutes with row blocks)."""
  qt = gguf.GGMLQuantizationType[qtype]
  d, heads, kv_heads, head_dim = 256, 2, 1, 128
  rng = np.random.default_rng(1)
  tokens = ["<|endoftext|>"] + _byte_tokens()
  shapes = {
      "token_embd.weight": (len(tokens), d),
      "blk.0.attn_q.weight": (heads * head_dim, d),
      "blk.0.attn_k.weight": (kv_heads * head_dim, d),
      "blk.0.attn_v.weight": (kv_heads * head_dim, d),
      "blk.0.attn_output.weight": (d, heads * head_dim),
      "blk.0.ffn_gate.weight": (d, d),
      "blk.0.ffn_up.weight": (d, d),
      "blk.0.ffn_down.weight": (d, d),
  }
  f = tmp_path / f"{qtype}.gguf"
  w = byte_level_writer(
      f, "llama", layers=1, hidden=d, ffn=d, heads=heads, kv_heads=kv_heads
  )
  expected = {}
  for name, shape in shapes.items():
    x = rng.standard_normal(shape).astype(np.float32)
    expected[name] = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
    if name == "blk.0.attn_q.weight":
      x = _llama_cpp_permute(x, heads)
    elif name == "blk.0.attn_k.weight":
      x = _llama_cpp_permute(x, kv_heads)
    q = gguf.quants.quantize(x, qt)
    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
  for name in (
      "output_norm.weight",
      "blk.0.attn_norm.weight",
      "blk.0.ffn_norm.weight",
  ):
    w.add_tensor(name, np.ones(d, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

  ckpt = read_gguf(f)
  hf_name = {
      "token_embd.weight": "model.embed_tokens.weight",
      "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
      "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
      "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
      "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
      "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
      "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
      "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
  }
  for name, want in expected.items():
    got = ckpt.get_tensor(hf_name[name])
    assert got.dtype == np.float32 and got.shape == shapes[name]
    np.testing.assert_array_equal(got, want, err_msg=f"{qtype} {name}")
