"""launch/colab_tpu.ipynb: committed without outputs, every size's overrides
are settings the programs accept, and the notebook runs top to bottom on
the CPU with the tiny sizes (executed with nbclient, failing on any cell
error)."""

import ast
import json
import pathlib
import re

from absl import flags
from ml_collections import config_flags
import nbclient
import nbformat
import pytest

from search_r3_jax import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
PROGRAM_KIND = {"stage1": "train", "stage2": "train", "eval": "eval"}


def _read():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def _sizes(nb) -> dict:
  """The SIZES dict of the notebook's sizes cell, read as a literal."""
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    for node in ast.parse(cell.source).body:
      if isinstance(node, ast.Assign) and any(
          getattr(t, "id", None) == "SIZES" for t in node.targets
      ):
        return ast.literal_eval(node.value)
  raise AssertionError("the notebook has no SIZES cell")


def _parse(argv) -> flags.FlagValues:
  """argv parsed as the programs parse theirs: a config file and its
  `--config.field=value` overrides."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv


def test_the_notebook_is_committed_without_outputs():
  nb = _read()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for i, cell in enumerate(code):
    assert cell.outputs == [], f"code cell {i} has outputs"
    assert cell.execution_count is None, f"code cell {i} was executed"


def test_every_size_is_a_set_of_settings_the_programs_accept():
  sizes = _sizes(_read())
  assert set(sizes) == {"tiny", "cpu", "tpu"}
  for size, programs in sizes.items():
    assert set(programs) == set(PROGRAM_KIND), size
    for program, args in programs.items():
      path = args[0].removeprefix("--config=")
      assert args[0].startswith("--config=") and (ROOT / path.split(":")[0])
      fv = _parse(["notebook", f"--config={ROOT / path}", *args[1:]])
      # Raises SettingsError naming the field for an unknown or bad one.
      # One device: a CPU runtime, or Colab's one TPU chip.
      config_check.check_config(
          fv.config, PROGRAM_KIND[program], num_devices=1, num_processes=1
      )


def test_a_size_override_with_a_misspelt_field_is_caught():
  """The check above can fail: a field that no config has is refused."""
  with pytest.raises(Exception, match="total_step"):
    fv = _parse(
        [
            "notebook",
            f"--config={ROOT / 'configs' / 'sft.py'}",
            "--config.total_step=3",
        ]
    )
    config_check.check_config(fv.config, "train", num_devices=1)


def _text(cell) -> str:
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("display_data", "execute_result"):
      parts.append(out.data.get("text/markdown", ""))
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def test_the_notebook_runs_top_to_bottom_with_the_tiny_sizes(
    tmp_path, monkeypatch
):
  runs = tmp_path / "runs"
  # The kernel, and the programs it starts, inherit this environment: one
  # CPU device each, as on a CPU runtime.
  monkeypatch.setenv("SEARCH_R3_NOTEBOOK_SIZE", "tiny")
  monkeypatch.setenv("SEARCH_R3_NOTEBOOK_WORKDIR", str(runs))
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = _read()
  client = nbclient.NotebookClient(
      nb,
      timeout=1200,
      kernel_name="python3",
      resources={"metadata": {"path": str(ROOT / "launch")}},
  )
  client.execute()  # raises CellExecutionError on any cell's error
  text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert "nothing to install" in text  # the checkout has every requirement
  assert "size tiny" in text
  for name in ("stage1", "stage2"):
    assert (runs / name / "metrics.jsonl").is_file()
    assert list((runs / name / "plots").glob("*.png"))
  for name in ("eval-stage1", "eval-stage2"):
    results = json.loads((runs / name / "results.json").read_text())
    assert set(results["rows"]) == {"reasoning off", "reasoning on", "BM25"}
    assert (runs / name / "results.png").is_file()
  assert (runs / "export" / "config.json").is_file()
  assert list((runs / "export").glob("*.safetensors"))
  # The table shows both models' rows, and the plots were displayed.
  assert "| stage 1 | reasoning on |" in text
  assert "| stage 2 | reasoning off |" in text
  images = [
      o
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.outputs
      if o.output_type == "display_data" and "image/png" in o.data
  ]
  assert len(images) >= 3
  # Search answered both queries with three hits, with the analysis shown.
  assert text.count("  1. ") == 4 and text.count("  3. ") == 4
  assert "emitted the token itself:" in text
  # The export embeds like the workdir it came from.
  diff = re.search(r"export's embeddings: ([0-9.e+-]+)", text)
  assert diff is not None and float(diff.group(1)) < 1e-4
