"""The package's floors import downwards only, with no import cycles, and the
lower floors load without the face (`SearchR3`) or the CPU kernels."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "search_r3_jax"

# Floor of each top-level part of the package; an import may only go to the
# same floor or a lower one.
FLOORS = {"core": 1, "data": 2, "retrieval": 3, "training": 4, "benchmarks": 6}
FACE = 5  # api.py, the programs, config_blocks.py


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:
    return 0  # the package's own __init__: names handed on, lazily
  return FLOORS.get(parts[1], FACE)


def _imports() -> dict[str, set[str]]:
  """module -> the package modules it imports (at any depth of its code)."""
  modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = here.split(".")[: len(here.split(".")) - node.level + 1]
          base = ".".join(up + ([node.module] if node.module else []))
        # `from pkg import mod` imports the submodule when there is one.
        targets = [
            f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
            for a in node.names
        ]
      else:
        continue
      for t in targets:
        while t and t not in modules:
          t = t.rpartition(".")[0]
        if t and t != name and t.startswith("search_r3_jax"):
          out.add(t)
    graph[name] = out
  return graph


def test_imports_never_run_up_a_floor():
  upward = sorted(
      (a, b)
      for a, targets in _imports().items()
      for b in targets
      if _floor(b) > _floor(a) and _floor(a) != 0
  )
  assert not upward, f"imports from a lower floor to a higher one: {upward}"


def test_no_import_cycles():
  graph = _imports()
  # Package __init__ files re-export their submodules; an edge into one is
  # an edge into the package's face, not a cycle of code.
  graph = {
      a: {
          b
          for b in bs
          if not (PACKAGE.parent / b.replace(".", "/") / "__init__.py").exists()
      }
      for a, bs in graph.items()
  }
  state: dict[str, int] = {}
  cycles = []

  def visit(node, stack):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        cycles.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  assert not cycles, f"import cycles: {cycles}"


def test_training_loads_without_the_face_or_the_kernels():
  code = (
      "import sys\n"
      "import search_r3_jax.training.stage1, search_r3_jax.training.stage2\n"
      "import search_r3_jax.retrieval.environment, search_r3_jax.core.policy\n"
      "bad = sorted(m for m in sys.modules if m.startswith('search_r3_jax.')"
      " and (m in ('search_r3_jax.api', 'search_r3_jax.cli')"
      " or 'kernels' in m or 'quantized' in m))\n"
      "print(bad)\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      check=True,
      capture_output=True,
      text=True,
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
