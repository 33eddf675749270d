"""Generation: greedy answers, KV-cache decoding against full forward passes,
sampling (seeds, top-k, top-p, padded vocabulary), per-row stopping with the
stop token's hidden state, and one device against an 8-device mesh."""

from __future__ import annotations

import functools

from flax import nnx
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from search_r3_jax import SearchR3
from search_r3_jax.core import decoding
from search_r3_jax.core import encoding


@pytest.fixture(scope="module")
def tiny8(tiny_dir, eight_device_mesh):
  return SearchR3.from_pretrained(str(tiny_dir), mesh=eight_device_mesh)


def _tiny_prompts(m: SearchR3) -> list[list[int]]:
  """Three prompts of lengths 5, 1 and 11 (left-padded to 32 inside)."""
  texts = [
      "the capital of france is",
      "who",
      "where is the river in rome and berlin city a an",
  ]
  prompts = [m.tokenizer.encode(t) for t in texts]
  assert [len(p) for p in prompts] == [5, 1, 11]
  return prompts


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------ greedy answers


def test_greedy_continues_capital_of_france(smollm2):
  out = smollm2.generate(
      ["The capital of France is"], chat=False, max_new_tokens=8
  )
  assert isinstance(out, list) and len(out) == 1
  assert "Paris" in out[0], out


def test_chat_answer_names_paris(smollm2):
  out = smollm2.generate(["What is the capital of France?"], max_new_tokens=16)
  assert "Paris" in out[0], out
  assert "<|im_end|>" not in out[0]


# ------------------------------------------- KV cache vs full forward passes


def _assert_matches_full_forward(m: SearchR3, prompts, gen, atol=1e-4):
  """Each generated token is the argmax of the recomputed (unpadded, no
  cache) logits over the tokenizer's ids, with the same log-probability."""
  vocab = m.tokenizer.vocab_size
  for i, prompt in enumerate(prompts):
    n = int(gen.lengths[i])
    new = [int(t) for t in gen.tokens[i, :n]]
    assert max(new) < vocab
    logits = m.logits(np.array([list(prompt) + new], np.int32))[0]
    step = logits[len(prompt) - 1 : len(prompt) - 1 + n, :vocab]
    for j, tok in enumerate(new):
      # The argmax, up to float noise between near-tied candidates.
      assert step[j, tok] >= step[j].max() - 1e-5, (i, j, tok, step[j].argmax())
    want = _log_softmax(step)[np.arange(n), new]
    np.testing.assert_allclose(
        gen.logprobs[i, :n], want, rtol=0, atol=atol, err_msg=f"row {i}"
    )


def test_kv_cache_decoding_equals_full_forward_tiny(tiny):
  prompts = _tiny_prompts(tiny)
  gen = tiny.generate_ids(prompts, max_new_tokens=12, stop_ids=())
  np.testing.assert_array_equal(gen.lengths, 12)
  assert not gen.stopped.any()
  _assert_matches_full_forward(tiny, prompts, gen)


def test_kv_cache_decoding_equals_full_forward_smollm2(smollm2):
  tok = smollm2.tokenizer
  prompts = [
      tok.encode("The capital of France is"),
      tok.encode(
          "Water boils at a temperature of one hundred degrees "
          "Celsius, which is"
      ),
      tok.encode("Once"),
  ]
  assert len({len(p) for p in prompts}) == 3
  gen = smollm2.generate_ids(prompts, max_new_tokens=5, stop_ids=())
  np.testing.assert_array_equal(gen.lengths, 5)
  _assert_matches_full_forward(smollm2, prompts, gen)


# ------------------------------------------------------------------ sampling


def test_sampling_same_seed_same_tokens(tiny):
  prompts = _tiny_prompts(tiny)
  kw = dict(
      max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, stop_ids=()
  )
  a = tiny.generate_ids(prompts, seed=1, **kw)
  b = tiny.generate_ids(prompts, seed=1, **kw)
  c = tiny.generate_ids(prompts, seed=2, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()
  greedy = tiny.generate_ids(prompts, max_new_tokens=12, stop_ids=())
  assert (a.tokens != greedy.tokens).any()


def test_top_k_1_equals_greedy(tiny):
  prompts = _tiny_prompts(tiny)
  greedy = tiny.generate_ids(prompts, max_new_tokens=12, stop_ids=())
  for seed in (0, 5):
    top1 = tiny.generate_ids(
        prompts,
        max_new_tokens=12,
        temperature=1.5,
        top_k=1,
        seed=seed,
        stop_ids=(),
    )
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_padded_vocab_rows_never_sampled(tiny):
  """The tiny model has 131 rows but its tokenizer only 114 ids."""
  vocab = tiny.tokenizer.vocab_size
  assert vocab < tiny.cfg.vocab_size
  prompts = _tiny_prompts(tiny) + [[5, 6], [7]]
  gen = tiny.generate_ids(
      prompts, max_new_tokens=48, temperature=3.0, seed=3, stop_ids=()
  )
  # Sampling is spread wide enough that 17 unmasked rows would show up.
  assert len(np.unique(gen.tokens)) > 60
  assert gen.tokens.max() < vocab


def _reference_kept(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> list[set]:
  """Sort-based top-k then top-p (on the renormalized top-k distribution)."""
  kept = []
  for row in logits.astype(np.float64) / temperature:
    order = np.argsort(-row, kind="stable")
    if top_k:
      order = order[:top_k]
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    before = np.cumsum(p) - p  # mass of the strictly more likely tokens
    # The reference is only meaningful away from the boundary.
    assert np.abs(np.cumsum(p) - top_p).min() > 1e-4 or top_p == 1.0
    kept.append(set(order[before < top_p].tolist()))
  return kept


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, 5, 1.0),
        (1.0, 0, 0.5),
        (0.7, 20, 0.8),
        (2.0, 0, 0.9),
        (1.0, 1, 1.0),
    ],
)
def test_sample_logits_kept_set_matches_sort_reference(
    temperature, top_k, top_p
):
  rows, vocab, draws = 4, 257, 500
  logits = 2.0 * np.random.default_rng(7).standard_normal((rows, vocab)).astype(
      np.float32
  )
  kept = _reference_kept(logits, temperature, top_k, top_p)
  sp = decoding.SamplingParams(temperature, top_p, top_k)
  sample = jax.jit(functools.partial(decoding.sample_logits, sp=sp))
  tiled = np.tile(logits, (draws, 1))  # row r of draw d is tiled[d*rows + r]
  tok, lp = jax.device_get(sample(tiled, jax.random.key(0)))
  tok = tok.reshape(draws, rows)
  for r in range(rows):
    reached = set(tok[:, r].tolist())
    assert reached <= kept[r], (r, sorted(reached - kept[r]))
    assert len(reached) >= min(len(kept[r]), 4), (r, len(reached))
  # Log-probabilities are under softmax(logits / T), before truncation.
  want = _log_softmax(tiled / temperature)[
      np.arange(len(tiled)), tok.reshape(-1)
  ]
  np.testing.assert_allclose(lp, want, rtol=0, atol=1e-4)


def test_sample_logits_without_truncation_reaches_outside_kept_sets():
  rows, vocab, draws = 4, 257, 500
  logits = 2.0 * np.random.default_rng(7).standard_normal((rows, vocab)).astype(
      np.float32
  )
  sp = decoding.SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
  tok = np.asarray(
      decoding.sample_logits(
          np.tile(logits, (draws, 1)), jax.random.key(1), sp
      )[0]
  )
  tok = tok.reshape(draws, rows)
  for kept in (
      _reference_kept(logits, 1.0, 5, 1.0),
      _reference_kept(logits, 1.0, 0, 0.5),
  ):
    for r in range(rows):
      assert set(tok[:, r].tolist()) - kept[r]


# ------------------------------------------------------------ per-row stops


@pytest.mark.parametrize(
    "row,index,max_new",
    [
        (0, 2, 10),  # the brief's case: row 0's third token
        (1, 0, 10),  # a stop as the very first new token
        (0, 3, 4),  # a stop as the last token the budget allows
    ],
)
def test_per_row_stopping_and_stop_hidden(tiny, row, index, max_new):
  prompts = _tiny_prompts(tiny)
  pad = tiny.tokenizer.pad_id
  free = tiny.generate_ids(prompts, max_new_tokens=max_new, stop_ids=())
  stop = int(free.tokens[row, index])
  assert stop not in free.tokens[row, :index], "setup: pick a fresh token"
  assert stop not in tiny.tokenizer.eos_ids

  def expected_length(r):
    hits = np.flatnonzero(free.tokens[r] == stop)
    return int(hits[0]) + 1 if hits.size else max_new

  want_len = np.array([expected_length(r) for r in range(len(prompts))])
  assert want_len[row] == index + 1
  assert (want_len == max_new).any(), "setup: want a row that never stops"

  for capture in (False, True):
    gen = tiny.generate_ids(
        prompts,
        max_new_tokens=max_new,
        stop_ids=(stop,),
        capture_stop_hidden=capture,
    )
    np.testing.assert_array_equal(gen.lengths, want_len)
    stopped = np.array([stop in free.tokens[r] for r in range(len(prompts))])
    np.testing.assert_array_equal(gen.stopped, stopped)
    for r, n in enumerate(want_len):
      np.testing.assert_array_equal(gen.tokens[r, :n], free.tokens[r, :n])
      np.testing.assert_allclose(
          gen.logprobs[r, :n], free.logprobs[r, :n], rtol=0, atol=1e-6
      )
      assert (gen.tokens[r, n:] == pad).all()
      assert (gen.logprobs[r, n:] == 0).all()
    if not capture:
      assert not gen.stop_hidden.any()
      continue
    # The stop token's final hidden state, from one full forward pass.
    graphdef, state = nnx.split(tiny.model)
    for r in range(len(prompts)):
      if not stopped[r]:
        assert not gen.stop_hidden[r].any()
        continue
      full = list(prompts[r]) + [int(t) for t in gen.tokens[r, : want_len[r]]]
      with jax.set_mesh(tiny.mesh):
        _, hidden = encoding.forward_logits(
            graphdef,
            state,
            np.array([full], np.int32),
            np.array([len(full)], np.int32),
        )
      want = np.asarray(hidden)[0, -1]
      assert np.linalg.norm(want) > 1.0
      np.testing.assert_allclose(gen.stop_hidden[r], want, rtol=0, atol=1e-4)


# ------------------------------------------------- one device vs 8 devices


def test_params_are_sharded_on_eight_devices(tiny, tiny8):
  # embed is [vocab 131, embed 44]: 131 is prime (replicated), 44 splits
  # over 'fsdp'. wq is [layers, embed 44, heads 4, head_dim 10].
  embed = tiny8.model.embed[...]
  assert embed.sharding.spec == P(None, "fsdp")
  assert embed.addressable_shards[0].data.shape == (131, 22)
  wq = tiny8.model.blocks["wq"][...]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.shape == (3, 22, 2, 10)
  # w_gate's mlp dim (67) is prime: only its embed dim is split.
  assert tiny8.model.blocks["w_gate"][...].sharding.spec == P(
      None, "fsdp", None
  )
  assert len(tiny.model.embed[...].sharding.device_set) == 1
  np.testing.assert_array_equal(
      np.asarray(embed), np.asarray(tiny.model.embed[...])
  )


def test_eight_devices_logits_equal_one_device(tiny, tiny8):
  ids = np.random.default_rng(0).integers(0, 113, (3, 17)).astype(np.int32)
  np.testing.assert_allclose(
      tiny8.logits(ids), tiny.logits(ids), rtol=0, atol=1e-5
  )


def _assert_same_generation(tiny, tiny8, **kw):
  prompts = _tiny_prompts(tiny)  # 3 rows: padded to the batch split of 4
  one = tiny.generate_ids(prompts, max_new_tokens=10, stop_ids=(), **kw)
  eight = tiny8.generate_ids(prompts, max_new_tokens=10, stop_ids=(), **kw)
  np.testing.assert_array_equal(eight.tokens, one.tokens)
  np.testing.assert_array_equal(eight.lengths, one.lengths)
  np.testing.assert_allclose(eight.logprobs, one.logprobs, rtol=0, atol=1e-5)


def test_eight_devices_greedy_generation_equals_one_device(tiny, tiny8):
  _assert_same_generation(tiny, tiny8, temperature=0.0)


# generate_ids pads the batch to a multiple of the mesh's batch split (4 on
# the (2, 2, 2) mesh, 1 on one device): a row's random draws must not depend
# on the batch size, or the same seed would sample differently on 8 devices.
def test_eight_devices_sampled_generation_equals_one_device(tiny, tiny8):
  _assert_same_generation(
      tiny, tiny8, temperature=0.9, top_p=0.9, top_k=30, seed=4
  )


def test_sample_logits_row_does_not_depend_on_batch_size():
  """A row's draw must not change when padding rows are appended."""
  logits = np.random.default_rng(0).standard_normal((4, 131)).astype(np.float32)
  for sp in (
      decoding.SamplingParams(temperature=0.9),
      decoding.SamplingParams(temperature=0.9, top_k=20, top_p=0.8),
  ):
    for seed in range(3):
      key = jax.random.key(seed)
      three = np.asarray(decoding.sample_logits(logits[:3], key, sp)[0])
      four = np.asarray(decoding.sample_logits(logits, key, sp)[0])
      np.testing.assert_array_equal(three, four[:3])


def test_first_argmax_picks_the_first_of_tied_maxima():
  x = np.array(
      [
          [0.5, 2.0, 2.0, -1.0],
          [3.0, 1.0, 3.0, 3.0],
          [-np.inf, -5.0, -np.inf, -5.0],
          [1.0, 1.0, 1.0, 1.0],
      ],
      np.float32,
  )
  np.testing.assert_array_equal(
      decoding.first_argmax(jax.numpy.asarray(x)), [1, 0, 1, 0]
  )
  y = np.random.default_rng(1).standard_normal((5, 1000)).astype(np.float32)
  np.testing.assert_array_equal(
      decoding.first_argmax(jax.numpy.asarray(y)), y.argmax(-1)
  )


def test_eight_devices_stop_hidden_equals_one_device(tiny, tiny8):
  prompts = _tiny_prompts(tiny)
  free = tiny.generate_ids(prompts, max_new_tokens=6, stop_ids=())
  kw = dict(
      max_new_tokens=6,
      stop_ids=(int(free.tokens[0, 1]),),
      capture_stop_hidden=True,
  )
  one, eight = tiny.generate_ids(prompts, **kw), tiny8.generate_ids(
      prompts, **kw
  )
  assert one.stopped[0]
  np.testing.assert_array_equal(eight.tokens, one.tokens)
  np.testing.assert_allclose(
      eight.stop_hidden, one.stop_hidden, rtol=0, atol=1e-5
  )


def test_eight_devices_encode_documents_equal_one_device(tiny, tiny8):
  docs = [
      "paris is the capital of france",
      "rome",
      "the river in berlin",
      "a city on a river",
      "who what where when",
  ]
  one = tiny.encode_documents(docs, progress=False)
  eight = tiny8.encode_documents(docs, progress=False)
  assert one.shape == (5, tiny.cfg.hidden_size)
  np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)


def test_generation_makes_no_hidden_transfers_or_recompiles(tiny):
  """Host<->device copies are explicit, and prompts within one length bucket
  reuse the compiled program."""
  tiny.generate_ids([[5, 6, 7], [8, 9, 10, 11]], max_new_tokens=4)
  compiled = decoding.generate._cache_size()  # pylint: disable=protected-access
  with jax.transfer_guard("disallow"):
    out = tiny.generate_ids([[5, 6], [7, 8, 9, 10, 11]], max_new_tokens=4)
  assert out.tokens.shape == (2, 4)
  assert decoding.generate._cache_size() == compiled  # pylint: disable=protected-access


def test_a_new_instance_reuses_the_compiled_generation(tiny):
  """Evaluation wraps fresh parameters in a new SearchR3 at every call; the
  compiled generation must be reused, not rebuilt."""
  tiny.generate_ids([[5, 6, 7]], max_new_tokens=3)
  compiled = decoding.generate._cache_size()  # pylint: disable=protected-access
  again = SearchR3(tiny.model, tiny.tokenizer, tiny.mesh)
  again.generate_ids([[5, 6, 8]], max_new_tokens=3)
  assert decoding.generate._cache_size() == compiled  # pylint: disable=protected-access
