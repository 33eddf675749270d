"""`Policy`: a decoder as plain values (graph, parameters, tokenizer, prompts,
mesh) with what every caller needs from it: generate, encode and score.

Training holds its parameters in a `TrainState` and makes a `Policy` from them
whenever it samples rollouts, encodes documents or evaluates
(`policy.with_params(state.params)` costs nothing); the environment and the
evaluator take any object with `encode_documents`/`encode_queries`. The
user-facing `SearchR3` is a thin facade that builds one from its nnx model.

Everything device-side is jitted on the mesh; a `Policy` only pads batches,
moves them across the host/device boundary explicitly and decodes text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

from flax import nnx
import jax
from jax.sharding import Mesh
import numpy as np
import tqdm

from search_r3_jax.core import decoding
from search_r3_jax.core import distributed
from search_r3_jax.core import encoding
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.ops import l2_normalize
from search_r3_jax.core.ops import pow2_bucket
from search_r3_jax.core.ops import round_up
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.tokenizer import embed_suffix_ids
from search_r3_jax.core.tokenizer import reasoning_row
from search_r3_jax.core.tokenizer import Tokenizer

# Padded lengths are rounded up to multiples of this, so a stream of batches
# compiles a handful of shapes rather than one per batch.
LENGTH_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class QueryReasoning:
  """What a reasoning query's encoding did.

  Attributes:
    analysis: the text the model wrote (special tokens dropped).
    emitted: True when the model wrote `<|embed_token|>` itself and the
      embedding is its hidden state there; False when the analysis ended
      without it (end of turn, or `max_new_tokens`) and the embed suffix
      was appended.
  """

  analysis: str
  emitted: bool


@dataclasses.dataclass(frozen=True)
class Policy:
  """A decoder's graph and parameters with its tokenizer and prompts.

  Attributes:
    graphdef: the nnx graph of the `Decoder` (static).
    params: its state (an nnx State; a `TrainState.params` fits).
    tokenizer: `Tokenizer`, with `embed_token_id` and `eos_ids`.
    prompts: the `PromptConfig` of the encoders.
    mesh: the device mesh the parameters live on.
    rules: logical-axis rules (`sharding.py`).
    quantized: packed GGUF blocks standing for these very parameters, for
      the CPU decode kernels (`quantized.py`), or None.
  """

  graphdef: Any
  params: Any
  tokenizer: Tokenizer
  prompts: PromptConfig
  mesh: Mesh
  rules: tuple = tuple(shd.DEFAULT_RULES)
  quantized: Optional[Any] = None

  @classmethod
  def from_model(
      cls,
      model,
      tokenizer: Tokenizer,
      mesh: Mesh,
      *,
      prompts: Optional[PromptConfig] = None,
      rules: shd.Rules = shd.DEFAULT_RULES,
      quantized=None,
  ) -> "Policy":
    graphdef, params = nnx.split(model)
    return cls(
        graphdef,
        params,
        tokenizer,
        prompts or PromptConfig(),
        mesh,
        tuple(rules),
        quantized,
    )

  def with_params(self, params) -> "Policy":
    """The same policy with other parameters (e.g. after an update); the
    packed GGUF copy no longer applies and is dropped."""
    return dataclasses.replace(self, params=params, quantized=None)

  @functools.cached_property
  def cfg(self) -> ModelConfig:
    return self.model().cfg

  def model(self):
    """The nnx `Decoder` with these parameters (a view: no copy)."""
    return nnx.merge(self.graphdef, self.params)

  # -- host <-> device -------------------------------------------------------

  def _put(self, x: np.ndarray) -> jax.Array:
    """Host -> device, batch axis split over the mesh's batch axes."""
    sharding = shd.batch_sharding(self.mesh, x.ndim, self.rules, x.shape[0])
    # Across processes every one holds the same host rows and places its
    # own devices' share.
    return distributed.put_global(x, sharding)

  def _rng(self, seed: int) -> jax.Array:
    # The seed crosses to the device explicitly (transfer guards stay quiet).
    replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec()
    )
    seed = distributed.put_global(np.uint32(seed % 2**32), replicated)
    return jax.random.key(seed)

  def _batch_axes(self):
    """Hashable (a static jit argument): equal across instances."""
    return shd.batch_sharding(self.mesh, 1, self.rules).spec[0]

  def pad_batch(self, n: int) -> int:
    """Rows a batch of `n` is padded to: a multiple of the batch shards."""
    return round_up(n, shd.batch_multiple(self.mesh, self.rules))

  # -- generation ------------------------------------------------------------

  def chat_prompt(self, text_or_messages: Union[str, list]) -> list[int]:
    msgs = text_or_messages
    if isinstance(msgs, str):
      msgs = [{"role": "user", "content": msgs}]
    return self.tokenizer.encode(
        self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    )

  def generate_ids(
      self,
      prompts: Sequence[Sequence[int]],
      *,
      max_new_tokens: int = 64,
      temperature: float = 0.0,
      top_p: float = 1.0,
      top_k: int = 0,
      seed: int = 0,
      stop_ids: Optional[Sequence[int]] = None,
      capture_stop_hidden: bool = False,
  ) -> decoding.Generation:
    """Generates from token-id prompts; returns host numpy arrays.

    Args:
      prompts: token ids per row (no padding).
      stop_ids: ids that end a row (default: the tokenizer's eos ids).
      capture_stop_hidden: also return the final hidden state at each row's
        stop token (see `decoding.generate`).
    Returns:
      `decoding.Generation` of numpy arrays, one row per prompt.
    """
    out, n = self._generate(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_ids=stop_ids,
        capture_stop_hidden=capture_stop_hidden,
    )
    out = distributed.to_host(out)
    return decoding.Generation(*(np.asarray(a)[:n] for a in out))

  def generate_ids_local(
      self, prompts: Sequence[Sequence[int]], **kwargs
  ) -> tuple[decoding.Generation, slice]:
    """`generate_ids` of the same prompts on every process, each process
    reading back only the rows its own devices generated: (those rows,
    their place among `prompts`). The rows and their random draws are the
    ones `generate_ids` gives, so the union over processes is its result.
    A collective. On one process: every row, `slice(0, len(prompts))`."""
    out, n = self._generate(prompts, **kwargs)
    local, rows = [], None
    for x in out:
      # Rows split over the batch axes only (a hidden axis may be split
      # over the model axis), so each process holds whole rows.
      sh = shd.batch_sharding(self.mesh, x.ndim, self.rules, x.shape[0])
      x = jax.device_put(x, sh)
      here = distributed.process_rows(sh, x.shape)
      if rows is not None and here != rows:
        raise ValueError(
            f"generation outputs on rows {here} and {rows} of one batch"
        )
      rows = here
      local.append(distributed.local_rows(x))
    start, stop = min(rows.start, n), min(rows.stop, n)  # padding rows off
    gen = decoding.Generation(*(a[: stop - start] for a in local))
    return gen, slice(start, stop)

  def _generate(
      self,
      prompts: Sequence[Sequence[int]],
      *,
      max_new_tokens: int = 64,
      temperature: float = 0.0,
      top_p: float = 1.0,
      top_k: int = 0,
      seed: int = 0,
      stop_ids: Optional[Sequence[int]] = None,
      capture_stop_hidden: bool = False,
  ) -> tuple[decoding.Generation, int]:
    """`decoding.generate` over the padded batch of `prompts`: (its device
    arrays, the number of real rows)."""
    if not prompts:
      raise ValueError("generate: no prompts")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("generate: empty prompt")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = decoding.SamplingParams(temperature, top_p, top_k)
    n = len(prompts)
    b = self.pad_batch(n)
    p = round_up(max(len(x) for x in prompts), LENGTH_BUCKET)
    pad = self.tokenizer.pad_id
    # Left padding: every row's last prompt token sits at the same column,
    # so one decode loop serves the whole batch.
    ids = np.full((b, p), pad, np.int32)
    valid = np.zeros((b, p), bool)
    for i in range(b):
      row = prompts[min(i, n - 1)]  # padding rows repeat the last prompt
      ids[i, p - len(row) :] = row
      valid[i, p - len(row) :] = True
    stop = tuple(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
    with jax.set_mesh(self.mesh):
      out = decoding.generate(
          self.graphdef,
          self.params,
          self._put(ids),
          self._put(valid),
          self._rng(seed),
          max_new_tokens=max_new_tokens,
          sampling=sampling,
          stop_ids=stop,
          valid_vocab=self.tokenizer.vocab_size,
          pad_id=pad,
          capture_stop_hidden=capture_stop_hidden,
          batch_axes=self._batch_axes(),
          quantized=self.quantized,
      )
    return out, n

  def generate(
      self,
      texts: Sequence[Union[str, list]],
      *,
      max_new_tokens: int = 64,
      temperature: float = 0.0,
      top_p: float = 1.0,
      top_k: int = 0,
      seed: int = 0,
      chat: bool = True,
  ) -> list[str]:
    """Generates a continuation per input.

    Args:
      texts: user messages (or full message lists) when `chat`, else raw
        text to continue.
      temperature: 0 is greedy.
      chat: apply the chat template (an assistant reply); False continues
        the raw text.
    Returns:
      the generated text per input, without the stop token.
    """
    if isinstance(texts, str):
      raise TypeError("generate takes a list of texts")
    prompts = [
        self.chat_prompt(t) if chat else self.tokenizer.encode(t) for t in texts
    ]
    gen = self.generate_ids(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )
    return [
        self.tokenizer.decode(row[:n])
        for row, n in zip(gen.tokens, gen.lengths)
    ]

  # -- embeddings ------------------------------------------------------------

  def embed_ids(
      self,
      rows: list[list[int]],
      batch_size: int = 16,
      progress: bool = False,
      desc: str = "",
  ) -> np.ndarray:
    """[n, d] unit embeddings at each row's last token (the embed token),
    in input order."""
    # Longest first: the early batches compile the large shapes and later
    # ones reuse them.
    order = np.argsort([len(r) for r in rows], kind="stable")[::-1]
    out = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    starts = range(0, len(rows), batch_size)
    bar = tqdm.tqdm(
        starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2
    )
    pending = None  # the previous batch, fetched after the next dispatch

    def fetch(item):
      idx, emb = item
      out[idx] = np.asarray(distributed.to_host(emb))[: len(idx)]

    with jax.set_mesh(self.mesh):
      for s in bar:
        idx = order[s : s + batch_size]
        # Power-of-two row buckets: a ragged last batch reuses a compiled
        # shape instead of compiling its own.
        b = self.pad_batch(pow2_bucket(len(idx), batch_size))
        t = round_up(max(len(rows[i]) for i in idx), LENGTH_BUCKET)
        ids, lengths = self._rows_batch(rows, idx, b, t)
        emb = encoding.embed_last(
            self.graphdef, self.params, self._put(ids), self._put(lengths)
        )
        if pending is not None:
          fetch(pending)
        pending = (idx, emb)
      if pending is not None:
        fetch(pending)
    return out

  def _rows_batch(
      self, rows: list[list[int]], idx: Sequence[int], b: int, t: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """[b, t] token ids (right-padded) and [b] lengths of `rows[idx]`; the
    rows past `len(idx)` are padding of length 1."""
    ids = np.full((b, t), self.tokenizer.pad_id, np.int32)
    lengths = np.ones((b,), np.int32)
    for j, i in enumerate(idx):
      ids[j, : len(rows[i])] = rows[i]
      lengths[j] = len(rows[i])
    return ids, lengths

  def embed_ids_per_process(
      self, rows: list[list[int]], batch_size: int = 16
  ) -> np.ndarray:
    """`embed_ids` where each process of a pod gives its own rows (their
    number may differ) and gets back only their embeddings: every batch is
    built from each process's share (`make_array_from_process_local_data`)
    and read back from its own devices, so no process holds another's rows.
    A collective: every process calls it, each with its rows. On one
    process it is `embed_ids`."""
    n = jax.process_count()
    if n == 1:
      return self.embed_ids(rows, batch_size)
    order = np.argsort([len(r) for r in rows], kind="stable")[::-1]
    counts = distributed.allgather(len(rows))
    batches = -(-max(counts) // batch_size)
    # One global batch of `b` rows per step, `b // n` from each process,
    # padded to the longest row any process has in that step.
    b = self.pad_batch(n * batch_size)
    if b % n:
      raise ValueError(f"a batch of {b} rows does not split over {n} processes")
    mine = b // n
    longest = [
        max(
            (
                len(rows[i])
                for i in order[s * batch_size : (s + 1) * batch_size]
            ),
            default=1,
        )
        for s in range(batches)
    ]
    longest = np.max(np.asarray(distributed.allgather(longest)), axis=0)
    out = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    with jax.set_mesh(self.mesh):
      for s in range(batches):
        idx = order[s * batch_size : (s + 1) * batch_size]
        t = round_up(int(longest[s]), LENGTH_BUCKET)
        ids, lengths = self._rows_batch(rows, idx, mine, t)
        sh_ids = shd.batch_sharding(self.mesh, 2, self.rules, b)
        sh_len = shd.batch_sharding(self.mesh, 1, self.rules, b)
        emb = encoding.embed_last(
            self.graphdef,
            self.params,
            jax.make_array_from_process_local_data(sh_ids, ids, (b, t)),
            jax.make_array_from_process_local_data(sh_len, lengths, (b,)),
        )
        # Rows only on the batch axes (the hidden axis may be split too).
        emb = jax.device_put(emb, sh_ids)
        out[idx] = distributed.local_rows(emb)[: len(idx)]
    return out

  def encode_documents(
      self,
      texts: Sequence[str],
      *,
      batch_size: int = 16,
      max_length: int = 512,
      progress: bool = True,
      per_process: bool = False,
  ) -> np.ndarray:
    """Embeds documents with the document prompt.

    Args:
      max_length: documents are cut to this many tokens (the prompt around
        them is kept whole).
      per_process: on a pod, each process gives its own documents and gets
        their embeddings (`embed_ids_per_process`); otherwise every process
        gives the same documents and gets all of them.
    Returns:
      [n, d] float32, L2-normalized.
    """
    rows = [
        self.tokenizer.embedding_prompt(
            self.prompts, "document", t, max_text_tokens=max_length
        )
        for t in check_texts(texts, "documents")
    ]
    if per_process:
      return self.embed_ids_per_process(rows, batch_size)
    return self.embed_ids(rows, batch_size, progress, "encode documents")

  def encode_queries(
      self,
      texts: Sequence[str],
      *,
      reasoning: bool = False,
      batch_size: int = 16,
      max_new_tokens: int = 128,
      temperature: float = 0.0,
      seed: int = 0,
      max_length: int = 512,
      progress: bool = True,
      return_reasoning: bool = False,
      return_details: bool = False,
  ):
    """Embeds queries, optionally after the model reasons about them.

    With `reasoning`, the model writes an analysis and emits
    `<|embed_token|>`; the embedding is the final hidden state there, taken
    inside the generation loop. A row that ends (eos or `max_new_tokens`)
    without the token gets `prompts.embed_suffix` appended after its text and
    is embedded by one forward pass.

    Returns:
      [n, d] float32 L2-normalized; with `return_reasoning` also the list of
      generated analyses, or with `return_details` a `QueryReasoning` per
      query (its analysis, and whether the model emitted the token itself).
      Without `reasoning` the analyses are empty and nothing is emitted (the
      prompt holds the token).
    """
    if return_reasoning and return_details:
      raise ValueError("pass return_reasoning or return_details, not both")
    texts = check_texts(texts, "queries")
    rows = [
        self.tokenizer.embedding_prompt(
            self.prompts,
            "query",
            t,
            reasoning=reasoning,
            max_text_tokens=max_length,
        )
        for t in texts
    ]
    if not reasoning:
      emb = self.embed_ids(rows, batch_size, progress, "encode queries")
      details = [QueryReasoning("", False) for _ in texts]
    else:
      emb, details = self._reason_and_embed(
          rows, batch_size, max_new_tokens, temperature, seed, progress
      )
    if return_details:
      return emb, details
    if return_reasoning:
      return emb, [d.analysis for d in details]
    return emb

  def _reason_and_embed(
      self, rows, batch_size, max_new_tokens, temperature, seed, progress
  ):
    """Generates each query's analysis and takes the embedding at the token
    the model emits, or after the appended suffix where it emits none."""
    tok = self.tokenizer
    emb = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    details, fallback = [], []
    suffix = embed_suffix_ids(tok, self.prompts, leading_space=True)
    starts = range(0, len(rows), batch_size)
    for s in tqdm.tqdm(
        starts,
        desc="reason+encode queries",
        unit="batch",
        disable=not progress or len(starts) < 2,
    ):
      batch = rows[s : s + batch_size]
      gen = self.generate_ids(
          batch,
          max_new_tokens=max_new_tokens,
          temperature=temperature,
          seed=seed + s,
          stop_ids=tuple(tok.eos_ids) + (tok.embed_token_id,),
          capture_stop_hidden=True,
      )
      for j, (row, n) in enumerate(zip(gen.tokens, gen.lengths)):
        new = [int(x) for x in row[:n]]
        full, emitted = reasoning_row(
            batch[j],
            new,
            embed_token_id=tok.embed_token_id,
            end_ids=tok.eos_ids,
            suffix=suffix,
        )
        emitted = emitted and bool(gen.stopped[j])
        details.append(QueryReasoning(tok.decode(new), emitted))
        if emitted:
          emb[s + j] = l2_normalize(gen.stop_hidden[j])
        else:
          fallback.append((s + j, full))
    if fallback:
      idx, fb_rows = zip(*fallback)
      emb[list(idx)] = self.embed_ids(list(fb_rows), batch_size)
    return emb, details

  # -- scoring ---------------------------------------------------------------

  def logits(self, token_ids) -> np.ndarray:
    """Logits of an unpadded [B, T] int batch as float32 numpy [B, T, V]."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
          f"logits expects a [B, T] integer array, got shape "
          f"{ids.shape} dtype {ids.dtype}"
      )
    vocab = self.cfg.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"token ids must be in [0, {vocab})")
    n, t = ids.shape
    b = self.pad_batch(n)
    padded = np.zeros((b, t), np.int32)
    padded[:n] = ids
    with jax.set_mesh(self.mesh):
      logits, _ = encoding.forward_logits(
          self.graphdef,
          self.params,
          self._put(padded),
          self._put(np.full((b,), t, np.int32)),
      )
    return np.array(distributed.to_host(logits), np.float32)[:n]

  def logprobs(
      self, tokens: np.ndarray, lengths: np.ndarray, *, temperature: float = 1.0
  ) -> np.ndarray:
    """[B, T-1] float32 log p(tokens[:, t] | prefix) of a right-padded batch
    under the distribution `generate_ids` samples from at `temperature`
    (softmax(logits / temperature) over the tokenizer's ids); positions past
    a row's length are meaningless."""
    tokens = np.asarray(tokens, np.int32)
    n = tokens.shape[0]
    b = self.pad_batch(n)
    padded = np.zeros((b, tokens.shape[1]), np.int32)
    padded[:n] = tokens
    lens = np.ones((b,), np.int32)
    lens[:n] = lengths
    with jax.set_mesh(self.mesh):
      out = encoding.logprobs(
          self.graphdef,
          self.params,
          self._put(padded),
          self._put(lens),
          temperature=float(temperature),
          valid_vocab=self.tokenizer.vocab_size,
      )
    return np.asarray(distributed.to_host(out))[:n]


def check_texts(texts, what: str) -> list[str]:
  """`texts` as a list of non-empty strings; TypeError/ValueError naming
  the bad entry otherwise."""
  if isinstance(texts, str):
    raise TypeError(f"expected a list of {what}, got one string")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")
    if not t.strip():
      raise ValueError(f"{what}[{i}] is empty")
  return texts
