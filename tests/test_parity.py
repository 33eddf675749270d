"""Numerical parity with transformers + torch (float32, CPU).

Tiny random Llama and Qwen2 checkpoints are written by transformers itself and
read back by both sides; the real SmolLM2 GGUF is dequantized by our reader on
one side and by transformers' GGUF loader on the other.
"""

from __future__ import annotations

from conftest import make_tiny_hf_dir
from flax import nnx
import jax
import numpy as np
import pytest
import torch
import transformers

from search_r3_jax import SearchR3
from search_r3_jax.core import encoding

# The tiny tokenizer knows ids < 113; `<|embed_token|>` becomes id 113, a
# spare row of the 131-row embedding that the loader resets to the mean row.
TINY_TOKENIZER_IDS = 113
# SmolLM2's own vocabulary; ours adds `<|embed_token|>` and pads to 49280.
SMOLLM2_VOCAB = 49152


def _hf_model(path) -> torch.nn.Module:
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32
  ).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory, one_device_mesh):
  """(ours, transformers') on one tiny random checkpoint."""
  d = make_tiny_hf_dir(tmp_path_factory.mktemp(request.param), request.param)
  return SearchR3.from_pretrained(str(d), mesh=one_device_mesh), _hf_model(d)


def _random_ids(shape, seed=0) -> np.ndarray:
  return (
      np.random.default_rng(seed)
      .integers(0, TINY_TOKENIZER_IDS, shape)
      .astype(np.int32)
  )


def test_tiny_logits_match_transformers(tiny):
  ours, hf = tiny
  embed_id = ours.tokenizer.embed_token_id
  assert embed_id == TINY_TOKENIZER_IDS
  ids = _random_ids((3, 17))
  got = ours.logits(ids)
  with torch.no_grad():
    want = hf(torch.from_numpy(ids).long()).logits.numpy()
  assert got.shape == want.shape == (3, 17, ours.cfg.vocab_size)
  other = np.arange(got.shape[-1]) != embed_id
  np.testing.assert_allclose(
      got[..., other], want[..., other], rtol=0, atol=1e-4
  )
  # The embed token's head column is the reset row, not the checkpoint's.
  assert np.abs(got[..., embed_id] - want[..., embed_id]).max() > 1e-4


def test_tiny_embed_row_is_mean_of_rows(tiny):
  ours, hf = tiny
  embed_id = ours.tokenizer.embed_token_id
  hf_embed = hf.get_input_embeddings().weight.detach().numpy()
  ours_embed = np.asarray(ours.model.embed[...])
  np.testing.assert_allclose(
      ours_embed[embed_id], hf_embed.mean(0), rtol=0, atol=1e-6
  )
  keep = np.arange(hf_embed.shape[0]) != embed_id
  np.testing.assert_array_equal(ours_embed[keep], hf_embed[keep])
  if not ours.cfg.tie_word_embeddings:  # the untied head column too
    hf_head = hf.get_output_embeddings().weight.detach().numpy()  # [V, D]
    ours_head = np.asarray(ours.model.lm_head[...])  # [D, V]
    np.testing.assert_allclose(
        ours_head[:, embed_id], hf_head.mean(0), rtol=0, atol=1e-6
    )


def test_tiny_right_padded_batch_matches_transformers(tiny):
  """forward_logits with lengths vs transformers with an attention mask."""
  ours, hf = tiny
  lengths = np.array([17, 11, 4], np.int32)
  ids = _random_ids((3, 17), seed=1)  # garbage ids stay in the padding
  valid = np.arange(17)[None, :] < lengths[:, None]
  graphdef, state = nnx.split(ours.model)
  with jax.set_mesh(ours.mesh):
    logits, hidden = encoding.forward_logits(graphdef, state, ids, lengths)
  logits, hidden = np.asarray(logits), np.asarray(hidden)
  with torch.no_grad():
    out = hf(
        torch.from_numpy(ids).long(),
        attention_mask=torch.from_numpy(valid.astype(np.int64)),
        output_hidden_states=True,
    )
  want_logits = out.logits.numpy()
  want_hidden = out.hidden_states[-1].numpy()  # after the final norm
  other = np.arange(logits.shape[-1]) != ours.tokenizer.embed_token_id
  np.testing.assert_allclose(
      logits[valid][:, other], want_logits[valid][:, other], rtol=0, atol=1e-4
  )
  np.testing.assert_allclose(
      hidden[valid], want_hidden[valid], rtol=0, atol=1e-4
  )
  # A shorter row's valid part equals the same ids run alone, unpadded.
  alone = ours.logits(ids[1:2, : lengths[1]])
  np.testing.assert_allclose(
      logits[1, : lengths[1]], alone[0], rtol=0, atol=1e-5
  )


# ------------------------------------------------------------ real SmolLM2


@pytest.fixture(scope="module")
def smollm2(one_device_mesh):
  return SearchR3.from_pretrained("smollm2-135m", mesh=one_device_mesh)


@pytest.fixture(scope="module")
def torch_smollm2():
  from search_r3_jax.benchmarks.torch_ref import load_torch_gguf

  return load_torch_gguf()


def _chat_batch(m: SearchR3) -> np.ndarray:
  """Two realistic chat prompts cut to a common length (no padding)."""
  rows = [
      m.chat_prompt(
          "What is the capital of France, and which river flows "
          "through it? Answer in two short sentences."
      ),
      m.chat_prompt(
          [
              {"role": "system", "content": "You are a helpful librarian."},
              {
                  "role": "user",
                  "content": "Who wrote the tragedy Hamlet, in "
                  "which year was it first performed, "
                  "and where is it set? Please keep "
                  "your answer brief.",
              },
          ]
      ),
  ]
  t = min(len(r) for r in rows)
  assert 40 <= t <= 60, t
  return np.array([r[:t] for r in rows], np.int32)


def test_smollm2_logits_match_transformers(smollm2, torch_smollm2):
  ids = _chat_batch(smollm2)
  got = smollm2.logits(ids)
  with torch.no_grad():
    want = torch_smollm2(torch.from_numpy(ids).long()).logits.numpy()
  assert want.shape[-1] == SMOLLM2_VOCAB
  assert got.shape == ids.shape + (smollm2.cfg.vocab_size,)
  got = got[..., :SMOLLM2_VOCAB]
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-4)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_sharded_safetensors_load_like_one_file(
    tiny, tmp_path, one_device_mesh
):
  """A checkpoint split into several *.safetensors with an index loads to
  the same model as the single file."""
  ours, hf = tiny
  hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
  shards = sorted(tmp_path.glob("*.safetensors"))
  assert len(shards) > 1
  assert (tmp_path / "model.safetensors.index.json").exists()
  from conftest import write_word_tokenizer

  write_word_tokenizer(tmp_path, TINY_TOKENIZER_IDS)
  split = SearchR3.from_pretrained(str(tmp_path), mesh=one_device_mesh)
  ids = _random_ids((2, 11), seed=3)
  np.testing.assert_array_equal(split.logits(ids), ours.logits(ids))


def test_hf_tensors_give_back_the_checkpoint(tiny):
  """`convert.hf_tensors` (what the rl_step benchmark hands transformers)
  undoes the loader's layout: every tensor equals transformers' own, the
  embed token's reset row aside."""
  from search_r3_jax.core.weights import convert

  ours, hf = tiny
  got = convert.hf_tensors(ours.model)
  want = {
      k: v.numpy()
      for k, v in hf.state_dict().items()
      if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)
  }
  assert sorted(got) == sorted(want)
  embed_id = ours.tokenizer.embed_token_id
  for name, w in want.items():
    g = got[name]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
      g, w = np.delete(g, embed_id, 0), np.delete(w, embed_id, 0)
    np.testing.assert_array_equal(g, w, err_msg=name)
