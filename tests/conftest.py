"""Test setup: 8 fake CPU devices stand in for a mesh, and tiny prime-sized
HF checkpoints are written with transformers' own `save_pretrained`."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import pathlib

import jax
import pytest
import tokenizers

from search_r3_jax.core import sharding as shd

# Prime sizes wherever the architecture allows, so no dimension can be
# confused with another and sharding falls back where nothing divides.
# (transformers needs hidden % heads == 0; Llama gets an explicit head_dim that
# differs from hidden / heads, Qwen2 derives it.)
TINY = dict(
    vocab_size=131,
    hidden_size=44,
    intermediate_size=67,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    max_position_embeddings=257,
    rms_norm_eps=1e-6,
)
WORDS = (
    "the capital of france is paris rome berlin city river who what "
    "where when document query embedding search a an and in on"
).split()


def write_word_tokenizer(d: pathlib.Path, n_ids: int) -> None:
  """A word-level tokenizer.json with ChatML specials, ids < n_ids."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
  for i in range(len(vocab), n_ids):
    vocab[f"w{i}"] = i
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, "<|endoftext|>")
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
  tok.add_special_tokens(
      [tokenizers.AddedToken(s, special=True) for s in specials]
  )
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  )


def make_tiny_hf_dir(
    d: pathlib.Path,
    arch: str,
    seed: int = 0,
    tokenizer_ids: int = 113,
    dtype: str = "float32",
    max_shard_size=None,
) -> pathlib.Path:
  """Random tiny Llama or Qwen2 written by transformers' save_pretrained,
  its weights stored as `dtype` (float32, bfloat16 or float16), split into
  files of at most `max_shard_size` when given.

  The tokenizer knows fewer ids than the embedding has rows, like Qwen's
  padded vocabulary.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  if arch == "llama":
    cfg = transformers.LlamaConfig(
        **TINY, rope_theta=10000.0, tie_word_embeddings=False
    )
  elif arch == "qwen2":
    kw = dict(TINY)
    kw.update(num_attention_heads=2, num_key_value_heads=1)
    del kw["head_dim"]  # Qwen2 derives it: 44 / 2 = 22
    cfg = transformers.Qwen2Config(
        **kw, rope_theta=1e6, tie_word_embeddings=True
    )
  else:
    raise ValueError(arch)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  d.mkdir(parents=True, exist_ok=True)
  model = model.to(getattr(torch, dtype))
  kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(str(d), **kw)
  write_word_tokenizer(d, tokenizer_ids)
  return d


@pytest.fixture(scope="session")
def one_device_mesh():
  return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def eight_device_mesh():
  assert len(jax.devices()) == 8, "XLA_FLAGS must give 8 CPU devices"
  return shd.make_mesh((2, 2, 2))


# Shared models: built once per session (the real one takes seconds to load).


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """A tiny random Llama checkpoint directory."""
  return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.fixture(scope="session")
def tiny(tiny_dir, one_device_mesh):
  from search_r3_jax import SearchR3

  return SearchR3.from_pretrained(str(tiny_dir), mesh=one_device_mesh)


@pytest.fixture(scope="session")
def smollm2(one_device_mesh):
  """The embedded default model on one device."""
  from search_r3_jax import SearchR3

  return SearchR3.from_pretrained("smollm2-135m", mesh=one_device_mesh)


CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, variant: str = "", overrides=None):
  """`configs/<name>.py`'s get_config(variant), with `overrides`
  ({"dotted.field": value}) applied: what `--config=configs/<name>.py:variant
  --config.dotted.field=value` gives a program."""
  spec = importlib.util.spec_from_file_location(
      f"config_{name}", CONFIGS / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(variant)
  for key, value in (overrides or {}).items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  return cfg
