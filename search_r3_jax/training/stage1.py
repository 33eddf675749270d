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

import json
from typing import Mapping, Optional, Sequence
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from search_r3_jax.core import distributed
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.encoding import hidden_at
from search_r3_jax.core.encoding import right_padded_forward
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.core.policy import Policy
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.tokenizer import embed_suffix_ids
from search_r3_jax.core.tokenizer import Tokenizer
from search_r3_jax.data import sources as data_lib
from search_r3_jax.retrieval import evaluation
from search_r3_jax.training import analyses as analyses_lib
from search_r3_jax.training import losses as losses_lib
from search_r3_jax.training import memory
from search_r3_jax.training import train_state
from search_r3_jax.training import trainer
from search_r3_jax.training.registry import call_with
from search_r3_jax.training.registry import parameters
from search_r3_jax.training.runtime import say
from search_r3_jax.training.train_state import gradient_step
from search_r3_jax.training.train_state import TrainState
from search_r3_jax.training.workdir import load_model
from search_r3_jax.training.workdir import planned_model

BATCH_KEYS = (
    "q_tokens",
    "q_lengths",
    "q_mask",
    "q_kl_mask",
    "q_embed_pos",
    "d_tokens",
    "d_lengths",
    "d_groups",
)
_BATCH_NDIMS = (2, 1, 2, 2, 1, 3, 2, 2)


class Batcher:
  """Raw stage-1 examples -> fixed-shape arrays (one compile for all steps).

  Arrays, B examples with K = 1 + num_negatives documents each:
    q_tokens [B, Tq] int32: query prompt + assistant turn, right-padded. A
      plain query's turn is "The embedding is <|embed_token|>." +
      end-of-turn; an example with a non-empty `reasoning` is a reasoning
      query (the reasoning prompt, then the analysis, " The embedding is
      <|embed_token|>." and end-of-turn).
    q_mask [B, Tq] int32: 1 on the response tokens (the SFT targets: the
      analysis and the suffix of a reasoning query).
    q_kl_mask [B, Tq] int32: 1 on the analysis tokens alone (the KL
      targets). The suffix is fixed text the reference never saw (it has
      never met `<|embed_token|>`), so a KL there would hold the token's
      probability down where the suffix asks for it; a plain query's turn
      is all suffix and has no KL targets.
    q_embed_pos [B] int32: index of `<|embed_token|>` in q_tokens (after
      the analysis, for a reasoning query).
    d_tokens [B, K, Td] int32: document prompts ending at the embed token,
      the positive first.
    d_lengths [B, K] int32: tokens per document prompt.
    d_groups [B, K] int32: a checksum of each document's text, so in-batch
      InfoNCE never treats another row's copy of a positive as a negative.
  """

  def __init__(
      self,
      tokenizer: Tokenizer,
      prompts: PromptConfig,
      *,
      query_len: int,
      doc_len: int,
      num_negatives: int,
  ):
    self.tok = tokenizer
    self.prompts = prompts
    self.query_len = query_len
    self.doc_len = doc_len
    self.num_negatives = num_negatives
    # Room the templates take, so texts are cut to fit the fixed lengths.
    self._q_overhead = len(tokenizer.training_example(prompts, "query", "x")[0])
    self._r_overhead = len(tokenizer.reasoning_example(prompts, "x", "")[0])
    self._d_overhead = len(tokenizer.embedding_prompt(prompts, "document", "x"))
    # Suffix tokens before `<|embed_token|>` in a reasoning turn, so the
    # analysis is the response less those and what follows the token.
    self._suffix_before_embed = (
        len(embed_suffix_ids(tokenizer, prompts, leading_space=True)) - 1
    )
    for name, total, over in (
        ("query_len", query_len, self._q_overhead),
        ("doc_len", doc_len, self._d_overhead),
    ):
      if total <= over:
        raise ValueError(
            f"{name}={total} leaves no room for text: the "
            f"prompt template alone takes {over} tokens"
        )

  def __call__(self, examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    b, k = len(examples), 1 + self.num_negatives
    pad = self.tok.pad_id
    out = {
        "q_tokens": np.full((b, self.query_len), pad, np.int32),
        "q_lengths": np.zeros((b,), np.int32),
        "q_mask": np.zeros((b, self.query_len), np.int32),
        "q_kl_mask": np.zeros((b, self.query_len), np.int32),
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
            f"the config asks for {self.num_negatives}"
        )
      analysis = ex.get("reasoning") or ""
      analysis_len = 0
      if analysis.strip():
        # The query text keeps at most half the room, the analysis the rest.
        room = self.query_len - self._r_overhead + 1
        if room < 2:
          raise ValueError(
              f"query_len={self.query_len} leaves no room for a reasoning "
              f"query: its template alone takes {self._r_overhead - 1} tokens"
          )
        text = self.tok.encode(ex["query"])[: max(room // 2, 1)]
        ids, start, embed_pos = self.tok.reasoning_example(
            self.prompts,
            ex["query"],
            analysis,
            max_text_tokens=len(text),
            max_analysis_tokens=max(room - len(text), 0),
        )
        analysis_len = embed_pos - start - self._suffix_before_embed
      else:
        ids, start, embed_pos = self.tok.training_example(
            self.prompts,
            "query",
            ex["query"],
            max_text_tokens=self.query_len - self._q_overhead + 1,
        )
      out["q_tokens"][i, : len(ids)] = ids
      out["q_lengths"][i] = len(ids)
      out["q_mask"][i, start : len(ids)] = 1
      out["q_kl_mask"][i, start : start + analysis_len] = 1
      out["q_embed_pos"][i] = embed_pos
      docs = [ex["positive"]] + negatives[: self.num_negatives]
      for j, doc in enumerate(docs):
        ids = self.tok.embedding_prompt(
            self.prompts,
            "document",
            doc,
            max_text_tokens=self.doc_len - self._d_overhead + 1,
        )
        out["d_tokens"][i, j, : len(ids)] = ids
        out["d_lengths"][i, j] = len(ids)
        out["d_groups"][i, j] = np.int32(
            zlib.crc32(doc.encode("utf-8")) & 0x7FFFFFFF
        )
    return out

  def tokens_per_batch(self, batch: Mapping[str, np.ndarray]) -> int:
    """Real (unpadded) tokens in a batch, for throughput figures."""
    return int(batch["q_lengths"].sum() + batch["d_lengths"].sum())


def sft_losses(graphdef, params, ref_params, batch, loss_cfg):
  """Weighted stage-1 loss and its parts.

  Every loss named in `loss_cfg["weights"]` is looked up in the registry
  (`losses.py`) and called with what its arguments name, from: `logits`,
  `ref_logits` (the frozen reference's, no gradient), `tokens`,
  `target_mask` (the query rows and their response mask), `kl_mask` (the
  analysis tokens alone), `queries` and
  `docs` (the embeddings at the embed token, [B, D] and [B, K, D]),
  `doc_groups`, and the settings `tau`, `margin`, `in_batch`. The forward
  passes a loss does not need are skipped.

  Args:
    loss_cfg: mapping with `weights` ({name: weight}), `tau`, `margin`,
      `in_batch`.
  Returns:
    (total loss, {name: value}).
  """
  weights = {k: float(v) for k, v in loss_cfg["weights"].items() if v}
  fns = {name: losses_lib.get(name) for name in weights}
  needs = set().union(*(parameters(f) for f in fns.values()))
  model = nnx.merge(graphdef, params)
  q = batch["q_tokens"]
  b = q.shape[0]
  logits, hidden, _ = right_padded_forward(
      model,
      q,
      batch["q_lengths"],
      return_logits=bool(needs & {"logits", "ref_logits"}),
  )
  q_emb = hidden_at(hidden, batch["q_embed_pos"])

  d = batch["d_tokens"]
  _, k, td = d.shape
  flat = d.reshape(b * k, td)
  lengths = batch["d_lengths"].reshape(b * k)
  _, d_hidden, _ = right_padded_forward(
      model, flat, lengths, return_logits=False
  )
  d_emb = hidden_at(d_hidden, lengths - 1).reshape(b, k, -1)

  available = dict(
      logits=logits,
      tokens=q,
      target_mask=batch["q_mask"],
      kl_mask=batch["q_kl_mask"],
      queries=q_emb,
      docs=d_emb,
      doc_groups=batch.get("d_groups"),
      tau=loss_cfg["tau"],
      margin=loss_cfg["margin"],
      in_batch=loss_cfg["in_batch"],
  )
  if "ref_logits" in needs:
    ref = nnx.merge(graphdef, ref_params)
    ref_logits, _, _ = right_padded_forward(ref, q, batch["q_lengths"])
    available["ref_logits"] = jax.lax.stop_gradient(ref_logits)
  parts = {
      name: call_with(fn, available, f"loss {name!r}")
      for name, fn in fns.items()
  }
  total = sum(weights[n] * parts[n] for n in parts)
  # Retrieval accuracy inside the batch: is the positive the top document?
  cos = jnp.einsum("bd,bkd->bk", l2_normalize(q_emb), l2_normalize(d_emb))
  parts["pos_top1"] = jnp.mean(jnp.argmax(cos, -1) == 0)
  return total, parts


def make_sft_step(
    graphdef,
    tx,
    schedule,
    loss_cfg,
    mesh: Mesh,
    state_shardings,
    batch_size: int,
):
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
  return (
      jax.jit(
          step,
          in_shardings=(state_shardings, batch_shardings, replicated),
          out_shardings=(state_shardings, replicated),
          donate_argnums=(0,),
      ),
      batch_shardings,
  )


def stage1_step(cfg, model, mesh):
  """The stage-1 pieces a config asks for: (graphdef, train state, jitted
  step, batch shardings, `Batcher`). `model` has `.model` (the Decoder) and
  `.tokenizer` (a `LoadedDecoder`, or a `SearchR3`)."""
  tx, schedule = train_state.make_optimizer(
      cfg.optimizer, embed_token_ids=(model.tokenizer.embed_token_id,)
  )
  needs_ref = bool(cfg.loss.weights.get("kl"))
  graphdef, state, shardings = train_state.create_train_state(
      model.model, tx, mesh, with_reference=needs_ref
  )
  step_fn, batch_sh = make_sft_step(
      graphdef,
      tx,
      schedule,
      cfg.loss.to_dict(),
      mesh,
      shardings,
      batch_size=cfg.batch_size,
  )
  batcher = Batcher(
      model.tokenizer,
      getattr(model, "prompts", None) or PromptConfig(),
      query_len=cfg.query_len,
      doc_len=cfg.doc_len,
      num_negatives=cfg.data.num_negatives,
  )
  return graphdef, state, step_fn, batch_sh, batcher


def batch_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """The shape of every array of a stage-1 batch (`Batcher`'s output)."""
  b, k = int(cfg.batch_size), 1 + int(cfg.data.num_negatives)
  q, d = int(cfg.query_len), int(cfg.doc_len)
  return dict(
      q_tokens=(b, q),
      q_lengths=(b,),
      q_mask=(b, q),
      q_kl_mask=(b, q),
      q_embed_pos=(b,),
      d_tokens=(b, k, d),
      d_lengths=(b, k),
      d_groups=(b, k),
  )


def plan_memory(cfg, model_cfg, mesh, embed_token_id: int, limit=None):
  """The stage-1 step compiled ahead of time from abstract shapes: (its
  `memory.MemoryReport`, the compiled step, the abstract state's
  shardings). Nothing is allocated."""
  tx, schedule = train_state.make_optimizer(
      cfg.optimizer, embed_token_ids=(embed_token_id,)
  )
  graphdef, state, shardings = memory.abstract_train_state(
      model_cfg, tx, mesh, with_reference=bool(cfg.loss.weights.get("kl"))
  )
  step_fn, batch_sh = make_sft_step(
      graphdef,
      tx,
      schedule,
      cfg.loss.to_dict(),
      mesh,
      shardings,
      batch_size=cfg.batch_size,
  )
  shapes = batch_shapes(cfg)
  batch = memory.abstract_batch(
      shapes, {k: jnp.int32 for k in shapes}, batch_sh
  )
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(
      rng.shape,
      rng.dtype,
      sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  report, compiled = memory.report(
      "stage 1", step_fn, (state, batch, rng), state, batch, limit
  )
  return report, compiled, shardings


class Stage1:
  """Stage 1 for the trainer loop: batches of training examples, the
  four-loss step, evaluation with reasoning off."""

  name = "stage 1"
  # A resumed run keeps its model, data and seed (the saved data position
  # points into that data) and the analyses it trained on.
  resume_refuses = trainer.KEEPS_ON_RESUME + ("reasoning",)

  def __init__(self, cfg, workdir: Optional[str] = None):
    self.cfg = cfg
    if cfg.batch_size % jax.process_count():
      raise ValueError(
          f"batch_size {cfg.batch_size} does not divide over "
          f"{jax.process_count()} processes"
      )
    losses_lib.LOSSES.check(
        [k for k, v in cfg.loss.weights.items() if v], "loss.weights"
    )
    mesh = shd.make_mesh(tuple(cfg.mesh))
    planned = None
    if cfg.get("memory_report", True):
      # Sized before anything is allocated; a step that cannot fit stops here.
      model_cfg, tok = planned_model(cfg)
      self.memory, compiled, planned_sh = plan_memory(
          cfg,
          model_cfg,
          mesh,
          tok.embed_token_id,
          memory.device_limit(cfg.get("max_device_gib", 0.0)),
      )
      say(self.memory.text())
      self.memory.check()
      planned = (model_cfg, compiled, planned_sh)
    loaded = load_model(cfg, mesh)
    self.graphdef, self.state, self.step_fn, self.batch_sh, self.batcher = (
        stage1_step(cfg, loaded, mesh)
    )
    if planned is not None:
      self.step_fn = memory.reuse_compiled(
          planned, loaded.model.cfg, self.state, self.step_fn
      )
    self._policy = Policy(
        self.graphdef,
        self.state.params,
        loaded.tokenizer,
        self.batcher.prompts,
        mesh,
    )
    # Each process reads its own share of the global batch.
    self.loader = data_lib.train_loader(
        cfg.data,
        batch_size=cfg.batch_size // jax.process_count(),
        seed=cfg.seed,
    )
    self.pool: list[dict] = []
    self.analyses, self.analysis_summary = self._analyses(cfg, workdir)
    self.batch_share = float(cfg.get("reasoning", {}).get("batch_share", 0.0))
    self.evaluator = evaluation.Evaluator.from_config(cfg.data, cfg.eval)
    self.rng = jax.random.key(cfg.seed)
    self._position = self.loader.get_state()  # after the last drawn batch

  def policy(self) -> Policy:
    return self._policy.with_params(self.state.params)

  def _analyses(self, cfg, workdir) -> tuple[dict[str, str], dict]:
    """The starting model's analyses of this run's reasoning queries
    (`analyses.py`), made before any step: the constructor's parameters are
    the starting model's, on a fresh run and on a resume alike."""
    settings = dict(cfg.get("reasoning", {}))
    settings.pop("batch_share", None)  # how batches use them, not how made
    acfg = analyses_lib.AnalysisConfig(**settings)
    if not acfg.share:
      return {}, {}
    # The examples this run will draw: the same loader, seed and batches.
    preview = data_lib.train_loader(
        cfg.data,
        batch_size=cfg.batch_size // jax.process_count(),
        seed=cfg.seed,
    )
    # A pod makes the analyses of every process's examples together (one
    # generation over the global batches, one file), as one process would.
    local = [preview.next_batch() for _ in range(cfg.total_steps)]
    every = distributed.allgather(local)
    examples = [
        ex
        for t in range(cfg.total_steps)
        for ex in distributed.interleave([part[t] for part in every])
        if not (ex.get("reasoning") or "").strip()
    ]
    model = json.dumps(
        {k: cfg.get(k) for k in ("model", "model_dir", "init_from")}
        | {"random_init": dict(cfg.random_init or {})},
        sort_keys=True,
    )
    name = analyses_lib.FILE
    kept, summary = analyses_lib.load_or_make(
        workdir,
        self._policy,
        examples,
        acfg,
        model=model,
        doc_len=cfg.doc_len,
        query_len=cfg.query_len,
        filename=name,
        say=say,
    )
    say(
        f"reasoning queries: {summary['made']} analyses written, "
        f"{summary['kept']} kept by the rejection filter "
        f"({100 * summary['share_kept']:.0f}%)"
    )
    # The reasoning queries batches are topped up from (`batch_share`).
    seen = set()
    for ex in examples:
      if ex["query"] in kept and ex["query"] not in seen:
        seen.add(ex["query"])
        self.pool.append(dict(ex, reasoning=kept[ex["query"]]))
    return kept, summary

  def summary(self) -> str:
    return (
        f"stage 1: {self.cfg.total_steps} steps of {self.cfg.batch_size} "
        f"examples, losses {dict(self.cfg.loss.weights)}"
    )

  def position(self) -> dict:
    return self._position

  def resume(self, position: dict, step: int) -> None:
    del step
    self.loader.set_state(position)
    self._position = position

  def prepare(self) -> None:
    pass

  def step(self, step: int, guard=None) -> dict:
    """Dispatches one step; the metrics come back as device arrays (the
    trainer reads them after the next step is dispatched)."""
    del guard  # the trainer guards when it reads the metrics
    local = self.loader.next_batch()
    self._position = self.loader.get_state()
    # The global batch on every process, in one process's order, so the
    # top-up (and so every row) is the same on any number of processes;
    # each then builds only the rows its devices hold.
    examples = distributed.interleave(distributed.allgather(local))
    examples = [self._with_analysis(ex) for ex in examples]
    self._top_up(examples, step)
    share = np.mean([bool(ex["reasoning"]) for ex in examples])
    rows = distributed.process_rows(
        self.batch_sh["q_lengths"], (len(examples),)
    )
    host = self.batcher(examples[rows])
    batch = {
        k: jax.make_array_from_process_local_data(self.batch_sh[k], v)
        for k, v in host.items()
    }
    self.state, metrics = self.step_fn(self.state, batch, self.rng)
    tokens = sum(distributed.allgather(self.batcher.tokens_per_batch(host)))
    return dict(metrics, reasoning_share=share, tokens=tokens)

  def _top_up(self, examples: list[dict], step: int) -> None:
    """Makes at least `batch_share` of the batch reasoning queries: plain
    examples at the end of the batch give way to reasoning queries of the
    kept analyses, taken in turn (by step, so a resumed run takes the
    same). Few analyses survive the filter, and the step from an analysis to
    `<|embed_token|>` is learnt only from those rows."""
    want = int(round(self.batch_share * len(examples)))
    need = want - sum(bool(ex["reasoning"]) for ex in examples)
    if need <= 0 or not self.pool:
      return
    plain = [i for i, ex in enumerate(examples) if not ex["reasoning"]]
    for j, i in enumerate(plain[-need:]):
      examples[i] = self.pool[(step * want + j) % len(self.pool)]

  def _with_analysis(self, ex: dict) -> dict:
    """The example with its analysis: its own (`reasoning` in the data), the
    model-written one that was kept, or "" (a plain query)."""
    own = (ex.get("reasoning") or "").strip()
    return dict(ex, reasoning=own or self.analyses.get(ex["query"], ""))

  def update_is_finite(self) -> bool:
    # The loss and gradient were computed before the update; an exploding
    # update leaves both finite and the parameters useless. One short
    # document's forward with the new parameters catches it before they are
    # saved.
    probe = self.policy().encode_documents(
        ["a short probe document"], progress=False
    )
    return bool(np.isfinite(probe).all())

  def baseline(self) -> dict[str, float]:
    return evaluation.flat_figures(self.evaluator.bm25())

  @staticmethod
  def _eval_args(cfg) -> dict:
    """The evaluation's reasoning modes (on only where the run trains
    reasoning queries) and budget."""
    acfg = cfg.get("reasoning", {})
    return dict(
        modes=(False, True) if acfg and acfg.get("share") else (False,),
        max_new_tokens=int(cfg.eval.get("max_new_tokens", 48)),
    )

  @classmethod
  def evaluation_settings(cls, cfg) -> dict:
    return trainer.evaluation_settings(cfg, **cls._eval_args(cfg))

  def evaluate(self, step: int) -> tuple[dict[str, float], list[dict]]:
    """Dev figures with reasoning off, and on where the run trains
    reasoning queries (with the analyses the model wrote)."""
    del step
    args = self._eval_args(self.cfg)
    samples = [] if True in args["modes"] else None
    flat = self.evaluator.flat(self.policy(), samples=samples, **args)
    return flat, samples or []

  def postfix(self, values: dict) -> dict[str, str]:
    out = {"loss": f"{values['loss']:.4f}"}
    if "tokens_per_s" in values:
      out["tok_s"] = f"{values['tokens_per_s']:.0f}"
    return out

  def save_extra(self, step: int) -> None:
    pass

  def prune_extra(self, kept_steps: set[int]) -> None:
    pass

  @classmethod
  def extras(cls, workdir: str, step: int) -> dict[str, str]:
    return {}

  @classmethod
  def check_extra(cls, workdir: str, step: int) -> Optional[str]:
    return None
