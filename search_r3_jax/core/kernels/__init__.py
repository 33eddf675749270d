"""CPU kernels for XLA, compiled on first use: products with GGUF-quantized weights.

`qmatmul.cc` multiplies float32 activations by a matrix kept in GGUF's own
block quantization (Q4_1, or Q8_0), dequantizing in registers. A decode step
is bound by streaming weights from memory, so reading 5-8.5 bits per weight
instead of 32 is what makes CPU generation fast; see `quantized.py` for the
packed layout and how the decoder uses it.

The source is compiled once per machine with the system C++ compiler (`$CXX`,
else g++, c++ or clang++) against the FFI headers that jaxlib ships, into
`<cache root>/kernels/` (the cache root is `$SEARCH_R3_DATA_DIR` or
`~/.cache/search_r3_jax`), and registered as XLA custom-call targets.
When that is impossible (no compiler, not a CPU backend, or
`SEARCH_R3_CPU_KERNELS=0`), `status()` says why and callers keep the plain
XLA path; nothing else changes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib.version

from search_r3_jax.core.paths import cache_root

log = logging.getLogger(__name__)

DISABLE_ENV = "SEARCH_R3_CPU_KERNELS"
_SOURCE = pathlib.Path(__file__).with_name("qmatmul.cc")
# FFI symbol -> custom-call target name.
_TARGETS = {
    "QMatmulQ41": "search_r3_jax_qmatmul_q4_1",
    "QMatmulQ80": "search_r3_jax_qmatmul_q8_0",
}
# The programs' and the generate benchmark's `--cpu_kernels` values ->
# `SearchR3.from_pretrained(cpu_kernels=...)`.
FLAG_VALUES = {"auto": None, "on": True, "off": False}
LANES = 16  # outputs per tile
BLOCK = 32  # inputs per quantization block


class KernelBuildError(RuntimeError):
  """The kernel source did not compile; the message holds the compiler's."""


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _arch_flags() -> list[str]:
  machine = platform.machine().lower()
  if machine in ("arm64", "aarch64"):
    return ["-mcpu=native"]
  return ["-march=native"]


def _cpu_signature() -> str:
  """Distinguishes machines sharing a home directory (-march=native)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
    lines = [
        l
        for l in text.splitlines()
        if l.startswith(("flags", "Features", "model name"))
    ]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def build(
    cache_dir: Optional[pathlib.Path] = None, extra_flags: Sequence[str] = ()
) -> pathlib.Path:
  """Compiles `qmatmul.cc` (once per source, compiler, flags, jaxlib, CPU).

  Args:
    cache_dir: where the library goes (default `<cache root>/kernels`).
    extra_flags: more compiler flags, e.g. `-mno-avx512f` to build the
      AVX2 path on an AVX-512 machine.
  Returns:
    The shared library's path.
  Raises:
    KernelBuildError: no compiler, or the compiler failed (its output is in
      the message).
  """
  cxx = _compiler()
  if cxx is None:
    raise KernelBuildError("no C++ compiler found ($CXX, g++, c++, clang++)")
  include = jax.ffi.include_dir()
  flags = [
      "-O3",
      "-std=c++17",
      "-shared",
      "-fPIC",
      "-w",
      *_arch_flags(),
      *extra_flags,
      f"-I{include}",
  ]
  key = hashlib.sha256(
      "\0".join(
          [
              _SOURCE.read_text(),
              cxx,
              *flags,
              jaxlib.version.__version__,
              _cpu_signature(),
          ]
      ).encode()
  ).hexdigest()[:16]
  out_dir = pathlib.Path(cache_dir or cache_root() / "kernels")
  out = out_dir / f"qmatmul-{key}.so"
  if out.is_file():
    return out
  out_dir.mkdir(parents=True, exist_ok=True)
  # Compile beside the target and rename: a concurrent or interrupted build
  # never leaves a half-written library under the final name.
  tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  cmd = [cxx, *flags, str(_SOURCE), "-o", str(tmp)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tmp.unlink(missing_ok=True)
    err = proc.stderr + proc.stdout
    if len(err) > 6000:  # the first error and the last lines
      err = err[:4000] + "\n[...]\n" + err[-2000:]
    raise KernelBuildError(
        f"compiling {_SOURCE} failed ({' '.join(cmd)}):\n{err}"
    )
  os.replace(tmp, out)
  return out


@functools.cache
def status() -> tuple[bool, str]:
  """(available, why not): builds and registers the kernels on first call."""
  if os.environ.get(DISABLE_ENV, "1").lower() in ("0", "false", "no", "off"):
    return False, f"disabled by {DISABLE_ENV}"
  if jax.default_backend() != "cpu":
    return False, f"the default JAX backend is {jax.default_backend()}"
  try:
    register(build())
  except Exception as e:  # pylint: disable=broad-except
    # Whatever stops the kernels (compiler, loader, an XLA without FFI
    # thread pools), the float32 path still runs.
    log.warning("CPU kernels unavailable, using XLA matmuls: %s", e)
    return False, f"{type(e).__name__}: {e}"
  return True, ""


def register(library: pathlib.Path, suffix: str = "") -> dict[str, str]:
  """Loads a built library and registers its handlers as custom-call
  targets named `<default target><suffix>`; returns symbol -> target."""
  lib = ctypes.cdll.LoadLibrary(str(library))
  targets = {}
  for symbol, target in _TARGETS.items():
    jax.ffi.register_ffi_target(
        target + suffix, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
    )
    targets[symbol] = target + suffix
  return targets


def available() -> bool:
  return status()[0]


def qmatmul(
    x: jax.Array,
    qs: jax.Array,
    d: jax.Array,
    m: Optional[jax.Array],
    layer,
    targets: Optional[dict[str, str]] = None,
) -> jax.Array:
  """x [M, K] float32 times layer `layer` of a packed matrix -> [M, N].

  Args:
    qs: u8 [L, N/16, K/32, 256] (Q4_1) or s8 [L, N/16, K/32, 512] (Q8_0).
    d: f32 [L, N/16, K/32, 16] scales; m: the same for Q4_1's minimums, None
      for Q8_0.
    layer: int32 scalar (traced or not) picking one of the L matrices.
    targets: the custom calls to use (from `register`); default the
      library `status()` built.
  """
  if targets is None:
    if not available():
      raise RuntimeError(f"CPU kernels unavailable: {status()[1]}")
    targets = _TARGETS
  n = qs.shape[1] * LANES
  out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
  layer = jnp.asarray(layer, jnp.int32)
  if m is None:
    return jax.ffi.ffi_call(targets["QMatmulQ80"], out)(x, qs, d, layer)
  return jax.ffi.ffi_call(targets["QMatmulQ41"], out)(x, qs, d, m, layer)
