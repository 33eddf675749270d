"""The transformers + torch reference on the embedded SmolLM2 GGUF.

transformers dequantizes the GGUF with its own loader (and its own q/k
un-permutation), so comparisons against it check ours independently.
`from_pretrained(..., gguf_file=...)` would need `accelerate`; the loader
underneath does not.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional


def load_torch_gguf(path: Optional[os.PathLike] = None):
  """A float32 transformers model (eval mode) with the GGUF's weights."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  from search_r3_jax.core.weights.gguf import find_smollm2_gguf

  path = pathlib.Path(path) if path else find_smollm2_gguf()
  config = transformers.AutoConfig.from_pretrained(
      str(path.parent), gguf_file=path.name
  )
  with torch.device("meta"):
    skeleton = transformers.AutoModelForCausalLM.from_config(config)
  tensors = load_gguf_checkpoint(
      str(path), return_tensors=True, model_to_load=skeleton
  )["tensors"]
  return torch_model(config, tensors, source=str(path))


def torch_model(config, tensors, source: str):
  """A float32 transformers model (eval mode) of `config` holding `tensors`
  (HF name -> torch tensor or numpy array); every parameter must be given
  (a tied head excepted) and none left over."""
  import numpy as np
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32
  )
  as_torch = lambda v: (
      torch.from_numpy(np.array(v, np.float32))
      if isinstance(v, np.ndarray)
      else v.float()
  )
  missing, unexpected = model.load_state_dict(
      {k: as_torch(v) for k, v in tensors.items()}, strict=False
  )
  tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
  if set(missing) - tied or unexpected:
    raise RuntimeError(
        f"{source}: reference load mismatch: missing={missing} "
        f"unexpected={unexpected}"
    )
  model.tie_weights()
  return model.eval()
