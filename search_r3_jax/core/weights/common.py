"""The format-neutral result of reading a checkpoint.

Both readers (HF directory, GGUF file) return a `Checkpoint`: an HF-style
config dict, tensors under HF names in HF layout (`[out, in]` for linear
weights), and the tokenizer. `weights/convert.py` turns that into sharded
model parameters, so the model never sees a file format.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import numpy as np
import tokenizers


class WeightsError(ValueError):
  """A checkpoint that cannot be read; the message names the file or field."""


@dataclasses.dataclass
class Checkpoint:
  """What a reader found.

  Attributes:
    source: path of the file or directory, for messages.
    hf_config: dict in HF config.json form (model_type, hidden_size, ...).
    tensor_names: the HF names of all tensors present, e.g.
      "model.layers.0.self_attn.q_proj.weight".
    get_tensor: returns one tensor by HF name as numpy in HF layout, in
      the file's dtype (float32 for a dequantized GGUF tensor; bfloat16,
      float16 or float32 for safetensors, as a memory-mapped view that is
      read only where it is used). Lazy so that large checkpoints are read
      one tensor, or one slice of one, at a time.
    tokenizer: a `tokenizers.Tokenizer` (without the embed token).
    chat_template: Jinja chat template, or None.
    bos_token, eos_token, pad_token: token strings, or None.
    get_blocks: for block-quantized files, HF name -> (type name, raw
      uint8 [rows, bytes per row]) in HF row order, or None where the tensor
      is not block-quantized; None for formats without blocks.
    lazy_tensors: `get_tensor` returns views that cost nothing until read
      (memory-mapped safetensors), so a loader may call it per shard.
  """

  source: str
  hf_config: dict
  tensor_names: list[str]
  get_tensor: Callable[[str], np.ndarray]
  tokenizer: tokenizers.Tokenizer
  chat_template: Optional[str] = None
  bos_token: Optional[str] = None
  eos_token: Optional[str] = None
  pad_token: Optional[str] = None
  extra: Mapping[str, object] = dataclasses.field(default_factory=dict)
  get_blocks: Optional[Callable[[str], Optional[tuple[str, np.ndarray]]]] = None
  lazy_tensors: bool = False
