"""Reads an HF model directory: config.json, safetensors, tokenizer files."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import numpy as np
import tokenizers

from search_r3_jax.core.weights.common import Checkpoint
from search_r3_jax.core.weights.common import WeightsError
from search_r3_jax.core.weights.safetensors_mmap import SafetensorsFile


def _read_json(path: pathlib.Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(
        f"{path}: invalid JSON at line {e.lineno}, column "
        f"{e.colno}: {e.msg}"
    ) from None


def _token_str(value) -> Optional[str]:
  if isinstance(value, dict):
    return value.get("content")
  return value


def _safetensors_files(d: pathlib.Path) -> list[pathlib.Path]:
  index = d / "model.safetensors.index.json"
  if index.exists():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise WeightsError(f"{index}: field 'weight_map' is missing")
    files = sorted({d / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise WeightsError(
          f"{index} names shard files that do not exist: " f"{missing}"
      )
    return files
  files = sorted(d.glob("*.safetensors"))
  if not files:
    raise WeightsError(f"{d}: no *.safetensors files")
  return files


def read_hf_dir(path: str | os.PathLike) -> Checkpoint:
  """Reads an HF directory written by `save_pretrained` (or a hub snapshot).

  Raises:
    FileNotFoundError: the directory or its config.json does not exist.
    WeightsError: a file is malformed; the message names it.
  """
  d = pathlib.Path(path)
  if not d.exists():
    raise FileNotFoundError(f"model path does not exist: {d}")
  if not d.is_dir():
    raise WeightsError(f"{d} is not a directory")
  cfg_path = d / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(
        f"{d} has no config.json: not an HF model directory (expected "
        "config.json, *.safetensors and tokenizer.json)"
    )
  hf_config = _read_json(cfg_path)

  # Each file is mapped once; a tensor is a view of its bytes in the
  # file's dtype, read only where a parameter's slice uses it.
  where: dict[str, SafetensorsFile] = {}
  for f in _safetensors_files(d):
    try:
      st = SafetensorsFile(f)
    except OSError as e:
      raise WeightsError(f"{f}: cannot read safetensors header: {e}") from None
    for name in st.names():
      if name in where:
        raise WeightsError(
            f"tensor {name!r} is in both {where[name].path} and {f}"
        )
      where[name] = st

  def get_tensor(name: str) -> np.ndarray:
    return where[name].tensor(name)

  tok_path = d / "tokenizer.json"
  if not tok_path.exists():
    raise FileNotFoundError(f"{d} has no tokenizer.json")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
  except Exception as e:
    raise WeightsError(f"{tok_path}: cannot parse tokenizer: {e}") from None
  tcfg = {}
  if (d / "tokenizer_config.json").exists():
    tcfg = _read_json(d / "tokenizer_config.json")
  template = tcfg.get("chat_template")
  if (d / "chat_template.jinja").exists():
    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
  elif (d / "chat_template.json").exists():
    template = _read_json(d / "chat_template.json").get("chat_template")
  gen = {}
  if (d / "generation_config.json").exists():
    gen = _read_json(d / "generation_config.json")
  return Checkpoint(
      source=str(d),
      hf_config=hf_config,
      tensor_names=sorted(where),
      get_tensor=get_tensor,
      tokenizer=tokenizer,
      chat_template=template,
      bos_token=_token_str(tcfg.get("bos_token")),
      eos_token=_token_str(tcfg.get("eos_token")),
      pad_token=_token_str(tcfg.get("pad_token")),
      extra={"generation_config": gen},
      lazy_tensors=True,
  )
