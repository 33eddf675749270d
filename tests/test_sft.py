"""Stage-1 batches and the sharded train step on a tiny prime-sized model."""

from conftest import make_tiny_hf_dir
import jax
import ml_collections
import numpy as np
import pytest

from search_r3_jax import SearchR3
from search_r3_jax.training import stage1 as sft
from search_r3_jax.training import train_state as ts

EXAMPLES = [
    {
        "query": "capital of france",
        "positive": "paris is the capital city",
        "negatives": ["rome is a city", "berlin river"],
    },
    {
        "query": "who is in berlin",
        "positive": "berlin is a city in a river",
        "negatives": ["the document", "what query"],
        "reasoning": "a city on a river",
    },
    {
        "query": "where is rome",
        "positive": "rome city of an embedding",
        "negatives": ["search a query", "paris and berlin"],
    },
    {
        "query": "the river",
        "positive": "a river in the city",
        "negatives": ["capital of france", "who what where"],
        "reasoning": "the river city",
    },
]


def _opt_cfg(**kw):
  c = ml_collections.ConfigDict(
      dict(
          learning_rate=3e-3,
          warmup_steps=2,
          total_steps=40,
          weight_decay=0.01,
          b1=0.9,
          b2=0.95,
          clip_norm=1.0,
          grad_accum_steps=1,
      )
  )
  c.update(kw)
  return c


LOSS_CFG = {
    "weights": {"sft": 1.0, "kl": 1.0, "infonce": 1.0, "triplet": 1.0},
    "tau": 0.05,
    "margin": 0.2,
    "in_batch": True,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return make_tiny_hf_dir(tmp_path_factory.mktemp("sft"), "llama")


def _setup(tiny_dir, mesh, opt=None):
  m = SearchR3.from_pretrained(str(tiny_dir), mesh=mesh)
  tx, schedule = ts.make_optimizer(opt or _opt_cfg())
  graphdef, state, shardings = ts.create_train_state(m.model, tx, mesh)
  step, batch_sh = sft.make_sft_step(
      graphdef,
      tx,
      schedule,
      LOSS_CFG,
      mesh,
      shardings,
      batch_size=len(EXAMPLES),
  )
  batcher = sft.Batcher(
      m.tokenizer, m.prompts, query_len=59, doc_len=31, num_negatives=2
  )
  return m, state, step, batch_sh, batcher


def _device_batch(batcher, batch_sh):
  host = batcher(EXAMPLES)
  return {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}


def test_batcher_layout(tiny_dir, one_device_mesh):
  m, _, _, _, batcher = _setup(tiny_dir, one_device_mesh)
  b = batcher(EXAMPLES)
  assert b["q_tokens"].shape == (4, 59) and b["d_tokens"].shape == (4, 3, 31)
  tok = m.tokenizer
  for i in range(4):
    n = b["q_lengths"][i]
    row = b["q_tokens"][i]
    assert row[b["q_embed_pos"][i]] == tok.embed_token_id
    assert row[n - 1] == tok.end_of_turn_id  # the turn is closed
    resp = np.flatnonzero(b["q_mask"][i])
    assert resp[0] < b["q_embed_pos"][i] < resp[-1] == n - 1
    for j in range(3):
      assert b["d_tokens"][i, j, b["d_lengths"][i, j] - 1] == tok.embed_token_id
  assert (
      batcher.tokens_per_batch(b) == b["q_lengths"].sum() + b["d_lengths"].sum()
  )
  with pytest.raises(ValueError, match="has 1 negatives, the config asks"):
    batcher([dict(EXAMPLES[0], negatives=["one"])])
  with pytest.raises(ValueError, match="leaves no room for text"):
    sft.Batcher(tok, m.prompts, query_len=5, doc_len=31, num_negatives=2)


def test_step_on_eight_devices_equals_one(
    tiny_dir, one_device_mesh, eight_device_mesh
):
  results = []
  for mesh in (one_device_mesh, eight_device_mesh):
    _, state, step, batch_sh, batcher = _setup(tiny_dir, mesh)
    rng = jax.random.key(0)
    for _ in range(2):
      state, metrics = step(state, _device_batch(batcher, batch_sh), rng)
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  for k in ("loss", "sft", "kl", "infonce", "triplet", "grad_norm"):
    assert np.isfinite(m1[k])
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # Two Adam steps at lr 3e-3: a gradient entry near zero, summed in another
  # order over 8 shards, can move its weight by a few 1e-5 more.
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
  assert m1["kl"] > 0  # after a step the policy left the reference


def test_overfitting_one_batch_lowers_the_loss(tiny_dir, one_device_mesh):
  _, state, step, batch_sh, batcher = _setup(tiny_dir, one_device_mesh)
  batch = _device_batch(batcher, batch_sh)
  rng = jax.random.key(0)
  history = []
  for _ in range(20):
    state, metrics = step(state, batch, rng)
    history.append(float(metrics["loss"]))
  assert int(state.step) == 20
  assert history[-1] < 0.5 * history[0], history
  assert float(metrics["pos_top1"]) == 1.0


def test_gradient_accumulation_updates_every_k_steps(tiny_dir, one_device_mesh):
  _, state, step, batch_sh, batcher = _setup(
      tiny_dir, one_device_mesh, _opt_cfg(grad_accum_steps=2)
  )
  batch = _device_batch(batcher, batch_sh)
  before = jax.device_get(state.params)
  state, _ = step(state, batch, jax.random.key(0))
  mid = jax.device_get(state.params)
  state, _ = step(state, batch, jax.random.key(0))
  after = jax.device_get(state.params)
  same = [
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(mid))
  ]
  moved = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(after))
  ]
  assert all(same) and any(moved)


def test_bf16_compute_step_runs_and_learns(tiny_dir, one_device_mesh):
  m = SearchR3.from_pretrained(
      str(tiny_dir), mesh=one_device_mesh, compute_dtype="bfloat16"
  )
  tx, schedule = ts.make_optimizer(_opt_cfg())
  graphdef, state, shardings = ts.create_train_state(
      m.model, tx, one_device_mesh
  )
  step, batch_sh = sft.make_sft_step(
      graphdef,
      tx,
      schedule,
      LOSS_CFG,
      one_device_mesh,
      shardings,
      batch_size=len(EXAMPLES),
  )
  batcher = sft.Batcher(
      m.tokenizer, m.prompts, query_len=59, doc_len=31, num_negatives=2
  )
  batch = _device_batch(batcher, batch_sh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.dtype == np.float32  # parameters stay float32


def test_optimizer_moments_are_sharded_like_their_parameters(
    tiny_dir, eight_device_mesh
):
  _, state, _, _, _ = _setup(tiny_dir, eight_device_mesh)
  params = dict(jax.tree_util.tree_leaves_with_path(state.params))
  adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  checked = 0
  for path, mu in jax.tree_util.tree_leaves_with_path(adam.mu):
    p = params[path]
    assert mu.sharding.is_equivalent_to(p.sharding, p.ndim), path
    checked += not p.sharding.is_fully_replicated
  assert checked > 0  # some parameter is really split, and so is its moment


def test_embed_token_row_learns_at_its_own_rate(tiny_dir, one_device_mesh):
  """`embed_token_lr_scale` multiplies the first update of the embed
  token's embedding row and head column by exactly that factor and leaves
  every other parameter's update as it was."""
  m = SearchR3.from_pretrained(str(tiny_dir), mesh=one_device_mesh)
  e = m.tokenizer.embed_token_id
  batcher = sft.Batcher(
      m.tokenizer, m.prompts, query_len=59, doc_len=31, num_negatives=2
  )
  moved = []
  for scale in (1.0, 10.0):
    tx, schedule = ts.make_optimizer(
        _opt_cfg(embed_token_lr_scale=scale), embed_token_ids=(e,)
    )
    graphdef, state, shardings = ts.create_train_state(
        m.model, tx, one_device_mesh
    )
    step, batch_sh = sft.make_sft_step(
        graphdef, tx, schedule, LOSS_CFG, one_device_mesh, shardings, 4
    )
    before = jax.device_get(state.params)
    state, _ = step(state, _device_batch(batcher, batch_sh), jax.random.key(0))
    after = jax.device_get(state.params)
    moved.append(
        jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), before, after)
    )
  plain, scaled = moved
  np.testing.assert_allclose(
      scaled["embed"].value[e], 10 * plain["embed"].value[e], rtol=1e-5
  )
  np.testing.assert_allclose(
      scaled["lm_head"].value[:, e],
      10 * plain["lm_head"].value[:, e],
      rtol=1e-5,
  )
  assert np.abs(plain["embed"].value[e]).max() > 0
  # The rest moves alike (to float rounding: the two steps compile to
  # different programs).
  rest = np.arange(m.cfg.vocab_size) != e
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
  same(scaled["embed"].value[rest], plain["embed"].value[rest])
  same(scaled["lm_head"].value[:, rest], plain["lm_head"].value[:, rest])
  for name in ("wq", "w_down", "attn_norm"):
    same(scaled["blocks"][name].value, plain["blocks"][name].value)
