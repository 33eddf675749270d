"""Decoder weights kept in GGUF's block quantization, for fast CPU decoding.

A GGUF model such as the embedded SmolLM2 (Q4_1 blocks, Q8_0 embedding)
stores each weight in 5 or 8.5 bits. The float32 parameters the model
trains with are those same numbers dequantized; at decode time, though, a
step is bound by reading the weights from memory, and float32 reads 4-6 times
more bytes than the file holds. `QuantizedWeights` keeps the file's own
blocks, repacked for the CPU kernel (`kernels/qmatmul.cc`), which dequantizes
them in registers and multiplies with float32 activations.

The numbers are the GGUF's: w = d * q + m (Q4_1), d * (q - 8) (Q4_0, stored
as Q4_1 with m = -8 d, exactly), d * q (Q8_0). Products differ from the
float32 path only by the order of float32 additions (and a fused
multiply-add in the dequantization), about 1e-6 relative.

Matrices are fused where they share an input: q/k/v into `qkv`, gate/up into
`gate_up`; `wo`, `w_down` and the output `head` stand alone. A group whose
tensors are not all of a supported type stays on the XLA path. The head
covers the checkpoint's vocabulary; rows added later (`<|embed_token|>`, the
padding) come from the float32 head.

These weights are a frozen copy: `SearchR3` uses them only while its model
still holds the very parameter arrays they were packed beside, so training
(or loading other parameters) falls back to the float32 path on its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from search_r3_jax.core import kernels
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.kernels import BLOCK
from search_r3_jax.core.kernels import LANES

# Block layouts of the supported GGUF types: bytes per block of 32 weights.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# Decode steps feed B rows; prompts of more rows (prefill, encoding) use the
# float32 matmuls, which are compute-bound there and already fast.
MAX_ROWS = 64

# Packed group -> the HF tensor suffixes fused into it, in output order.
GROUPS = {
    "qkv": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "wo": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "w_down": ("mlp.down_proj.weight",),
}


class PackedMatrix(NamedTuple):
  """One stack of L matrices [K, N] in the kernel's layout (see qmatmul.cc).

  qs: u8 [L, N/16, K/32, 256] (Q4_1 layout) or s8 [L, N/16, K/32, 512] (Q8_0).
  d: f32 [L, N/16, K/32, 16]; m: the same (Q4_1) or None (Q8_0).
  """

  qs: object
  d: object
  m: object


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["mats"],
    meta_fields=["outputs"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
  """The packed groups of one model.

  Attributes:
    mats: group name ("qkv", "wo", "gate_up", "w_down", "head") ->
      PackedMatrix. Block groups stack the layers; the head has L = 1.
    outputs: ((group, N), ...) the real output width of each group (the
      packed one is rounded up to whole tiles).
  """

  mats: dict
  outputs: tuple

  # The decoder uses these weights only for batches of at most this many
  # tokens (decode steps); larger ones are compute-bound, where XLA's float32
  # matmuls are faster.
  max_rows = MAX_ROWS

  def width(self, name: str) -> int:
    return dict(self.outputs)[name]

  def matmul(self, x: jax.Array, name: str, layer=0) -> jax.Array:
    """x [..., K] float32 times layer `layer` of group `name` -> [..., N]."""
    pm = self.mats[name]
    lead = x.shape[:-1]
    y = kernels.qmatmul(
        x.reshape(-1, x.shape[-1]).astype(jnp.float32), pm.qs, pm.d, pm.m, layer
    )
    return y[:, : self.width(name)].reshape(*lead, -1)


def unpack_gguf_rows(
    kind: str, raw: np.ndarray, cols: int
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """GGUF blocks of a [rows, cols] tensor -> integer codes and scales.

  Args:
    kind: "Q4_0", "Q4_1" or "Q8_0".
    raw: uint8 [rows, cols / 32 * BLOCK_BYTES[kind]].
  Returns:
    (q [rows, cols] uint8 (Q4_*) or int8 (Q8_0), d [rows, cols/32] float32,
    m [rows, cols/32] float32 or None); the weight is d * q + m (Q4_*) or
    d * q (Q8_0). Q4_0's d * (q - 8) is returned as m = -8 d.
  """
  rows, nb = raw.shape[0], cols // BLOCK
  blocks = np.ascontiguousarray(raw).reshape(rows, nb, BLOCK_BYTES[kind])
  d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
  if kind == "Q8_0":
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return q, d, None
  if kind == "Q4_1":
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
  else:  # Q4_0
    m = np.float32(-8.0) * d
    nibbles = blocks[..., 2:]
  # Byte i of a block holds weight i (low nibble) and weight i + 16 (high).
  q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
  return q.reshape(rows, cols).astype(np.uint8), d, m


def pack_rows(
    q: np.ndarray, d: np.ndarray, m: Optional[np.ndarray]
) -> PackedMatrix:
  """Codes of one [N, K] matrix (rows are outputs) -> the kernel layout.

  N is padded to whole tiles of 16 with zero weights.
  """
  n, k = q.shape
  kb = k // BLOCK
  pad = -n % LANES
  if pad:
    q = np.concatenate([q, np.zeros((pad, k), q.dtype)])
    d = np.concatenate([d, np.zeros((pad, kb), np.float32)])
    if m is not None:
      m = np.concatenate([m, np.zeros((pad, kb), np.float32)])
  nt = (n + pad) // LANES
  tiles = lambda a: np.ascontiguousarray(
      a.reshape(nt, LANES, kb).transpose(0, 2, 1), np.float32
  )
  if m is None:  # Q8_0: [NT, lane, KB, 32] -> [NT, KB, 32, lane]
    qs = q.reshape(nt, LANES, kb, BLOCK).transpose(0, 2, 3, 1)
    return PackedMatrix(
        np.ascontiguousarray(qs).reshape(nt, kb, 512), tiles(d), None
    )
  # Q4_1: weights 2j and 2j + 1 of a block share byte j of each lane.
  qs = q.reshape(nt, LANES, kb, BLOCK // 2, 2).transpose(0, 2, 3, 1, 4)
  qs = qs[..., 0] | (qs[..., 1] << 4)
  return PackedMatrix(
      np.ascontiguousarray(qs).reshape(nt, kb, 256), tiles(d), tiles(m)
  )


def dequantize(pm: PackedMatrix, layer: int = 0) -> np.ndarray:
  """The float32 [K, N_padded] matrix a packed stack holds (for checks)."""
  qs, d = np.asarray(pm.qs[layer]), np.asarray(pm.d[layer])
  nt, kb, _ = qs.shape
  if pm.m is None:
    q = qs.reshape(nt, kb, BLOCK, LANES).astype(np.float32)
    w = q * d[:, :, None, :]
  else:
    lo, hi = qs & 0x0F, qs >> 4
    q = np.stack([lo, hi], -1).reshape(nt, kb, BLOCK // 2, LANES, 2)
    q = q.transpose(0, 1, 2, 4, 3).reshape(nt, kb, BLOCK, LANES)
    m = np.asarray(pm.m[layer])
    w = q.astype(np.float32) * d[:, :, None, :] + m[:, :, None, :]
  return w.transpose(1, 2, 0, 3).reshape(kb * BLOCK, nt * LANES)


def _stack(mats: list[PackedMatrix]) -> PackedMatrix:
  m = None if mats[0].m is None else np.stack([p.m for p in mats])
  return PackedMatrix(
      np.stack([p.qs for p in mats]), np.stack([p.d for p in mats]), m
  )


def _layout(kind: str) -> str:
  return "Q8_0" if kind == "Q8_0" else "Q4_1"


def pack_checkpoint(
    get_blocks: Callable[[str], Optional[tuple]],
    cfg: ModelConfig,
    head_rows: int,
) -> Optional[QuantizedWeights]:
  """Packs every group whose tensors are all of a supported GGUF type.

  Args:
    get_blocks: HF tensor name -> (GGUF type name, raw uint8 [rows, bytes])
      in HF row order, or None for a tensor that is not block-quantized
      (`Checkpoint.get_blocks`).
    cfg: the model's config.
    head_rows: how many leading rows of the checkpoint's head to pack: its
      vocabulary, or fewer where the loader re-initialised a row inside it
      (the float32 head supplies every row from there on).
  Returns:
    The packed groups, or None when no group qualifies.
  """
  mats, outputs = {}, []

  def codes(name: str, cols: int):
    found = get_blocks(name)
    if found is None or found[0] not in BLOCK_BYTES or cols % BLOCK:
      return None
    return found[0], unpack_gguf_rows(found[0], found[1], cols)

  for group, suffixes in GROUPS.items():
    layers, layout = [], None
    for i in range(cfg.num_layers):
      parts = []
      for suffix in suffixes:
        name = f"model.layers.{i}.{suffix}"
        cols = (
            cfg.intermediate_size
            if suffix.startswith("mlp.down")
            else cfg.num_heads * cfg.head_dim
            if "o_proj" in suffix
            else cfg.hidden_size
        )
        parts.append(codes(name, cols))
      if any(p is None for p in parts):
        break
      kinds = {_layout(k) for k, _ in parts}
      # One layout for the whole stack: every layer's tensors, not only
      # those of one layer (llama.cpp mixes types across layers).
      if len(kinds) != 1 or kinds != {layout or next(iter(kinds))}:
        break
      layout = next(iter(kinds))
      cat = lambda j: (
          None
          if parts[0][1][j] is None
          else np.concatenate([c[j] for _, c in parts])
      )
      layers.append(pack_rows(cat(0), cat(1), cat(2)))
      width = sum(c[0].shape[0] for _, c in parts)
    if len(layers) == cfg.num_layers:
      mats[group] = _stack(layers)
      outputs.append((group, width))
  head_name = (
      "model.embed_tokens.weight"
      if cfg.tie_word_embeddings
      else "lm_head.weight"
  )
  head = codes(head_name, cfg.hidden_size)
  if head is not None and 0 < head_rows <= head[1][0].shape[0]:
    _, (q, d, m) = head
    mats["head"] = _stack(
        [
            pack_rows(
                q[:head_rows],
                d[:head_rows],
                None if m is None else m[:head_rows],
            )
        ]
    )
    outputs.append(("head", head_rows))
  if not mats:
    return None
  return QuantizedWeights(mats, tuple(outputs))


def to_device(qw: QuantizedWeights, device=None) -> QuantizedWeights:
  put = lambda a: None if a is None else jax.device_put(a, device)
  return QuantizedWeights(
      {
          k: PackedMatrix(put(p.qs), put(p.d), put(p.m))
          for k, p in qw.mats.items()
      },
      qw.outputs,
  )


def nbytes(qw: QuantizedWeights) -> int:
  return sum(
      int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(qw)
  )
