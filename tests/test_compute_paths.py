"""The model's compute switches against their references: attention through
`jax.nn.dot_product_attention` against the einsum path (logits and
gradients, with padding, grouped-query heads and the KV cache),
rematerialisation against none, and log-probabilities from chunked logits
against the whole-sequence ones."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search_r3_jax import config_check
from search_r3_jax.core import encoding
from search_r3_jax.core.config import ConfigError
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.model import KVCache
from search_r3_jax.training import grpo

# Prime sizes, grouped-query attention (4 query heads on 2 kv heads), Qwen2
# biases, an untied head.
CFG = ModelConfig(
    arch="qwen2",
    vocab_size=131,
    hidden_size=44,
    intermediate_size=67,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
    attention_bias=True,
    tie_word_embeddings=False,
)
B, T = 3, 13


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 131, (B, T)))
  # Row 0 full, row 1 left-padded by 4 (fully masked query rows), row 2
  # right-padded after 7 tokens.
  valid = np.ones((B, T), bool)
  valid[1, :4] = False
  valid[2, 7:] = False
  pos = np.broadcast_to(np.arange(T), (B, T)).copy()
  pos[1] = np.maximum(np.arange(T) - 4, 0)
  weights = jnp.asarray(rng.normal(size=(B, T, 131)), jnp.float32)
  return tokens, jnp.asarray(pos), jnp.asarray(valid), weights


def _split(cfg, seed=1):
  """graphdef of a model with `cfg`, and the parameters of seed `seed`
  (the same for every cfg that differs only in how it computes)."""
  graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, state


def _loss_and_grads(graphdef, state, batch):
  tokens, pos, valid, weights = batch

  def loss(state):
    logits, hidden, _ = nnx.merge(graphdef, state)(tokens, pos, valid)
    keep = valid[..., None]
    return jnp.sum(jnp.where(keep, logits * weights, 0.0)) + jnp.sum(
        jnp.where(keep, hidden, 0.0) ** 2
    )

  return jax.jit(jax.value_and_grad(loss))(state)


def _logits(graphdef, state, batch):
  tokens, pos, valid, _ = batch
  return nnx.merge(graphdef, state)(tokens, pos, valid)[0]


def _assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol)


@pytest.mark.parametrize("scan", [True, False])
def test_dot_product_attention_equals_einsum(batch, scan):
  ref_def, state = _split(CFG.replace(scan_layers=scan))
  dpa_def, _ = _split(CFG.replace(attention="dot_product", scan_layers=scan))
  want = np.asarray(_logits(ref_def, state, batch))
  got = np.asarray(_logits(dpa_def, state, batch))
  valid = np.asarray(batch[2])
  # Real positions match; a fully masked (left-padding) query row is
  # finite on both paths.
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
  assert np.isfinite(got).all() and np.isfinite(want).all()
  loss_ref, g_ref = _loss_and_grads(ref_def, state, batch)
  loss_dpa, g_dpa = _loss_and_grads(dpa_def, state, batch)
  np.testing.assert_allclose(float(loss_dpa), float(loss_ref), rtol=1e-5)
  _assert_trees_close(g_dpa, g_ref, rtol=1e-4, atol=1e-5)


def test_dot_product_decode_with_the_kv_cache_equals_einsum():
  """Prefill 6 tokens (row 1 left-padded by 2), then decode 4 one at a
  time: every step's logits agree across the two attention paths."""
  rng = np.random.default_rng(3)
  prompt = jnp.asarray(rng.integers(0, 131, (2, 6)))
  steps = rng.integers(0, 131, (4, 2))
  size = 10
  valid = np.ones((2, size), bool)
  valid[1, :2] = False
  valid = jnp.asarray(valid)
  pos0 = jnp.asarray([np.arange(6), np.maximum(np.arange(6) - 2, 0)])
  outs = {}
  for impl in ("einsum", "dot_product"):
    model = Decoder(CFG.replace(attention=impl), rngs=nnx.Rngs(4))
    cache = KVCache.zeros(model.cfg, 2, size)
    logits, _, cache = model(prompt, pos0, valid, cache=cache, cache_index=0)
    seen = [np.asarray(logits[:, -1])]
    for i, tok in enumerate(steps):
      pos = pos0[:, -1:] + 1 + i
      logits, _, cache = model(
          jnp.asarray(tok)[:, None], pos, valid, cache=cache, cache_index=6 + i
      )
      seen.append(np.asarray(logits[:, 0]))
    outs[impl] = np.stack(seen)
  np.testing.assert_allclose(
      outs["dot_product"], outs["einsum"], rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
    "remat,scan", [("full", True), ("dots_saveable", False)]
)
def test_remat_changes_no_loss_or_gradient(batch, remat, scan):
  ref_def, state = _split(CFG.replace(scan_layers=scan))
  remat_def, _ = _split(CFG.replace(remat=remat, scan_layers=scan))
  loss_ref, g_ref = _loss_and_grads(ref_def, state, batch)
  loss, g = _loss_and_grads(remat_def, state, batch)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
  _assert_trees_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_equal_the_whole_sequence(batch):
  """At temperature 0.7 over the first 120 columns: the values and the
  parameters' gradients of a weighted sum are those of the plain
  computation, for a chunk dividing T-1 (12) or not (5), and one longer
  than the sequence (40)."""
  tokens, pos, valid, _ = batch
  graphdef, state = _split(CFG)
  weights = jnp.asarray(
      np.random.default_rng(5).normal(size=(B, T - 1)), jnp.float32
  )

  def logp(state, chunk):
    model = nnx.merge(graphdef, state)
    _, hidden, _ = model(tokens, pos, valid, return_logits=False)
    return encoding.hidden_logprobs(model, hidden, tokens, 0.7, 120, chunk)

  def value_and_grad(chunk):
    return jax.jit(
        jax.value_and_grad(lambda s: jnp.sum(logp(s, chunk) * weights))
    )(state)

  plain = jax.jit(lambda s: logp(s, 0))(state)
  model = nnx.merge(graphdef, state)
  logits = model(tokens, pos, valid)[0]
  np.testing.assert_allclose(
      np.asarray(plain),
      np.asarray(encoding.token_logprobs(logits, tokens, 0.7, 120)),
      rtol=1e-6,
      atol=1e-6,
  )
  want, want_grad = value_and_grad(0)
  for chunk in (5, 12, 40):
    got = jax.jit(lambda s: logp(s, chunk))(state)
    assert got.shape == (B, T - 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=1e-5)
    value, grad = value_and_grad(chunk)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    _assert_trees_close(grad, want_grad, 1e-4, 1e-5)


def test_policy_outputs_with_chunked_logprobs():
  rng = np.random.default_rng(6)
  graphdef, state = _split(CFG)
  tokens = jnp.asarray(rng.integers(0, 131, (4, 11)))
  lengths = jnp.asarray([11, 9, 6, 3])
  pos = lengths - 1
  kw = dict(temperature=0.7, valid_vocab=120)
  want_lp, want_emb = grpo.policy_outputs(
      graphdef, state, tokens, lengths, pos, **kw
  )
  got_lp, got_emb = grpo.policy_outputs(
      graphdef, state, tokens, lengths, pos, logprob_chunk=4, **kw
  )
  np.testing.assert_allclose(np.asarray(got_lp), np.asarray(want_lp), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_emb), np.asarray(want_emb))


def test_unknown_switches_are_refused_by_name():
  with pytest.raises(ConfigError, match="attention='flash'"):
    CFG.replace(attention="flash")
  with pytest.raises(ConfigError, match="remat='some'"):
    CFG.replace(remat="some")
  from conftest import load_config

  cfg = load_config("rl", "tiny")
  cfg.attention, cfg.remat, cfg.rl.logprob_chunk = "flash", "some", -1
  with pytest.raises(config_check.SettingsError) as e:
    config_check.check_config(cfg, "train")
  text = str(e.value)
  assert "attention" in text and "remat" in text and "rl.logprob_chunk" in text
