"""The tree stays in one format: pyink (Google style) and isort (google
profile), as configured in pyproject.toml. Fix a failure with
`isort . && pyink .` from the project root."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )


def test_pyink_leaves_the_tree_unchanged():
  out = _run("pyink", "--check", ".")
  assert out.returncode == 0, (
      "pyink would reformat files (run `pyink .`):\n" + out.stderr
  )


def test_isort_leaves_the_imports_unchanged():
  out = _run("isort", "--check-only", ".")
  assert out.returncode == 0, (
      "isort would reorder imports (run `isort .`):\n" + out.stdout + out.stderr
  )
