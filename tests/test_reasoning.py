"""Stage 1's reasoning queries: the row layout, the model-written analyses
and their rejection filter, and a tiny model that learns to write an
analysis and then emit `<|embed_token|>` itself."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from search_r3_jax import config_blocks as blocks
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.loading import random_decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.training import analyses
from search_r3_jax.training import stage1 as sft
from search_r3_jax.training import train_state as ts

WORDS = (
    "paris rome berlin river city capital france bridge tower museum "
    "castle harbour"
).split()


def _examples(n=8, reasoning_every=2):
  """n examples over place names; every `reasoning_every`-th has its own
  analysis."""
  out = []
  for i in range(n):
    a, b = WORDS[i % 12], WORDS[(i * 5 + 3) % 12]
    out.append(
        dict(
            query=f"{a} {b}",
            positive=f"{a} is near the {b}",
            negatives=[f"{b} far from {a}"],
            reasoning=(
                f"It asks about {a} and {b}."
                if i % reasoning_every == 0
                else ""
            ),
        )
    )
  return out


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny_smollm(mesh):
  """A random 2-layer model with SmolLM2's tokenizer (the `tiny` configs')."""
  return random_decoder("smollm2-135m", seed=0, mesh=mesh, **blocks.TINY_MODEL)


def test_reasoning_row_layout_by_hand(tiny_smollm):
  tok, prompts = tiny_smollm.tokenizer, PromptConfig()
  batcher = sft.Batcher(tok, prompts, query_len=96, doc_len=32, num_negatives=1)
  ex = _examples(2)
  b = batcher(ex)
  # Row 0, a reasoning query, built by hand: the reasoning prompt, the
  # analysis, " The embedding is <|embed_token|>." and end-of-turn.
  head = tok.embedding_prompt(prompts, "query", ex[0]["query"], reasoning=True)
  analysis = tok.encode(ex[0]["reasoning"])  # "It asks about paris and france."
  suffix = tok.encode(" The embedding is <|embed_token|>.")
  want = head + analysis + suffix + [tok.end_of_turn_id]
  n = b["q_lengths"][0]
  assert list(b["q_tokens"][0, :n]) == want
  # The loss covers the analysis, the suffix and the end of turn.
  np.testing.assert_array_equal(
      np.flatnonzero(b["q_mask"][0]), np.arange(len(head), len(want))
  )
  # The KL covers the analysis alone: the fixed suffix is the
  # cross-entropy's, the reference having never seen <|embed_token|>.
  np.testing.assert_array_equal(
      np.flatnonzero(b["q_kl_mask"][0]),
      np.arange(len(head), len(head) + len(analysis)),
  )
  # The embedding is taken at the token that follows the analysis and the
  # suffix's words.
  pos = b["q_embed_pos"][0]
  assert pos == len(head) + len(analysis) + suffix.index(tok.embed_token_id)
  assert b["q_tokens"][0, pos] == tok.embed_token_id
  # Row 1 (no analysis) is a plain query.
  ids, start, embed_pos = tok.training_example(prompts, "query", ex[1]["query"])
  assert list(b["q_tokens"][1, : b["q_lengths"][1]]) == ids
  assert b["q_embed_pos"][1] == embed_pos
  assert not b["q_kl_mask"][1].any()  # a plain turn is all suffix
  # A long analysis is cut to fit the row, never the template.
  long = dict(ex[0], reasoning=" ".join(["word"] * 200))
  b = batcher([long, ex[1]])
  assert b["q_lengths"][0] == 96
  assert b["q_tokens"][0, 95] == tok.end_of_turn_id
  kl = np.flatnonzero(b["q_kl_mask"][0])
  assert kl[-1] + 1 + len(suffix) + 1 == 96  # analysis, then the suffix
  # A row too short for the reasoning template is refused, naming it.
  short = sft.Batcher(tok, prompts, query_len=40, doc_len=32, num_negatives=1)
  short([ex[1]])  # plain queries fit
  with pytest.raises(ValueError, match="query_len=40 leaves no room for a "):
    short([ex[0]])
  with pytest.raises(ValueError, match="contains <|embed_token|>"):
    tok.reasoning_example(prompts, "q", "it is <|embed_token|> here")


def test_clean_cuts_where_the_model_began_the_suffix():
  suffix = PromptConfig().embed_suffix
  assert analyses.clean(" It is  a city.\n\nThe embedding is", suffix) == (
      "It is a city."
  )
  assert analyses.clean("A river. the EMBEDDING is x", suffix) == "A river."
  assert analyses.clean("no suffix <|embed_token|> here", suffix) == (
      "no suffix here"
  )
  assert analyses.clean("\n\n", suffix) == ""
  # Cut off by the budget: back to the last full sentence.
  cut = "Paris is a city. It lies on the Seine. Its mayor"
  assert analyses.clean(cut, suffix, finished=False) == (
      "Paris is a city. It lies on the Seine."
  )
  assert analyses.clean("Paris is", suffix, finished=False) == ""
  assert analyses.clean(cut, suffix) == cut


def test_rejection_filter_by_hand():
  docs = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
  # Query 0's positive is doc 0: plain ranks it 2nd (doc 2 is closer), the
  # analysis moves it 1st: kept. Query 1's positive is doc 1: plain 1st,
  # after the analysis 3rd: rejected. Query 2: rank 1 both ways (a tie of
  # ranks is kept).
  plain = np.array([[0.9, 0.5], [0.1, 1.0], [1.0, 0.0]])
  reasoned = np.array([[1.0, 0.1], [0.9, 0.5], [1.0, 0.05]])
  keep, r_plain, r_reasoned = analyses.rejection_filter(
      plain, reasoned, docs, [0, 1, 0]
  )
  np.testing.assert_array_equal(r_plain, [2, 1, 1])
  np.testing.assert_array_equal(r_reasoned, [1, 3, 1])
  np.testing.assert_array_equal(keep, [True, False, True])


def test_share_is_a_stable_checksum():
  queries = [f"query number {i}" for i in range(2000)]
  chosen = [q for q in queries if analyses.wants_reasoning(q, 0.3)]
  assert 0.25 < len(chosen) / len(queries) < 0.35
  assert chosen == [q for q in queries if analyses.wants_reasoning(q, 0.3)]
  assert not any(analyses.wants_reasoning(q, 0.0) for q in queries)
  assert all(analyses.wants_reasoning(q, 1.0) for q in queries)
  with pytest.raises(ValueError, match="reasoning.share"):
    analyses.AnalysisConfig(share=1.5)


def test_analyses_are_made_once_and_remade_when_the_settings_change(
    tiny_smollm, tmp_path
):
  m = tiny_smollm
  policy = Policy.from_model(m.model, m.tokenizer, m.mesh)
  examples = [dict(ex, reasoning="") for ex in _examples(8)]
  cfg = analyses.AnalysisConfig(share=1.0, max_new_tokens=6, batch_size=8)
  said = []
  kept, summary = analyses.load_or_make(
      str(tmp_path),
      policy,
      examples,
      cfg,
      model="tiny",
      doc_len=32,
      query_len=48,
      say=said.append,
  )
  header, rows = analyses.read(str(tmp_path / analyses.FILE))
  assert header["model"] == "tiny" and header["max_new_tokens"] == 6
  assert header["reasoning_system"] == PromptConfig().reasoning_system
  assert [r["query"] for r in rows] == [ex["query"] for ex in examples]
  for r in rows:  # the filter's rule, row by row
    assert r["kept"] == (
        bool(r["analysis"]) and r["rank_reasoning"] <= r["rank_plain"]
    )
    assert (
        1 <= r["rank_plain"] <= 16 and 1 <= r["rank_reasoning"] <= 16
    )  # 8 x 2 docs
  assert kept == {r["query"]: r["analysis"] for r in rows if r["kept"]}
  assert summary == dict(made=8, kept=len(kept), share_kept=len(kept) / 8)
  # Reused as it is.
  said.clear()
  again, _ = analyses.load_or_make(
      str(tmp_path),
      policy,
      examples,
      cfg,
      model="tiny",
      doc_len=32,
      query_len=48,
      say=said.append,
  )
  assert again == kept and any("reusing 8 analyses" in s for s in said)
  # Another budget: remade, and the message names the setting.
  said.clear()
  analyses.load_or_make(
      str(tmp_path),
      policy,
      examples,
      analyses.AnalysisConfig(share=1.0, max_new_tokens=4, batch_size=8),
      model="tiny",
      doc_len=32,
      query_len=48,
      say=said.append,
  )
  assert any("max_new_tokens" in s and "remaking" in s for s in said)
  assert analyses.read(str(tmp_path / analyses.FILE))[0]["max_new_tokens"] == 4


def test_a_tiny_model_learns_to_reason_then_emit_the_token(mesh):
  """Stage-1 steps on a batch of reasoning queries with their analyses: in
  a seconds-long run, greedy reasoning goes from never writing
  `<|embed_token|>` to writing it after an analysis for (nearly) every
  query."""
  m = random_decoder("smollm2-135m", seed=0, mesh=mesh, **blocks.TINY_MODEL)
  examples = _examples(8, reasoning_every=1)
  opt = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-2,
          warmup_steps=2,
          total_steps=40,
          end_lr_fraction=0.1,
          weight_decay=0.0,
          b1=0.9,
          b2=0.95,
          clip_norm=1.0,
          grad_accum_steps=1,
      )
  )
  tx, schedule = ts.make_optimizer(opt)
  graphdef, state, shardings = ts.create_train_state(m.model, tx, mesh)
  loss = dict(
      weights=dict(sft=1.0, infonce=0.1), tau=0.05, margin=0.2, in_batch=True
  )
  step, batch_sh = sft.make_sft_step(
      graphdef, tx, schedule, loss, mesh, shardings, batch_size=8
  )
  batcher = sft.Batcher(
      m.tokenizer, PromptConfig(), query_len=96, doc_len=32, num_negatives=1
  )
  host = batcher(examples)
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}

  def emission(params):
    policy = Policy(graphdef, params, m.tokenizer, PromptConfig(), mesh)
    _, details = policy.encode_queries(
        [ex["query"] for ex in examples],
        reasoning=True,
        max_new_tokens=16,
        return_details=True,
        progress=False,
    )
    return np.mean([d.emitted for d in details]), details

  before, _ = emission(state.params)
  sft_loss = []
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(0))
    sft_loss.append(float(metrics["sft"]))
  after, details = emission(state.params)
  assert before <= 0.1
  assert after >= 0.9, [d.analysis for d in details]
  assert sft_loss[-1] < 0.25 * sft_loss[0], sft_loss
  # An analysis comes before the token.
  assert all(d.analysis.strip() for d in details if d.emitted)


def test_batches_are_topped_up_with_reasoning_queries_in_turn():
  import types

  pool = [dict(query=f"r{i}", reasoning=f"analysis {i}") for i in range(3)]
  fake = types.SimpleNamespace(batch_share=0.5, pool=pool)

  def batch(step, own=0):
    examples = [
        dict(query=f"p{i}", reasoning="a" if i < own else "") for i in range(8)
    ]
    sft.Stage1._top_up(fake, examples, step)
    return examples

  b = batch(step=0)
  assert [ex["query"] for ex in b] == ["p0", "p1", "p2", "p3"] + [
      "r0",
      "r1",
      "r2",
      "r0",
  ]
  # The next step goes on where the last left off; the same step is the
  # same batch (a resumed run draws what the killed one did).
  assert [ex["query"] for ex in batch(step=1)[4:]] == ["r1", "r2", "r0", "r1"]
  assert batch(step=1) == batch(step=1)
  # A batch with its own reasoning queries is topped up only to the share.
  b = batch(step=0, own=3)
  assert sum(bool(ex["reasoning"]) for ex in b) == 4 and b[7]["query"] == "r0"
  fake.batch_share = 0.0
  assert all(not ex["reasoning"] for ex in batch(step=0))
