"""Where the package keeps what it downloads, prepares or compiles.

A light module (no TensorFlow import) so that every part of the package can
find the cache without loading the data pipeline.
"""

from __future__ import annotations

import os
import pathlib

DATA_DIR_ENV = "SEARCH_R3_DATA_DIR"


def cache_root() -> pathlib.Path:
  """$SEARCH_R3_DATA_DIR, or ~/.cache/search_r3_jax."""
  env = os.environ.get(DATA_DIR_ENV)
  return (
      pathlib.Path(env)
      if env
      else (pathlib.Path.home() / ".cache" / "search_r3_jax")
  )
