"""`SearchR3`: load a model, generate, and embed queries and documents.

    m = SearchR3.from_pretrained("smollm2-135m")
    m.generate(["Name three rivers."], max_new_tokens=32)
    q = m.encode_queries(["who wrote hamlet"], reasoning=False)   # [1, d]
    d = m.encode_documents(["Hamlet is a tragedy by Shakespeare."])
    scores = q @ d.T                                              # cosine

Everything device-side is jitted on the mesh; this class only pads batches,
moves them across the host/device boundary explicitly and decodes text.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from search_r3_jax.core import decoding, encoding, kernels, quantized
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.quantized import QuantizedWeights
from search_r3_jax.core.tokenizer import Tokenizer, embed_suffix_ids
from search_r3_jax.core.weights import convert
from search_r3_jax.core.weights.presets import load_checkpoint

# Padded lengths are rounded up to multiples of this, so a stream of batches
# compiles a handful of shapes rather than one per batch.
LENGTH_BUCKET = 32
VOCAB_MULTIPLE = 128

log = logging.getLogger(__name__)


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


class SearchR3:
  """A decoder LLM that reasons and emits its own embedding at `<|embed_token|>`.

  Attributes:
    model: the nnx `Decoder` (parameters sharded over `mesh`).
    tokenizer: `Tokenizer`, with `embed_token_id` and `eos_ids`.
    cfg: the `ModelConfig`.
    mesh: the device mesh.
    prompts: the `PromptConfig` used by the encoders.
    quantized: the GGUF's own block-quantized weights packed for the CPU
      kernels (`quantized.py`), or None. Generation uses them while `model`
      holds the parameters they were loaded with.
  """

  def __init__(self, model: Decoder, tokenizer: Tokenizer, mesh: Mesh,
               rules: shd.Rules = shd.DEFAULT_RULES,
               prompts: Optional[PromptConfig] = None,
               quantized: Optional[QuantizedWeights] = None):
    self.model = model
    self.tokenizer = tokenizer
    self.cfg: ModelConfig = model.cfg
    self.mesh = mesh
    self.rules = tuple(rules)
    self.prompts = prompts or PromptConfig()
    self.quantized = quantized
    self._quantized_source = () if quantized is None else self._weight_arrays()
    if tokenizer.vocab_size > self.cfg.vocab_size:
      raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the "
                       f"model only {self.cfg.vocab_size} embedding rows")

  # -- loading ---------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, name_or_path: str = "smollm2-135m", *,
                      model_dir: Optional[str] = None,
                      compute_dtype: str = "float32",
                      param_dtype: str = "float32",
                      mesh: Optional[Mesh] = None,
                      mesh_shape: Sequence[int] = (1, -1, 1),
                      rules: shd.Rules = shd.DEFAULT_RULES,
                      prompts: Optional[PromptConfig] = None,
                      scan_layers: bool = True,
                      cpu_kernels: Optional[bool] = None) -> "SearchR3":
    """Loads a preset, an HF directory or a `.gguf` file.

    `<|embed_token|>` is added to the tokenizer when absent; its embedding row
    (a spare padded row, or a new row) is set to the mean of all rows.

    Args:
      name_or_path: a preset ("smollm2-135m", "qwen2.5-1.5b-instruct"), an
        HF directory, a `.gguf` file, or a training workdir (its config's
        model with the latest checkpoint's parameters).
      model_dir: directory for presets that load user-provided weights.
      compute_dtype, param_dtype: "float32" or "bfloat16".
      mesh: device mesh; default `make_mesh(mesh_shape)` over all devices.
      mesh_shape: ('data', 'fsdp', 'tensor') sizes, -1 meaning the rest.
      rules: logical-axis rules.
      prompts: prompt texts for the encoders.
      scan_layers: run blocks under `lax.scan` (False unrolls them).
      cpu_kernels: decode with the GGUF's block-quantized weights through
        the CPU kernels (`quantized.py`): None uses them where they apply (a
        Q4_0/Q4_1/Q8_0 GGUF, float32, one CPU device), False never, True
        raises where they cannot be used.
    """
    from search_r3_jax.training import workdir  # pylint: disable=g-import-not-at-top
    if workdir.is_workdir(name_or_path):
      if cpu_kernels:
        raise ValueError(f"cpu_kernels=True, but {name_or_path} is a "
                         "training workdir: its parameters are float32, not "
                         "GGUF blocks")
      return workdir.load_workdir(name_or_path, mesh=mesh)
    ckpt = load_checkpoint(name_or_path, model_dir=model_dir)
    cfg = ModelConfig.from_hf(ckpt.hf_config, source=ckpt.source,
                              compute_dtype=compute_dtype,
                              param_dtype=param_dtype, scan_layers=scan_layers)
    had_embed = ckpt.tokenizer.token_to_id("<|embed_token|>") is not None
    source_vocab = cfg.vocab_size
    tok, cfg = _tokenizer_and_config(ckpt, cfg)
    host = convert.host_params(ckpt, cfg, source_vocab)
    if not had_embed:
      convert.set_rows(host, {tok.embed_token_id: "mean"})
    mesh = mesh or shd.make_mesh(mesh_shape)
    model = convert.model_from_host(host, cfg, mesh, rules)
    qw = None
    if cpu_kernels is not False:
      # A row re-initialised inside the file's vocabulary is not the file's
      # any more: the packed head stops before it.
      head_rows = source_vocab if had_embed else min(source_vocab,
                                                     tok.embed_token_id)
      qw, why_not = _pack_for_kernels(ckpt, cfg, mesh, head_rows)
      if qw is None and cpu_kernels:
        raise ValueError(f"cpu_kernels=True, but {why_not}")
    return cls(model, tok, mesh, rules, prompts, quantized=qw)

  @classmethod
  def random(cls, base: str = "smollm2-135m", *, seed: int = 0,
             model_dir: Optional[str] = None, mesh: Optional[Mesh] = None,
             mesh_shape: Sequence[int] = (1, -1, 1),
             rules: shd.Rules = shd.DEFAULT_RULES,
             prompts: Optional[PromptConfig] = None,
             **config_overrides) -> "SearchR3":
    """A randomly initialised model with `base`'s tokenizer and template.

    For fast tests and smoke runs: e.g.
    `SearchR3.random(hidden_size=64, num_layers=2, intermediate_size=128,
    num_heads=2, num_kv_heads=1, head_dim=32)`. Parameters are created
    sharded on the mesh.
    """
    ckpt = load_checkpoint(base, model_dir=model_dir)
    cfg = ModelConfig.from_hf(ckpt.hf_config, source=ckpt.source)
    tok, cfg = _tokenizer_and_config(ckpt, cfg.replace(**config_overrides))
    mesh = mesh or shd.make_mesh(mesh_shape)
    return cls(convert.init_model(cfg, mesh, seed, rules), tok, mesh, rules,
               prompts)

  # -- plumbing --------------------------------------------------------------

  def _split(self):
    return nnx.split(self.model)

  def _weight_arrays(self) -> tuple:
    """The parameter arrays `quantized` stands for (compared by identity)."""
    blocks = self.model.blocks
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    arrays = [blocks[n].get_value() for n in names]
    arrays.append(self.model.embed.get_value())
    if not self.cfg.tie_word_embeddings:
      arrays.append(self.model.lm_head.get_value())
    return tuple(arrays)

  def _active_quantized(self) -> Optional[QuantizedWeights]:
    """`quantized`, unless the model's parameters have been replaced since
    (training, `nnx.update`); then it is dropped for good."""
    if self.quantized is None:
      return None
    now = self._weight_arrays()
    if len(now) != len(self._quantized_source) or any(
        a is not b for a, b in zip(now, self._quantized_source)):
      log.info("parameters changed since loading; generation leaves the "
               "packed GGUF weights for the float32 path")
      self.quantized, self._quantized_source = None, ()
    return self.quantized

  def _put(self, x: np.ndarray) -> jax.Array:
    """Host -> device, batch axis split over the mesh's batch axes."""
    sharding = shd.batch_sharding(self.mesh, x.ndim, self.rules, x.shape[0])
    return jax.device_put(x, sharding)

  def _rng(self, seed: int) -> jax.Array:
    # The seed crosses to the device explicitly (transfer guards stay quiet).
    return jax.random.key(jax.device_put(np.uint32(seed % 2**32)))

  def _batch_axes(self):
    """Hashable (a static jit argument): equal across instances."""
    return shd.batch_sharding(self.mesh, 1, self.rules).spec[0]

  def _pad_batch(self, n: int) -> int:
    return _round_up(n, shd.batch_multiple(self.mesh, self.rules))

  # -- generation ------------------------------------------------------------

  def chat_prompt(self, text_or_messages: Union[str, list]) -> list[int]:
    msgs = text_or_messages
    if isinstance(msgs, str):
      msgs = [{"role": "user", "content": msgs}]
    return self.tokenizer.encode(
        self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))

  def generate_ids(self, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                   stop_ids: Optional[Sequence[int]] = None,
                   capture_stop_hidden: bool = False) -> decoding.Generation:
    """Generates from token-id prompts; returns host numpy arrays.

    Args:
      prompts: token ids per row (no padding).
      stop_ids: ids that end a row (default: the tokenizer's eos ids).
      capture_stop_hidden: also return the final hidden state at each row's
        stop token (see `decoding.generate`).
    Returns:
      `decoding.Generation` of numpy arrays, one row per prompt.
    """
    if not prompts:
      raise ValueError("generate: no prompts")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("generate: empty prompt")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = decoding.SamplingParams(temperature, top_p, top_k)
    n = len(prompts)
    b = self._pad_batch(n)
    p = _round_up(max(len(x) for x in prompts), LENGTH_BUCKET)
    pad = self.tokenizer.pad_id
    ids = np.full((b, p), pad, np.int32)
    valid = np.zeros((b, p), bool)
    for i in range(b):
      row = prompts[min(i, n - 1)]  # padding rows repeat the last prompt
      ids[i, p - len(row):] = row
      valid[i, p - len(row):] = True
    stop = tuple(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
    graphdef, state = self._split()
    with jax.set_mesh(self.mesh):
      out = decoding.generate(
          graphdef, state, self._put(ids), self._put(valid),
          self._rng(seed), max_new_tokens=max_new_tokens,
          sampling=sampling, stop_ids=stop,
          valid_vocab=self.tokenizer.vocab_size, pad_id=pad,
          capture_stop_hidden=capture_stop_hidden,
          batch_axes=self._batch_axes(), quantized=self._active_quantized())
    out = jax.device_get(out)
    return decoding.Generation(*(np.asarray(a)[:n] for a in out))

  def generate(self, texts: Sequence[Union[str, list]], *,
               max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               chat: bool = True) -> list[str]:
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
    prompts = [self.chat_prompt(t) if chat else self.tokenizer.encode(t)
               for t in texts]
    gen = self.generate_ids(prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed)
    return [self.tokenizer.decode(row[:n]) for row, n in
            zip(gen.tokens, gen.lengths)]

  # -- embeddings ------------------------------------------------------------

  def _embed_ids(self, rows: list[list[int]], batch_size: int,
                 progress: bool, desc: str) -> np.ndarray:
    """Embeddings at each row's last token (the embed token), in input order."""
    graphdef, state = self._split()
    order = np.argsort([len(r) for r in rows], kind="stable")[::-1]
    out = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    starts = range(0, len(rows), batch_size)
    bar = tqdm.tqdm(starts, desc=desc, unit="batch",
                    disable=not progress or len(starts) < 2)
    pending = None  # the previous batch, fetched after the next dispatch
    with jax.set_mesh(self.mesh):
      for s in bar:
        idx = order[s:s + batch_size]
        # Power-of-two row buckets: a ragged last batch reuses a compiled
        # shape instead of compiling its own.
        b = self._pad_batch(min(batch_size, 1 << (len(idx) - 1).bit_length()))
        t = _round_up(max(len(rows[i]) for i in idx), LENGTH_BUCKET)
        ids = np.full((b, t), self.tokenizer.pad_id, np.int32)
        lengths = np.ones((b,), np.int32)
        for j, i in enumerate(idx):
          ids[j, :len(rows[i])] = rows[i]
          lengths[j] = len(rows[i])
        emb = encoding.embed_last(graphdef, state, self._put(ids),
                                  self._put(lengths))
        if pending is not None:
          prev_idx, prev = pending
          out[prev_idx] = np.asarray(jax.device_get(prev))[:len(prev_idx)]
        pending = (idx, emb)
      if pending is not None:
        prev_idx, prev = pending
        out[prev_idx] = np.asarray(jax.device_get(prev))[:len(prev_idx)]
    return out

  def encode_documents(self, texts: Sequence[str], *, batch_size: int = 16,
                       max_length: int = 512,
                       progress: bool = True) -> np.ndarray:
    """Embeds documents with the document prompt.

    Args:
      max_length: documents are cut to this many tokens (the prompt around
        them is kept whole).
    Returns:
      [n, d] float32, L2-normalized.
    """
    rows = [self.tokenizer.embedding_prompt(self.prompts, "document", t,
                                            max_text_tokens=max_length)
            for t in _check_texts(texts, "documents")]
    return self._embed_ids(rows, batch_size, progress, "encode documents")

  def encode_queries(self, texts: Sequence[str], *, reasoning: bool = False,
                     batch_size: int = 16, max_new_tokens: int = 128,
                     temperature: float = 0.0, seed: int = 0,
                     max_length: int = 512, progress: bool = True,
                     return_reasoning: bool = False):
    """Embeds queries, optionally after the model reasons about them.

    With `reasoning`, the model writes an analysis and emits
    `<|embed_token|>`; the embedding is the final hidden state there, taken
    inside the generation loop. A row that ends (eos or `max_new_tokens`)
    without the token gets `prompts.embed_suffix` appended after its text and
    is embedded by one forward pass.

    Returns:
      [n, d] float32 L2-normalized, and with `return_reasoning` also the list
      of generated analyses.
    """
    texts = _check_texts(texts, "queries")
    rows = [self.tokenizer.embedding_prompt(self.prompts, "query", t,
                                            reasoning=reasoning,
                                            max_text_tokens=max_length)
            for t in texts]
    if not reasoning:
      emb = self._embed_ids(rows, batch_size, progress, "encode queries")
      return (emb, [""] * len(texts)) if return_reasoning else emb
    tok = self.tokenizer
    emb = np.zeros((len(rows), self.cfg.hidden_size), np.float32)
    analyses, fallback = [], []
    starts = range(0, len(rows), batch_size)
    for s in tqdm.tqdm(starts, desc="reason+encode queries", unit="batch",
                       disable=not progress or len(starts) < 2):
      batch = rows[s:s + batch_size]
      gen = self.generate_ids(
          batch, max_new_tokens=max_new_tokens, temperature=temperature,
          seed=seed + s, stop_ids=tuple(tok.eos_ids) + (tok.embed_token_id,),
          capture_stop_hidden=True)
      for j, (row, n) in enumerate(zip(gen.tokens, gen.lengths)):
        new = [int(x) for x in row[:n]]
        analyses.append(tok.decode(new))
        if gen.stopped[j] and new[-1] == tok.embed_token_id:
          h = gen.stop_hidden[j]
          emb[s + j] = h / max(np.linalg.norm(h), 1e-12)
        else:
          text = [x for x in new if x not in tok.eos_ids]
          suffix = embed_suffix_ids(tok, self.prompts, leading_space=True)
          fallback.append((s + j, batch[j] + text + suffix))
    if fallback:
      idx, fb_rows = zip(*fallback)
      emb[list(idx)] = self._embed_ids(list(fb_rows), batch_size, False, "")
    return (emb, analyses) if return_reasoning else emb

  # -- scoring ---------------------------------------------------------------

  def logits(self, token_ids) -> np.ndarray:
    """Logits of an unpadded [B, T] int batch as float32 numpy [B, T, V]."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"logits expects a [B, T] integer array, got shape "
                       f"{ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
    n, t = ids.shape
    b = self._pad_batch(n)
    padded = np.zeros((b, t), np.int32)
    padded[:n] = ids
    graphdef, state = self._split()
    with jax.set_mesh(self.mesh):
      logits, _ = encoding.forward_logits(
          graphdef, state, self._put(padded),
          self._put(np.full((b,), t, np.int32)))
    return np.array(jax.device_get(logits), np.float32)[:n]


def _pack_for_kernels(ckpt, cfg: ModelConfig, mesh: Mesh, head_rows: int
                      ) -> tuple[Optional[QuantizedWeights], str]:
  """(packed weights, "") where the CPU kernels apply, else (None, why)."""
  if ckpt.get_blocks is None:
    return None, f"{ckpt.source} holds no block-quantized (GGUF) tensors"
  if cfg.compute_dtype != "float32" or cfg.param_dtype != "float32":
    return None, "the kernels compute in float32 (compute_dtype and " \
        "param_dtype must be float32)"
  if mesh.devices.size != 1:
    return None, f"the mesh has {mesh.devices.size} devices; the kernels " \
        "run on one CPU device"
  ok, why = kernels.status()
  if not ok:
    return None, f"the CPU kernels are unavailable: {why}"
  qw = quantized.pack_checkpoint(ckpt.get_blocks, cfg, head_rows)
  if qw is None:
    return None, f"{ckpt.source} has no Q4_0/Q4_1/Q8_0 projection or head"
  return quantized.to_device(qw, mesh.devices.flat[0]), ""


def _tokenizer_and_config(ckpt, cfg: ModelConfig
                          ) -> tuple[Tokenizer, ModelConfig]:
  """The checkpoint's tokenizer (with `<|embed_token|>` added when absent)
  and `cfg` with enough embedding rows for it, padded to VOCAB_MULTIPLE."""
  tok = Tokenizer(ckpt.tokenizer, ckpt.chat_template,
                  eos_token=ckpt.eos_token, bos_token=ckpt.bos_token,
                  pad_token=ckpt.pad_token)
  if tok.vocab_size > cfg.vocab_size:
    cfg = cfg.replace(vocab_size=_round_up(tok.vocab_size, VOCAB_MULTIPLE))
  return tok, cfg


def _check_texts(texts, what: str) -> list[str]:
  if isinstance(texts, str):
    raise TypeError(f"expected a list of {what}, got one string")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")
    if not t.strip():
      raise ValueError(f"{what}[{i}] is empty")
  return texts
