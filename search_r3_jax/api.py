"""`SearchR3`: load a model, generate, and embed queries and documents.

    m = SearchR3.from_pretrained("smollm2-135m")
    m.generate(["Name three rivers."], max_new_tokens=32)
    q = m.encode_queries(["who wrote hamlet"], reasoning=False)   # [1, d]
    d = m.encode_documents(["Hamlet is a tragedy by Shakespeare."])
    scores = q @ d.T                                              # cosine

A thin facade: it owns an nnx `Decoder` (and, for a GGUF, the file's packed
blocks for the CPU kernels) and answers every call through a
`core.policy.Policy` built from it, the same object training uses.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence, TYPE_CHECKING

from jax.sharding import Mesh

from search_r3_jax.core import kernels
from search_r3_jax.core import quantized
from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.loading import load_decoder
from search_r3_jax.core.loading import LoadedDecoder
from search_r3_jax.core.loading import random_decoder
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.policy import Policy
from search_r3_jax.core.prompts import PromptConfig
from search_r3_jax.core.quantized import QuantizedWeights
from search_r3_jax.core.tokenizer import Tokenizer

if TYPE_CHECKING:
  from search_r3_jax.retrieval.documents import DocumentIndex

log = logging.getLogger(__name__)


def _delegate(method):
  """A `SearchR3` method that runs `Policy.<method>` on `self.policy`, with
  the policy's signature and docstring."""

  @functools.wraps(method)
  def call(self, *args, **kwargs):
    return method(self.policy, *args, **kwargs)

  return call


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

  def __init__(
      self,
      model: Decoder,
      tokenizer: Tokenizer,
      mesh: Mesh,
      rules: shd.Rules = shd.DEFAULT_RULES,
      prompts: Optional[PromptConfig] = None,
      quantized: Optional[QuantizedWeights] = None,
  ):
    self.model = model
    self.tokenizer = tokenizer
    self.cfg: ModelConfig = model.cfg
    self.mesh = mesh
    self.rules = tuple(rules)
    self.prompts = prompts or PromptConfig()
    self.quantized = quantized
    self._quantized_source = () if quantized is None else self._weight_arrays()
    if tokenizer.vocab_size > self.cfg.vocab_size:
      raise ValueError(
          f"tokenizer has {tokenizer.vocab_size} ids but the "
          f"model only {self.cfg.vocab_size} embedding rows"
      )

  # -- loading ---------------------------------------------------------------

  @classmethod
  def from_pretrained(
      cls,
      name_or_path: str = "smollm2-135m",
      *,
      model_dir: Optional[str] = None,
      compute_dtype: str = "float32",
      param_dtype: str = "float32",
      mesh: Optional[Mesh] = None,
      mesh_shape: Sequence[int] = (1, -1, 1),
      rules: shd.Rules = shd.DEFAULT_RULES,
      prompts: Optional[PromptConfig] = None,
      scan_layers: bool = True,
      cpu_kernels: Optional[bool] = None,
  ) -> "SearchR3":
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
    # A workdir's loader lives in training/ (checkpoints); the facade is the
    # one layer allowed to reach it.
    from search_r3_jax.training import workdir

    if workdir.is_workdir(name_or_path):
      if cpu_kernels:
        raise ValueError(
            f"cpu_kernels=True, but {name_or_path} is a "
            "training workdir: its parameters are float32, not "
            "GGUF blocks"
        )
      return cls.from_loaded(
          workdir.load_workdir(name_or_path, mesh=mesh),
          rules=rules,
          prompts=prompts,
      )
    loaded = load_decoder(
        name_or_path,
        model_dir=model_dir,
        compute_dtype=compute_dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        mesh_shape=mesh_shape,
        rules=rules,
        scan_layers=scan_layers,
    )
    qw = None
    if cpu_kernels is not False:
      qw, why_not = _pack_for_kernels(loaded)
      if qw is None and cpu_kernels:
        raise ValueError(f"cpu_kernels=True, but {why_not}")
    return cls.from_loaded(loaded, rules=rules, prompts=prompts, quantized=qw)

  @classmethod
  def random(
      cls,
      base: str = "smollm2-135m",
      *,
      seed: int = 0,
      model_dir: Optional[str] = None,
      mesh: Optional[Mesh] = None,
      mesh_shape: Sequence[int] = (1, -1, 1),
      rules: shd.Rules = shd.DEFAULT_RULES,
      prompts: Optional[PromptConfig] = None,
      **config_overrides,
  ) -> "SearchR3":
    """A randomly initialised model with `base`'s tokenizer and template.

    For fast tests and smoke runs: e.g.
    `SearchR3.random(hidden_size=64, num_layers=2, intermediate_size=128,
    num_heads=2, num_kv_heads=1, head_dim=32)`. Parameters are created
    sharded on the mesh.
    """
    loaded = random_decoder(
        base,
        seed=seed,
        model_dir=model_dir,
        mesh=mesh,
        mesh_shape=mesh_shape,
        rules=rules,
        **config_overrides,
    )
    return cls.from_loaded(loaded, rules=rules, prompts=prompts)

  @classmethod
  def from_loaded(
      cls,
      loaded: LoadedDecoder,
      *,
      rules: shd.Rules = shd.DEFAULT_RULES,
      prompts: Optional[PromptConfig] = None,
      quantized: Optional[QuantizedWeights] = None,
  ) -> "SearchR3":
    return cls(
        loaded.model,
        loaded.tokenizer,
        loaded.mesh,
        rules,
        prompts,
        quantized=quantized,
    )

  @classmethod
  def from_policy(cls, policy: Policy) -> "SearchR3":
    """A facade over a policy's parameters (e.g. a training state's)."""
    return cls(
        policy.model(),
        policy.tokenizer,
        policy.mesh,
        policy.rules,
        policy.prompts,
        quantized=policy.quantized,
    )

  # -- plumbing --------------------------------------------------------------

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
        a is not b for a, b in zip(now, self._quantized_source)
    ):
      log.info(
          "parameters changed since loading; generation leaves the "
          "packed GGUF weights for the float32 path"
      )
      self.quantized, self._quantized_source = None, ()
    return self.quantized

  @property
  def policy(self) -> Policy:
    """The model's current parameters as a `Policy` (built per call, so it
    always sees parameters replaced in `model`)."""
    return Policy.from_model(
        self.model,
        self.tokenizer,
        self.mesh,
        prompts=self.prompts,
        rules=self.rules,
        quantized=self._active_quantized(),
    )

  # -- what users call: `Policy`'s methods, on the current parameters --------

  chat_prompt = _delegate(Policy.chat_prompt)
  generate_ids = _delegate(Policy.generate_ids)
  generate = _delegate(Policy.generate)
  encode_documents = _delegate(Policy.encode_documents)
  encode_queries = _delegate(Policy.encode_queries)
  logits = _delegate(Policy.logits)
  logprobs = _delegate(Policy.logprobs)

  # -- searching a user's documents ------------------------------------------

  def index(self, documents, **kwargs) -> "DocumentIndex":
    """Embeds `documents` (strings, (id, text) pairs or mappings with
    `text` and optional `id`/`title`) into a searchable `DocumentIndex`:
    `.search(queries, k, reasoning=...)`, `.save(path)`. Keyword arguments
    go to `DocumentIndex.build` (engine, doc_len, batch_size, progress,
    model_name)."""
    from search_r3_jax.retrieval.documents import DocumentIndex

    return DocumentIndex.build(self, documents, **kwargs)

  def load_index(self, path) -> "DocumentIndex":
    """A `DocumentIndex` saved by `.save(path)`, queried with this model
    (whose embedding width must be the saved vectors')."""
    from search_r3_jax.retrieval.documents import DocumentIndex

    return DocumentIndex.load(path, self)


def _pack_for_kernels(
    loaded: LoadedDecoder,
) -> tuple[Optional[QuantizedWeights], str]:
  """(packed weights, "") where the CPU kernels apply, else (None, why)."""
  ckpt, cfg, mesh = loaded.checkpoint, loaded.model.cfg, loaded.mesh
  if ckpt.get_blocks is None:
    return None, f"{ckpt.source} holds no block-quantized (GGUF) tensors"
  if cfg.compute_dtype != "float32" or cfg.param_dtype != "float32":
    return (
        None,
        "the kernels compute in float32 (compute_dtype and "
        "param_dtype must be float32)",
    )
  if mesh.devices.size != 1:
    return (
        None,
        f"the mesh has {mesh.devices.size} devices; the kernels "
        "run on one CPU device",
    )
  ok, why = kernels.status()
  if not ok:
    return None, f"the CPU kernels are unavailable: {why}"
  qw = quantized.pack_checkpoint(ckpt.get_blocks, cfg, loaded.file_head_rows)
  if qw is None:
    return None, f"{ckpt.source} has no Q4_0/Q4_1/Q8_0 projection or head"
  return quantized.to_device(qw, mesh.devices.flat[0]), ""
