"""The GRPO update on a tiny prime-sized model: its loss by hand at the
first inner epoch, one device against eight, and that it moves the policy
toward rollouts with positive advantage."""

from conftest import make_tiny_hf_dir
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from search_r3_jax import SearchR3
from search_r3_jax.training import grpo
from search_r3_jax.training import train_state as ts

N, T, K = 8, 23, 3
CFG = {"clip_eps": 0.2, "beta": 0.01, "aux_weight": 0.1, "tau": 0.05}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return make_tiny_hf_dir(tmp_path_factory.mktemp("grpo"), "llama")


def _opt(lr=3e-3):
  return ml_collections.ConfigDict(
      dict(
          learning_rate=lr,
          warmup_steps=1,
          total_steps=100,
          weight_decay=0.0,
          b1=0.9,
          b2=0.95,
          clip_norm=1.0,
          grad_accum_steps=1,
      )
  )


def _setup(tiny_dir, mesh, cfg=CFG, lr=3e-3):
  m = SearchR3.from_pretrained(str(tiny_dir), mesh=mesh)
  tx, schedule = ts.make_optimizer(_opt(lr))
  graphdef, state, shardings = ts.create_train_state(m.model, tx, mesh)
  step, batch_sh = grpo.make_grpo_step(
      graphdef, tx, schedule, cfg, mesh, shardings, batch_size=N
  )
  return m, graphdef, state, step, batch_sh


def _host_batch(m, graphdef, params, seed=0):
  """Random rollouts: a 6-token prompt, a response of 5..14 tokens ending in
  the embed token; old_logp from the current parameters (first epoch)."""
  rng = np.random.default_rng(seed)
  vocab = m.tokenizer.vocab_size
  tokens = np.full((N, T), m.tokenizer.pad_id, np.int32)
  lengths = np.zeros(N, np.int32)
  mask = np.zeros((N, T), np.float32)
  embed_pos = np.zeros(N, np.int32)
  for i in range(N):
    n = 6 + int(rng.integers(5, 15))
    tokens[i, : n - 1] = rng.integers(3, vocab - 1, n - 1)
    tokens[i, n - 1] = m.tokenizer.embed_token_id
    lengths[i], embed_pos[i] = n, n - 1
    mask[i, 6:n] = 1.0
  old = np.asarray(
      grpo.logprobs(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths))
  )
  adv = rng.standard_normal(N).astype(np.float32)
  docs = rng.standard_normal((N, K, m.cfg.hidden_size)).astype(np.float32)
  return dict(
      tokens=tokens,
      targets=tokens,
      lengths=lengths,
      mask=mask,
      old_logp=old,
      advantages=adv,
      embed_pos=embed_pos,
      docs=docs,
  )


def _put(host, batch_sh):
  return {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}


def test_first_epoch_loss_is_minus_the_token_weighted_advantage(
    tiny_dir, one_device_mesh
):
  cfg = dict(CFG, beta=0.0, aux_weight=0.0)
  m, graphdef, state, step, batch_sh = _setup(tiny_dir, one_device_mesh, cfg)
  host = _host_batch(m, graphdef, state.params)
  _, metrics = step(state, _put(host, batch_sh))
  # At old == new every ratio is 1: the loss is -sum_i A_i n_i / sum_i n_i
  # over the response tokens that are predicted (positions 1..T-1).
  n = host["mask"][:, 1:].sum(1)
  want = -(host["advantages"] * n).sum() / n.sum()
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert float(metrics["clip_fraction"]) == 0.0
  np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-5)
  assert float(metrics["response_tokens"]) == n.sum()


def test_eight_devices_equal_one(tiny_dir, one_device_mesh, eight_device_mesh):
  out = []
  for mesh in (one_device_mesh, eight_device_mesh):
    m, graphdef, state, step, batch_sh = _setup(tiny_dir, mesh)
    host = _host_batch(m, graphdef, state.params)
    with jax.set_mesh(mesh):
      state, metrics = step(state, _put(host, batch_sh))
      state, metrics2 = step(state, _put(host, batch_sh))
    out.append((jax.device_get(metrics), jax.device_get(metrics2)))
  for a, b in zip(out[0], out[1]):
    for k in ("loss", "kl", "aux_infonce", "clip_fraction", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("window", [14, 20])
def test_response_window_scores_the_same_loss_and_gradient(
    tiny_dir, one_device_mesh, window
):
  # Responses span 5..14 positions from position 5; a window of 20 runs
  # past the 22 scored positions and is moved back to fit.
  m, graphdef, state, _, _ = _setup(tiny_dir, one_device_mesh)
  host = _host_batch(m, graphdef, state.params)
  dev = {k: jnp.asarray(v) for k, v in host.items()}
  args = (graphdef, state.params, dev["tokens"], dev["lengths"])
  full_lp, full_emb = grpo.policy_outputs(*args, dev["embed_pos"])
  lp, emb = grpo.policy_outputs(
      *args, dev["embed_pos"], mask=dev["mask"], response_window=window
  )
  scored = host["mask"][:, 1:] > 0
  np.testing.assert_allclose(
      np.asarray(lp)[scored], np.asarray(full_lp)[scored], atol=1e-5
  )
  # Each row scores `window` positions; the rest of the row is 0.
  assert ((np.asarray(lp) != 0).sum(1) <= window).all()
  np.testing.assert_allclose(np.asarray(emb), np.asarray(full_emb), atol=1e-6)

  def loss_and_grad(w):
    cfg = dict(CFG, response_window=w)
    return jax.value_and_grad(
        lambda p: grpo.grpo_losses(graphdef, p, state.ref_params, dev, cfg)[0]
    )(state.params)

  (want, want_g), (got, got_g) = loss_and_grad(0), loss_and_grad(window)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_response_window_refuses_a_longer_response():
  mask = np.zeros((2, 12), np.float32)
  mask[0, 3:8] = 1.0  # 5 response tokens
  mask[1, 2:4] = 1.0
  grpo.check_window(mask, 5)
  with pytest.raises(ValueError, match="row 0 has a response of 5"):
    grpo.check_window(mask, 4)


def test_updates_favour_positive_advantages(tiny_dir, one_device_mesh):
  cfg = dict(CFG, beta=0.0, aux_weight=0.0)
  m, graphdef, state, step, batch_sh = _setup(
      tiny_dir, one_device_mesh, cfg, lr=1e-2
  )
  host = _host_batch(m, graphdef, state.params, seed=3)
  host["advantages"] = np.where(np.arange(N) % 2 == 0, 1.0, -1.0).astype(
      np.float32
  )
  mask = host["mask"][:, 1:]

  def seq_logp(params):
    lp = np.asarray(
        grpo.logprobs(
            graphdef,
            params,
            jnp.asarray(host["tokens"]),
            jnp.asarray(host["lengths"]),
        )
    )
    return (lp * mask).sum(1)

  before = seq_logp(state.params)
  batch = _put(host, batch_sh)
  for _ in range(4):  # inner epochs on one batch, old_logp fixed
    state, metrics = step(state, batch)
  after = seq_logp(state.params)
  delta = after - before
  assert (delta[0::2] > 0).all() and (delta[1::2] < 0).all(), delta
  assert float(metrics["clip_fraction"]) > 0.0  # the ratio left [0.8, 1.2]


def test_old_logprobs_are_the_samplers_at_temperature_0_7(
    tiny_dir, one_device_mesh
):
  """The importance ratio's log-probabilities are those of the distribution
  the rollouts were drawn from: softmax(logits / 0.7) over the tokenizer's
  ids (the tiny model's embedding has rows past them, never sampled). At the
  first inner epoch the update's own forward agrees, so every ratio is 1."""
  from search_r3_jax.core.tokenizer import embed_suffix_ids
  from search_r3_jax.training import rollouts

  temperature = 0.7
  m, graphdef, state, _, _ = _setup(tiny_dir, one_device_mesh)
  tok = m.tokenizer
  assert tok.vocab_size < m.cfg.vocab_size  # padding rows exist
  ro = rollouts.sample(
      m.policy,
      ["paris city", "the river in rome"],
      group_size=4,
      max_new_tokens=7,
      temperature=temperature,
      seed=3,
  )
  # Rows as training lays them out: a rollout that ended with end-of-turn
  # gets the embed suffix in its place, and `targets` keeps the sampled id.
  host = rollouts.grpo_batch(
      ro,
      embed_token_id=tok.embed_token_id,
      pad_id=tok.pad_id,
      seq_len=N * 8,
      suffix=embed_suffix_ids(tok, m.policy.prompts, leading_space=True),
      end_ids=tok.eos_ids,
  )
  sampling = dict(temperature=temperature, valid_vocab=tok.vocab_size)
  dev = {k: jnp.asarray(v) for k, v in host.items()}

  def old_logp(**kw):
    lp, _ = grpo.policy_outputs(
        graphdef,
        state.params,
        dev["tokens"],
        dev["lengths"],
        dev["embed_pos"],
        targets=dev["targets"],
        **kw,
    )
    return np.asarray(lp)

  def response_part(lp):
    # lp[:, t] is the log-probability of tokens[:, t + 1].
    return np.concatenate(
        [
            lp[i, len(p) - 1 : len(p) - 1 + len(r)]
            for i, (p, r) in enumerate(zip(ro.prompts, ro.responses))
        ]
    )

  sampler = np.concatenate([np.asarray(x) for x in ro.logprobs])
  np.testing.assert_allclose(
      response_part(old_logp(**sampling)), sampler, atol=1e-4
  )
  # The unscaled logits over every row are another policy.
  assert np.abs(response_part(old_logp()) - sampler).max() > 1e-2

  cfg = dict(CFG, beta=0.01, aux_weight=0.0, **sampling)
  tx, schedule = ts.make_optimizer(_opt())
  graphdef, state, shardings = ts.create_train_state(
      m.model, tx, one_device_mesh
  )
  step, batch_sh = grpo.make_grpo_step(
      graphdef,
      tx,
      schedule,
      cfg,
      one_device_mesh,
      shardings,
      batch_size=len(ro.responses),
  )
  batch = dict(
      host,
      old_logp=old_logp(**sampling),
      advantages=np.linspace(-1, 1, len(ro.responses), dtype=np.float32),
      docs=np.zeros((len(ro.responses), 1, m.cfg.hidden_size), np.float32),
  )
  _, metrics = step(state, _put(batch, batch_sh))
  np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), 0.0, atol=1e-6)
