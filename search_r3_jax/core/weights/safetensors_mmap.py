"""Reads safetensors files one tensor at a time through a memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the tensors' bytes. Mapping the
file and viewing each tensor's byte range as its dtype (bfloat16 and the
float8 types through ml_dtypes) reads nothing until a slice of it is used:
a loader that copies one device's shard of one tensor touches only those
pages, whatever the file's size or dtype. The `safetensors` package's numpy
reader refuses bfloat16, and its flax reader loads the whole file.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

from search_r3_jax.core.weights.common import WeightsError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# A header larger than this is not a safetensors header (the format's own
# limit is 100 MB).
_MAX_HEADER = 100_000_000


class SafetensorsFile:
  """One mapped file: `names()`, `dtype(name)`, `shape(name)`, and
  `tensor(name)`, a read-only numpy view of the tensor's bytes.

  Raises:
    WeightsError: the header is malformed or a tensor's byte range does not
      match its dtype and shape; the message names the file and tensor.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise WeightsError(f"{self.path}: too short for a safetensors file")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, _MAX_HEADER):
        raise WeightsError(
            f"{self.path}: header length {n} exceeds the file ({size} bytes)"
        )
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{self.path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
      raise WeightsError(f"{self.path}: header is not a JSON object")
    header.pop("__metadata__", None)
    self._start = 8 + n
    self._data_bytes = size - self._start
    self._entries = {}
    for name, e in header.items():
      try:
        dtype_name, shape = e["dtype"], tuple(int(d) for d in e["shape"])
        begin, end = (int(x) for x in e["data_offsets"])
      except (TypeError, KeyError, ValueError):
        raise WeightsError(
            f"{self.path}: tensor {name!r} has no valid dtype, shape and "
            "data_offsets in the header"
        ) from None
      if dtype_name not in DTYPES:
        raise WeightsError(
            f"{self.path}: tensor {name!r} has dtype {dtype_name!r}; "
            f"readable: {sorted(DTYPES)}"
        )
      dtype = DTYPES[dtype_name]
      want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if end - begin != want or begin < 0 or end > self._data_bytes:
        raise WeightsError(
            f"{self.path}: tensor {name!r} ({dtype_name} {list(shape)}) "
            f"spans bytes [{begin}, {end}) of {self._data_bytes}; its dtype "
            f"and shape need {want}"
        )
      self._entries[name] = (dtype, shape, begin)
    self._map = None

  def names(self) -> list[str]:
    return list(self._entries)

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def tensor(self, name: str) -> np.ndarray:
    """A read-only view: nothing is read until its elements are used."""
    dtype, shape, begin = self._entries[name]
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
      return np.zeros(shape, dtype)
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._map[
        self._start + begin : self._start + begin + count * dtype.itemsize
    ]
    return raw.view(dtype).reshape(shape)
