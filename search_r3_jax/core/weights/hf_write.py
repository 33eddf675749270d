"""Writes a `Decoder` and its `Tokenizer` as an HF model directory that
transformers loads by itself (the inverse of `hf.py`).

The folder holds the Llama/Qwen2 `config.json`, `model.safetensors`
(float32, HF names and layouts), `tokenizer.json` with `<|embed_token|>` as
a special token, `tokenizer_config.json` and `special_tokens_map.json`,
`chat_template.jinja`, `generation_config.json`, `search_r3.json` (the
prompts and where the weights came from) and a README saying how to embed
with transformers alone. It is written under a hidden temporary name beside
the target, each file fsynced, and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.numpy import save_file

from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.tokenizer import embed_suffix_ids
from search_r3_jax.core.tokenizer import Tokenizer
from search_r3_jax.core.weights.common import WeightsError
from search_r3_jax.core.weights.convert import hf_tensors

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Fields of a source config.json that describe its stored weights rather
# than the model, and so do not carry over to float32 safetensors.
_DROPPED = ("quantization_config", "_name_or_path", "torch_dtype", "dtype")


class ExportError(WeightsError):
  """An export that cannot be written; the message names the folder."""


def hf_config(
    cfg: ModelConfig, tok: Tokenizer, base: Optional[Mapping] = None
) -> dict[str, Any]:
  """The config.json of `cfg`: `base` (the source checkpoint's own, when
  there is one) with every shape and numeric field set from `cfg`."""
  if cfg.arch not in _ARCHITECTURES:
    raise ExportError(f"no HF architecture for arch={cfg.arch!r}")
  out = {k: v for k, v in dict(base or {}).items() if k not in _DROPPED}
  out.update(
      architectures=[_ARCHITECTURES[cfg.arch]],
      model_type=cfg.arch,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings,
      max_position_embeddings=cfg.max_position_embeddings,
      hidden_act="silu",
      rope_scaling=None,
      dtype="float32",
      bos_token_id=_token_id(tok, tok.bos_token),
      eos_token_id=tok.end_of_turn_id,
      pad_token_id=tok.pad_id,
  )
  if cfg.arch == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.setdefault("use_sliding_window", False)
  return out


def _token_id(tok: Tokenizer, token: Optional[str]) -> Optional[int]:
  return tok.tok.token_to_id(token) if token else None


def _token_str(tok: Tokenizer, tid: Optional[int]) -> Optional[str]:
  return tok.tok.id_to_token(tid) if tid is not None else None


def _readme(tok: Tokenizer, prompts: PromptConfig) -> str:
  marker = "\x00TEXT\x00"
  parts = {}
  for kind in ("query", "document"):
    msgs = prompts.messages(kind, marker, answer=False)
    head, tail = tok.apply_chat_template(
        msgs, add_generation_prompt=True
    ).split(marker)
    suffix = tok.decode(embed_suffix_ids(tok, prompts), False)
    parts[kind] = (head, tail + suffix)
  return f"""# A Search-R3 embedding model

Written by `search_r3_jax` (`python -m search_r3_jax.export`). The model is a
chat LLM whose retrieval embedding is the final hidden state (after the last
norm) at the special token `{EMBED_TOKEN}` (id
{tok.embed_token_id}), L2-normalised; queries and documents use the prompts
below. transformers and torch alone are enough:

```python
import torch
import transformers

DIR = "."  # this folder
tok = transformers.AutoTokenizer.from_pretrained(DIR)
model = transformers.AutoModelForCausalLM.from_pretrained(
    DIR, dtype=torch.float32
).eval()
PROMPTS = {json.dumps(parts, indent=4)}


def embed(texts, kind="query"):
  head, tail = PROMPTS[kind]
  out = []
  for text in texts:
    ids = tok(head + text + tail, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
      h = model(torch.tensor([ids]), output_hidden_states=True)
    v = h.hidden_states[-1][0, -1]  # the last token: {EMBED_TOKEN}
    out.append(torch.nn.functional.normalize(v, dim=-1))
  return torch.stack(out)


q = embed(["who wrote the iliad"], "query")
d = embed(["The Iliad is an ancient Greek epic poem attributed to Homer."],
          "document")
print((q @ d.T).item())
```

A query can also be embedded after the model's own analysis: generate from
the reasoning prompt (`search_r3.json`, `prompts.reasoning_system`) until
the model writes `{EMBED_TOKEN}`, and take the hidden state there.
`search_r3_jax` does this with
`SearchR3.from_pretrained(DIR).encode_queries(texts, reasoning=True)`.
"""


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_text(path: pathlib.Path, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _write_json(path: pathlib.Path, obj) -> None:
  _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_hf_dir(
    model: Decoder,
    tok: Tokenizer,
    out: os.PathLike | str,
    *,
    base_config: Optional[Mapping] = None,
    generation_config: Optional[Mapping] = None,
    prompts: PromptConfig = PromptConfig(),
    provenance: Optional[Mapping] = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `model` and `tok` as an HF directory at `out`.

  Args:
    base_config: the source checkpoint's config.json, whose fields other
      than the shapes carry over.
    generation_config: the source's generation_config.json, likewise.
    prompts: the prompts the model was trained with (into the README and
      search_r3.json).
    provenance: where the weights came from (into search_r3.json).
    overwrite: replace a non-empty `out`; without it such a folder is
      refused and left as it is.

  Raises:
    ExportError: `out` exists and is not an empty folder, and `overwrite`
      is not set.
  """
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise ExportError(f"export target {out} exists and is not a folder")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(
        f"export target {out} is not empty; choose another folder or "
        "allow overwriting (--overwrite)"
    )
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    cfg = model.cfg
    tensors = {
        k: np.ascontiguousarray(v, np.float32)
        for k, v in hf_tensors(model).items()
    }
    weights = tmp / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with open(weights, "rb+") as f:
      os.fsync(f.fileno())
    del tensors
    _write_json(tmp / "config.json", hf_config(cfg, tok, base_config))
    tok.tok.save(str(tmp / "tokenizer.json"))
    with open(tmp / "tokenizer.json", "rb+") as f:
      os.fsync(f.fileno())
    specials = dict(
        bos_token=tok.bos_token,
        eos_token=_token_str(tok, tok.end_of_turn_id),
        pad_token=_token_str(tok, tok.pad_id),
        additional_special_tokens=[EMBED_TOKEN],
    )
    specials = {k: v for k, v in specials.items() if v is not None}
    _write_json(tmp / "special_tokens_map.json", specials)
    _write_json(
        tmp / "tokenizer_config.json",
        dict(
            specials,
            tokenizer_class="PreTrainedTokenizerFast",
            model_max_length=cfg.max_position_embeddings,
            clean_up_tokenization_spaces=False,
            add_bos_token=False,
            add_eos_token=False,
        ),
    )
    _write_text(tmp / "chat_template.jinja", tok.chat_template)
    gen = dict(generation_config or {})
    gen.update(
        eos_token_id=list(tok.eos_ids),
        pad_token_id=tok.pad_id,
        bos_token_id=_token_id(tok, tok.bos_token),
    )
    gen = {k: v for k, v in gen.items() if v is not None}
    _write_json(tmp / "generation_config.json", gen)
    _write_json(
        tmp / "search_r3.json",
        dict(
            embed_token=EMBED_TOKEN,
            embed_token_id=tok.embed_token_id,
            pooling="last hidden state at the embed token, L2-normalised",
            prompts=dict(
                query_system=prompts.query_system,
                document_system=prompts.document_system,
                reasoning_system=prompts.reasoning_system,
                embed_suffix=prompts.embed_suffix,
            ),
            provenance=dict(provenance or {}),
        ),
    )
    _write_text(tmp / "README.md", _readme(tok, prompts))
    _fsync_dir(tmp)
    if out.exists():
      old = out.parent / f".{out.name}.replaced-{os.getpid()}"
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old)
    else:
      tmp.rename(out)
    _fsync_dir(out.parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
