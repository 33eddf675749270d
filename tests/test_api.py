"""The `SearchR3` API: query and document encoders, the embed token and the
chat template, and clear errors for bad models and bad inputs."""

from __future__ import annotations

import json
import re
import shutil

from flax import nnx
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from search_r3_jax import SearchR3
from search_r3_jax.core import encoding
from search_r3_jax.core.config import ConfigError
from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.weights.common import WeightsError
from search_r3_jax.core.weights.gguf import find_smollm2_gguf

TINY_QUERIES = [
    "who is the capital of france",
    "rome",
    "where is the river in berlin city",
    "what query a an",
]
TINY_DOCS = [
    "paris is the capital of france and a city on a river",
    "berlin",
    "rome is a city in what embedding search",
    "the document on the river",
]
QUERIES = [
    "who wrote hamlet",
    "capital of france",
    "how do plants turn sunlight into sugar through photosynthesis",
    "tallest mountain",
]
DOCS = [
    "Hamlet is a tragedy written by William Shakespeare around 1600.",
    "Paris is the capital and largest city of France.",
    "Photosynthesis is the process by which plants use light energy to "
    "make glucose from carbon dioxide and water.",
    "Mount Everest is Earth's highest mountain above sea level.",
]


# ------------------------------------------------------------------ encoders


def _by_hand(m: SearchR3, kind: str, texts) -> np.ndarray:
  """L2-normalized final hidden state at the embed token, one text at a
  time, from `forward_logits` on the prompt ids."""
  graphdef, state = nnx.split(m.model)
  out = []
  for t in texts:
    ids = m.tokenizer.embedding_prompt(m.prompts, kind, t)
    assert ids[-1] == m.tokenizer.embed_token_id
    with jax.set_mesh(m.mesh):
      _, hidden = encoding.forward_logits(
          graphdef,
          state,
          np.array([ids], np.int32),
          np.array([len(ids)], np.int32),
      )
    h = np.asarray(hidden)[0, -1]
    out.append(h / np.linalg.norm(h))
  return np.stack(out)


def _check_encoder(m: SearchR3, kind: str, texts, atol: float):
  encode = m.encode_queries if kind == "query" else m.encode_documents
  emb = encode(texts, progress=False)
  assert isinstance(emb, np.ndarray)
  assert emb.dtype == np.float32
  assert emb.shape == (len(texts), m.cfg.hidden_size)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  # Distinct texts give distinct vectors.
  cos = emb @ emb.T
  assert (cos[~np.eye(len(texts), dtype=bool)] < 0.99999).all()
  # Order preserved (the encoder sorts by length inside).
  rev = encode(texts[::-1], progress=False)
  np.testing.assert_allclose(rev[::-1], emb, rtol=0, atol=atol)
  # Batching invariance.
  one = encode(texts, batch_size=1, progress=False)
  np.testing.assert_allclose(one, emb, rtol=0, atol=atol)
  # The definition: the normalized hidden state at the embed token.
  np.testing.assert_allclose(emb, _by_hand(m, kind, texts), rtol=0, atol=atol)
  return emb


@pytest.mark.parametrize("kind", ["query", "document"])
def test_tiny_encoders(tiny, kind):
  texts = TINY_QUERIES if kind == "query" else TINY_DOCS
  _check_encoder(tiny, kind, texts, atol=1e-5)


@pytest.mark.parametrize("kind", ["query", "document"])
def test_smollm2_encoders(smollm2, kind):
  texts = QUERIES if kind == "query" else DOCS
  _check_encoder(smollm2, kind, texts, atol=1e-5)


def test_smollm2_queries_and_documents_use_different_prompts(smollm2):
  q = smollm2.encode_queries(QUERIES[:2], progress=False)
  d = smollm2.encode_documents(QUERIES[:2], progress=False)
  assert np.abs(q - d).max() > 1e-3


def test_smollm2_reasoning_queries(smollm2):
  emb, analyses = smollm2.encode_queries(
      QUERIES[:3],
      reasoning=True,
      max_new_tokens=24,
      return_reasoning=True,
      progress=False,
  )
  assert emb.shape == (3, smollm2.cfg.hidden_size)
  assert emb.dtype == np.float32
  assert np.isfinite(emb).all()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  assert isinstance(analyses, list) and len(analyses) == 3
  assert all(isinstance(a, str) and a.strip() for a in analyses), analyses
  _, details = smollm2.encode_queries(
      QUERIES[:3],
      reasoning=True,
      max_new_tokens=24,
      return_details=True,
      progress=False,
  )
  assert [d.analysis for d in details] == analyses
  # The base model does not write the new token: every query was ended
  # with the suffix, and the flag says so (the decoded text cannot: the
  # token is a special one, dropped by decoding).
  assert [d.emitted for d in details] == [False] * 3
  plain = smollm2.encode_queries(QUERIES[:3], progress=False)
  assert np.abs(emb - plain).max() > 1e-3
  again = smollm2.encode_queries(
      QUERIES[:3], reasoning=True, max_new_tokens=24, progress=False
  )
  np.testing.assert_allclose(again, emb, rtol=0, atol=1e-6)


# --------------------------------------------------- embed token and prompts


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_embed_token_is_one_special_id(request, which):
  m = request.getfixturevalue(which)
  tok = m.tokenizer
  want = {"tiny": 113, "smollm2": 49152}[which]
  assert tok.embed_token_id == want
  assert tok.vocab_size == want + 1 <= m.cfg.vocab_size
  assert tok.encode(EMBED_TOKEN) == [want]
  ids = tok.encode("The embedding is " + EMBED_TOKEN + ".")
  assert ids.count(want) == 1
  assert tok.decode([want], skip_special_tokens=False) == EMBED_TOKEN
  assert tok.decode([want]) == ""  # special: hidden from decoded text
  assert want not in tok.eos_ids and want != tok.pad_id


def test_smollm2_chat_template_applied(smollm2):
  tok = smollm2.tokenizer
  q = tok.embedding_prompt(smollm2.prompts, "query", "who wrote hamlet")
  text = tok.decode(q, skip_special_tokens=False)
  assert "Please represent user queries." in text
  assert "<|im_start|>assistant" in text
  assert "who wrote hamlet" in text
  assert text.endswith("The embedding is " + EMBED_TOKEN)
  assert q[-1] == tok.embed_token_id and q.count(tok.embed_token_id) == 1
  d = tok.decode(
      tok.embedding_prompt(smollm2.prompts, "document", "Paris."),
      skip_special_tokens=False,
  )
  assert "Please represent documents." in d
  r = tok.embedding_prompt(
      smollm2.prompts, "query", "who wrote hamlet", reasoning=True
  )
  assert tok.decode(r, skip_special_tokens=False).endswith(
      "<|im_start|>assistant\n"
  )
  # Truncation cuts the text, never the template around it.
  cut = tok.embedding_prompt(
      smollm2.prompts, "document", DOCS[2], max_text_tokens=3
  )
  assert cut[-1] == tok.embed_token_id
  assert len(tok.encode(DOCS[2])) - 3 == len(
      tok.embedding_prompt(smollm2.prompts, "document", DOCS[2])
  ) - len(cut)


def test_tiny_chat_template_applied(tiny):
  tok = tiny.tokenizer
  ids = tok.embedding_prompt(tiny.prompts, "query", "paris")
  im_start = tok.tok.token_to_id("<|im_start|>")
  assert ids.count(im_start) == 3  # system, user, assistant turns
  assert ids[-1] == tok.embed_token_id
  assert tok.tok.token_to_id("paris") in ids


# ------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
  for p in (tmp_path / "nope", tmp_path / "nope.gguf"):
    with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
      SearchR3.from_pretrained(str(p))


def test_truncated_gguf(tmp_path):
  f = tmp_path / "cut.gguf"
  with open(find_smollm2_gguf(), "rb") as src:
    f.write_bytes(src.read(2 << 20))
  with pytest.raises(
      WeightsError, match=re.escape(str(f)) + ".*truncated or corrupt"
  ):
    SearchR3.from_pretrained(str(f))


def test_directory_without_config(tmp_path, tiny_dir):
  d = tmp_path / "no_config"
  shutil.copytree(tiny_dir, d)
  (d / "config.json").unlink()
  with pytest.raises(
      FileNotFoundError, match=re.escape(str(d)) + ".*config.json"
  ):
    SearchR3.from_pretrained(str(d))


def test_unknown_preset():
  with pytest.raises(
      WeightsError, match=r"unknown preset 'no-such-model'.*smollm2-135m"
  ):
    SearchR3.from_pretrained("no-such-model")


def _edited_copy(tmp_path, tiny_dir, edit) -> str:
  d = tmp_path / "edited"
  shutil.copytree(tiny_dir, d)
  cfg = json.loads((d / "config.json").read_text())
  edit(cfg)
  (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


def test_unknown_architecture(tmp_path, tiny_dir):
  d = _edited_copy(
      tmp_path, tiny_dir, lambda c: c.update(model_type="gpt_neox")
  )
  with pytest.raises(
      ConfigError, match=re.escape(d) + ".*model_type='gpt_neox'"
  ):
    SearchR3.from_pretrained(d)


def test_config_missing_field(tmp_path, tiny_dir):
  d = _edited_copy(tmp_path, tiny_dir, lambda c: c.pop("hidden_size"))
  with pytest.raises(ConfigError, match=re.escape(d) + ".*'hidden_size'"):
    SearchR3.from_pretrained(d)


def test_safetensors_missing_tensor(tmp_path, tiny_dir):
  d = tmp_path / "missing_tensor"
  shutil.copytree(tiny_dir, d)
  tensors = load_file(str(d / "model.safetensors"))
  name = "model.layers.1.mlp.up_proj.weight"
  del tensors[name]
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(
      WeightsError,
      match=re.escape(str(d)) + ".*" + re.escape(repr(name)) + " is missing",
  ):
    SearchR3.from_pretrained(str(d))


def test_logits_needs_2d_ints(tiny):
  for bad in (
      np.zeros((5,), np.int32),
      np.zeros((1, 2, 3), np.int32),
      np.zeros((1, 4), np.float32),
  ):
    with pytest.raises(ValueError, match=r"\[B, T\] integer array"):
      tiny.logits(bad)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 131\)"):
    tiny.logits(np.array([[1, 131]]))


def test_encode_documents_empty_string(tiny):
  with pytest.raises(ValueError, match=r"documents\[1\] is empty"):
    tiny.encode_documents(["paris", "  "], progress=False)
  with pytest.raises(TypeError, match="list of documents"):
    tiny.encode_documents("paris", progress=False)


def test_generate_bare_string(tiny):
  with pytest.raises(TypeError, match="list of texts"):
    tiny.generate("the capital of france is")


def test_encoding_and_logits_make_no_hidden_transfers(tiny):
  tiny.encode_documents(["the city", "a river"])  # compile outside the guard
  tiny.logits(np.array([[5, 6, 7]]))
  with jax.transfer_guard("disallow"):
    emb = tiny.encode_documents(["the city", "a river"])
    logits = tiny.logits(np.array([[5, 6, 7]]))
  assert emb.shape == (2, tiny.cfg.hidden_size)
  assert logits.shape == (1, 3, tiny.cfg.vocab_size)


def test_qwen_preset_needs_a_directory(monkeypatch):
  monkeypatch.delenv("SEARCH_R3_QWEN2_5_1_5B_DIR", raising=False)
  with pytest.raises(
      WeightsError, match="model_dir=.*SEARCH_R3_QWEN2_5_1_5B_DIR"
  ):
    SearchR3.from_pretrained("qwen2.5-1.5b-instruct")


def test_qwen_preset_rejects_another_model(tiny_dir, monkeypatch):
  """A directory that is not Qwen2.5-1.5B is refused, naming what differs."""
  monkeypatch.setenv("SEARCH_R3_QWEN2_5_1_5B_DIR", str(tiny_dir))
  with pytest.raises(
      WeightsError,
      match=re.escape(str(tiny_dir))
      + ".*is not qwen2.5-1.5b-instruct.*hidden_size",
  ):
    SearchR3.from_pretrained("qwen2.5-1.5b-instruct")


def test_facade_and_policy_are_one_code_path(tiny):
  """`SearchR3` answers through a `Policy` of its model; a policy made from
  other parameters (as training makes one) gives the same as a facade over
  it."""
  import jax

  from search_r3_jax import SearchR3
  from search_r3_jax.core.policy import Policy

  assert SearchR3.encode_queries.__doc__ == Policy.encode_queries.__doc__
  policy = tiny.policy
  texts = ["paris is a city", "the river in rome"]
  np.testing.assert_array_equal(
      policy.encode_documents(texts), tiny.encode_documents(texts)
  )
  scaled = policy.with_params(jax.tree.map(lambda x: x * 1.5, policy.params))
  assert scaled.quantized is None
  other = SearchR3.from_policy(scaled)
  np.testing.assert_allclose(
      other.encode_documents(texts), scaled.encode_documents(texts), atol=1e-6
  )
  assert not np.allclose(
      scaled.encode_documents(texts), policy.encode_documents(texts), atol=1e-3
  )


def test_policy_logprobs_follow_the_sampling_temperature(tiny):
  """log-probabilities under softmax(logits / T) over the tokenizer's ids
  (what the sampler draws from; the embedding's padding rows are never
  drawn), checked against the logits themselves, for T = 1 and T = 0.7."""
  ids = np.array([[5, 9, 17, 3, 22], [7, 7, 30, 2, 11]], np.int32)
  assert tiny.tokenizer.vocab_size < tiny.cfg.vocab_size
  logits = tiny.logits(ids).astype(np.float64)[..., : tiny.tokenizer.vocab_size]
  for temperature in (1.0, 0.7):
    z = logits[:, :-1] / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    got = tiny.logprobs(
        ids, np.full((2,), 5, np.int32), temperature=temperature
    )
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_reasoning_queries_report_whether_the_token_was_emitted(
    tiny, monkeypatch
):
  """Row 0's analysis ends with the embed token (its embedding is the hidden
  state there), row 1's with the end of turn (the suffix is appended): the
  details say which, and the embeddings follow."""
  from search_r3_jax.core import decoding
  from search_r3_jax.core.policy import Policy

  tok = tiny.tokenizer
  words = tok.encode("paris city")
  hidden = np.zeros((2, tiny.cfg.hidden_size), np.float32)
  hidden[0, 0] = 3.0
  calls = []

  def fake_generate_ids(self, prompts, **kw):
    calls.append(kw)
    tokens = np.full((2, 4), tok.pad_id, np.int32)
    tokens[0, :3] = words[:2] + [tok.embed_token_id]
    tokens[1, :3] = words[:2] + [tok.eos_ids[0]]
    return decoding.Generation(
        tokens,
        np.zeros((2, 4), np.float32),
        np.array([3, 3]),
        np.array([True, True]),
        hidden,
    )

  monkeypatch.setattr(Policy, "generate_ids", fake_generate_ids)
  emb, details = tiny.encode_queries(
      ["who", "what"], reasoning=True, return_details=True, progress=False
  )
  assert [d.emitted for d in details] == [True, False]
  assert details[0].analysis == details[1].analysis == tok.decode(words[:2])
  np.testing.assert_allclose(emb[0], hidden[0] / 3.0)
  assert calls and tok.embed_token_id in calls[0]["stop_ids"]
  assert np.abs(emb[1] - emb[0]).max() > 0.1  # from the appended suffix
  np.testing.assert_allclose(np.linalg.norm(emb[1]), 1.0, atol=1e-5)
