"""The export program (search_r3_jax/export.py): the folder it writes loads
in transformers (torch, CPU) with the same logits, embed-token id and
embeddings as this project, loads back through `SearchR3.from_pretrained`,
and its README's snippet embeds like `encode_queries`; a non-empty target
is refused and a failed export leaves nothing that looks complete."""

import functools
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from search_r3_jax import SearchR3
from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.weights import hf_write
from search_r3_jax.export import export

export_ = export

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["who wrote the iliad", "capital city of Japan"]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """Two stage-1 steps of configs/sft.py:tiny (random 2-layer model,
  SmolLM2's tokenizer with the embed token's row trained)."""
  workdir = tmp_path_factory.mktemp("trained")
  subprocess.run(
      [
          sys.executable,
          "-m",
          "search_r3_jax.train",
          f"--config={ROOT / 'configs' / 'sft.py'}:tiny",
          f"--workdir={workdir}",
          "--config.total_steps=2",
          "--config.checkpoint_every=2",
          "--config.eval_every=100",
          "--config.eval.at_start=False",
          "--config.optimizer.warmup_steps=1",
      ],
      cwd=ROOT,
      env=dict(os.environ, XLA_FLAGS=""),
      check=True,
      capture_output=True,
      timeout=600,
  )
  return workdir


def _hf(path):
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32
  ).eval()
  return tok, model


def _embed_at_token(hf_model, rows, embed_id):
  """transformers' final hidden state at each row's embed token."""
  out = []
  for ids in rows:
    assert ids[-1] == embed_id
    with torch.no_grad():
      h = hf_model(torch.tensor([ids]), output_hidden_states=True)
    v = h.hidden_states[-1][0, -1].numpy()
    out.append(v / np.linalg.norm(v))
  return np.stack(out)


def _readme_embed(folder):
  """The `embed` function of the exported README's snippet, run as given
  (its last lines, which print an example, are run too)."""
  text = (folder / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  code = code.replace('DIR = "."', f"DIR = {str(folder)!r}")
  scope = {}
  exec(compile(code, str(folder / "README.md"), "exec"), scope)
  return scope["embed"]


def _check_parity(ours, folder, atol):
  tok, hf_model = _hf(folder)
  embed_id = ours.tokenizer.embed_token_id
  assert tok.convert_tokens_to_ids(EMBED_TOKEN) == embed_id
  assert EMBED_TOKEN in tok.all_special_tokens
  rows = [
      ours.tokenizer.embedding_prompt(ours.prompts, "query", t) for t in TEXTS
  ]
  # The folder's tokenizer reads a prompt as this project does.
  for t, ids in zip(TEXTS, rows):
    text = ours.tokenizer.decode(ids, skip_special_tokens=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
  ids = np.asarray(rows[0])[None]
  got = ours.logits(ids)
  with torch.no_grad():
    want = hf_model(torch.from_numpy(ids).long()).logits.numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  mine = ours.encode_queries(TEXTS, progress=False)
  theirs = _embed_at_token(hf_model, rows, embed_id)
  np.testing.assert_allclose(mine, theirs, rtol=0, atol=atol)
  readme = _readme_embed(folder)(TEXTS, "query").numpy()
  np.testing.assert_allclose(mine, readme, rtol=0, atol=atol)
  return mine


def test_trained_workdir_exports_to_transformers(
    trained_workdir, tmp_path, one_device_mesh
):
  out = export(str(trained_workdir), str(tmp_path / "hf"), mesh=one_device_mesh)
  names = {p.name for p in out.iterdir()}
  assert {
      "config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
      "special_tokens_map.json",
      "chat_template.jinja",
      "generation_config.json",
      "search_r3.json",
      "README.md",
  } <= names
  ours = SearchR3.from_pretrained(str(trained_workdir), mesh=one_device_mesh)
  mine = _check_parity(ours, out, atol=1e-4)
  back = SearchR3.from_pretrained(str(out), mesh=one_device_mesh)
  np.testing.assert_allclose(
      back.encode_queries(TEXTS, progress=False), mine, rtol=0, atol=1e-5
  )


def test_real_smollm2_exports_to_transformers(tmp_path, one_device_mesh):
  out = export("smollm2-135m", str(tmp_path / "smollm2"), mesh=one_device_mesh)
  ours = SearchR3.from_pretrained(
      "smollm2-135m", mesh=one_device_mesh, cpu_kernels=False
  )
  _check_parity(ours, out, atol=1e-4)


def test_export_refuses_a_non_empty_target_and_leaves_no_partial_folder(
    trained_workdir, tmp_path, monkeypatch, one_device_mesh
):
  export = functools.partial(export_, mesh=one_device_mesh)
  target = tmp_path / "taken"
  target.mkdir()
  (target / "notes.txt").write_text("mine")
  with pytest.raises(hf_write.ExportError, match="taken.*not empty"):
    export(str(trained_workdir), str(target))
  assert (target / "notes.txt").read_text() == "mine"

  # A write that fails midway leaves neither the target nor a temporary
  # folder behind.
  def broken(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(hf_write, "save_file", broken)
  fresh = tmp_path / "fresh"
  with pytest.raises(OSError, match="No space"):
    export(str(trained_workdir), str(fresh))
  assert not fresh.exists()
  assert [p.name for p in tmp_path.iterdir()] == ["taken"]
  # ... and an overwrite that fails keeps the old folder as it was.
  with pytest.raises(OSError, match="No space"):
    export(str(trained_workdir), str(target), overwrite=True)
  assert (target / "notes.txt").read_text() == "mine"
  monkeypatch.undo()
  export(str(trained_workdir), str(target), overwrite=True)
  assert not (target / "notes.txt").exists()
  assert (target / "model.safetensors").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
