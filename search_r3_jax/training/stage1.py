"""Stage 1: instruction-guided representation learning.

`Batcher` turns raw examples ({query, positive, negatives}) into fixed-shape
numpy arrays; `make_sft_step` builds the pure step
`(state, batch, rng) -> (state, metrics)`, jitted with explicit shardings and
the state donated. Inside, one forward over the queries gives the response
logits (cross-entropy, KL against the frozen reference computed in the same
step without gradients) and the query embedding; one forward over the
documents gives their embeddings (InfoNCE, triplet).
"""

from __future__ import annotations

from typing import Mapping, Sequence
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from search_r3_jax.training import losses as losses_lib
from search_r3_jax.core.encoding import hidden_at, right_padded_forward
from search_r3_jax.core import sharding as shd
from search_r3_jax.training import train_state
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.tokenizer import Tokenizer
from search_r3_jax.training.train_state import TrainState, gradient_step

BATCH_KEYS = ("q_tokens", "q_lengths", "q_mask", "q_embed_pos", "d_tokens",
              "d_lengths", "d_groups")
_BATCH_NDIMS = (2, 1, 2, 1, 3, 2, 2)


class Batcher:
  """Raw stage-1 examples -> fixed-shape arrays (one compile for all steps).

  Arrays, B examples with K = 1 + num_negatives documents each:
    q_tokens [B, Tq] int32: query prompt + assistant turn
      "The embedding is <|embed_token|>." + end-of-turn, right-padded.
    q_mask [B, Tq] int32: 1 on the response tokens (the SFT/KL targets).
    q_embed_pos [B] int32: index of `<|embed_token|>` in q_tokens.
    d_tokens [B, K, Td] int32: document prompts ending at the embed token,
      the positive first.
    d_lengths [B, K] int32: tokens per document prompt.
    d_groups [B, K] int32: a checksum of each document's text, so in-batch
      InfoNCE never treats another row's copy of a positive as a negative.
  """

  def __init__(self, tokenizer: Tokenizer, prompts: PromptConfig, *,
               query_len: int, doc_len: int, num_negatives: int):
    self.tok = tokenizer
    self.prompts = prompts
    self.query_len = query_len
    self.doc_len = doc_len
    self.num_negatives = num_negatives
    # Room the templates take, so texts are cut to fit the fixed lengths.
    self._q_overhead = len(tokenizer.training_example(prompts, "query", "x")[0])
    self._d_overhead = len(tokenizer.embedding_prompt(prompts, "document", "x"))
    for name, total, over in (("query_len", query_len, self._q_overhead),
                              ("doc_len", doc_len, self._d_overhead)):
      if total <= over:
        raise ValueError(f"{name}={total} leaves no room for text: the "
                         f"prompt template alone takes {over} tokens")

  def __call__(self, examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    b, k = len(examples), 1 + self.num_negatives
    pad = self.tok.pad_id
    out = {
        "q_tokens": np.full((b, self.query_len), pad, np.int32),
        "q_lengths": np.zeros((b,), np.int32),
        "q_mask": np.zeros((b, self.query_len), np.int32),
        "q_embed_pos": np.zeros((b,), np.int32),
        "d_tokens": np.full((b, k, self.doc_len), pad, np.int32),
        "d_lengths": np.ones((b, k), np.int32),
        "d_groups": np.zeros((b, k), np.int32),
    }
    for i, ex in enumerate(examples):
      negatives = list(ex.get("negatives", ()))
      if len(negatives) < self.num_negatives:
        raise ValueError(
            f"example {ex.get('id', i)!r} has {len(negatives)} negatives, "
            f"the config asks for {self.num_negatives}")
      ids, start, embed_pos = self.tok.training_example(
          self.prompts, "query", ex["query"],
          max_text_tokens=self.query_len - self._q_overhead + 1)
      out["q_tokens"][i, :len(ids)] = ids
      out["q_lengths"][i] = len(ids)
      out["q_mask"][i, start:len(ids)] = 1
      out["q_embed_pos"][i] = embed_pos
      docs = [ex["positive"]] + negatives[:self.num_negatives]
      for j, doc in enumerate(docs):
        ids = self.tok.embedding_prompt(
            self.prompts, "document", doc,
            max_text_tokens=self.doc_len - self._d_overhead + 1)
        out["d_tokens"][i, j, :len(ids)] = ids
        out["d_lengths"][i, j] = len(ids)
        out["d_groups"][i, j] = np.int32(
            zlib.crc32(doc.encode("utf-8")) & 0x7FFFFFFF)
    return out

  def tokens_per_batch(self, batch: Mapping[str, np.ndarray]) -> int:
    """Real (unpadded) tokens in a batch, for throughput figures."""
    return int(batch["q_lengths"].sum() + batch["d_lengths"].sum())


def sft_losses(graphdef, params, ref_params, batch, loss_cfg):
  """Weighted stage-1 loss and its parts.

  Args:
    loss_cfg: mapping with `weights` ({name: weight}), `tau`, `margin`,
      `in_batch`.
  Returns:
    (total loss, {name: value}).
  """
  weights = {k: float(v) for k, v in loss_cfg["weights"].items() if v}
  model = nnx.merge(graphdef, params)
  q = batch["q_tokens"]
  b = q.shape[0]
  need_logits = "sft" in weights or "kl" in weights
  logits, hidden, _ = right_padded_forward(model, q, batch["q_lengths"],
                                           return_logits=need_logits)
  q_emb = hidden_at(hidden, batch["q_embed_pos"])

  d = batch["d_tokens"]
  _, k, td = d.shape
  flat = d.reshape(b * k, td)
  lengths = batch["d_lengths"].reshape(b * k)
  _, d_hidden, _ = right_padded_forward(model, flat, lengths,
                                        return_logits=False)
  d_emb = hidden_at(d_hidden, lengths - 1).reshape(b, k, -1)

  parts = {}
  if "sft" in weights:
    parts["sft"] = losses_lib.get("sft")(logits, q, batch["q_mask"])
  if "kl" in weights:
    ref = nnx.merge(graphdef, ref_params)
    ref_logits, _, _ = right_padded_forward(ref, q, batch["q_lengths"])
    parts["kl"] = losses_lib.get("kl")(
        logits, jax.lax.stop_gradient(ref_logits), batch["q_mask"])
  if "infonce" in weights:
    parts["infonce"] = losses_lib.get("infonce")(
        q_emb, d_emb, tau=loss_cfg["tau"], in_batch=loss_cfg["in_batch"],
        doc_groups=batch.get("d_groups"))
  if "triplet" in weights:
    parts["triplet"] = losses_lib.get("triplet")(
        q_emb, d_emb, margin=loss_cfg["margin"])
  unknown = set(weights) - set(parts)
  if unknown:
    raise KeyError(f"stage 1 has no loss {sorted(unknown)}; available: "
                   "sft, kl, infonce, triplet")
  total = sum(weights[n] * parts[n] for n in parts)
  # Retrieval accuracy inside the batch: is the positive the top document?
  cos = jnp.einsum("bd,bkd->bk", losses_lib._unit(q_emb),  # pylint: disable=protected-access
                   losses_lib._unit(d_emb))  # pylint: disable=protected-access
  parts["pos_top1"] = jnp.mean(jnp.argmax(cos, -1) == 0)
  return total, parts


def make_sft_step(graphdef, tx, schedule, loss_cfg, mesh: Mesh,
                  state_shardings, batch_size: int):
  """The jitted stage-1 step `(state, batch, rng) -> (state, metrics)`.

  The state is donated; batch arrays are split over the mesh's batch axes;
  nothing inside synchronises with the host.
  """
  loss_cfg = dict(loss_cfg)
  loss_cfg["weights"] = dict(loss_cfg["weights"])
  needs_ref = bool(loss_cfg["weights"].get("kl"))

  def step(state: TrainState, batch, rng):
    del rng  # the stage-1 loss has no randomness (no dropout)
    ref = state.ref_params if needs_ref else None

    def loss_fn(params):
      return sft_losses(graphdef, params, ref, batch, loss_cfg)

    return gradient_step(state, loss_fn, tx, schedule)

  batch_shardings = {
      k: shd.batch_sharding(mesh, nd, batch_size=batch_size)
      for k, nd in zip(BATCH_KEYS, _BATCH_NDIMS)
  }
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step,
                 in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,)), batch_shardings


def stage1_step(cfg, model, mesh):
  """The stage-1 pieces a config asks for: (graphdef, train state, jitted
  step, batch shardings, `Batcher`)."""
  tx, schedule = train_state.make_optimizer(cfg.optimizer)
  needs_ref = bool(cfg.loss.weights.get("kl"))
  graphdef, state, shardings = train_state.create_train_state(
      model.model, tx, mesh, with_reference=needs_ref)
  step_fn, batch_sh = make_sft_step(
      graphdef, tx, schedule, cfg.loss.to_dict(), mesh, shardings,
      batch_size=cfg.batch_size)
  batcher = Batcher(model.tokenizer, model.prompts, query_len=cfg.query_len,
                    doc_len=cfg.doc_len, num_negatives=cfg.data.num_negatives)
  return graphdef, state, step_fn, batch_sh, batcher
