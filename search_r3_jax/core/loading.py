"""From a preset, HF directory or GGUF file to a sharded `Decoder` and its
`Tokenizer`: what inference (`SearchR3`) and training both start from.

`<|embed_token|>` is added to the tokenizer when absent; its embedding row (a
spare padded row, or a new row) is set to the mean of all rows, and the
vocabulary is padded to a multiple of `VOCAB_MULTIPLE` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jax.sharding import Mesh

from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.ops import round_up
from search_r3_jax.core.prompts import EMBED_TOKEN
from search_r3_jax.core.tokenizer import Tokenizer
from search_r3_jax.core.weights import convert
from search_r3_jax.core.weights.common import Checkpoint
from search_r3_jax.core.weights.presets import load_checkpoint

# Padding the vocabulary keeps the embedding and head shardable and their
# matmuls on aligned shapes.
VOCAB_MULTIPLE = 128


@dataclasses.dataclass
class LoadedDecoder:
  """A decoder on its mesh with the tokenizer it reads.

  Attributes:
    model: the nnx `Decoder`, parameters sharded on `mesh`.
    tokenizer: with `embed_token_id` and `eos_ids`.
    mesh: the device mesh.
    checkpoint: the weights it was read from (None for a random model).
    file_head_rows: the leading output-head rows that are still the file's
      own (a row re-initialised for `<|embed_token|>` is not): what a packed
      copy of the file's quantized head may cover.
  """

  model: Decoder
  tokenizer: Tokenizer
  mesh: Mesh
  checkpoint: Optional[Checkpoint] = None
  file_head_rows: int = 0


def load_decoder(
    name_or_path: str,
    *,
    model_dir: Optional[str] = None,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Optional[Mesh] = None,
    mesh_shape=(1, -1, 1),
    rules: shd.Rules = shd.DEFAULT_RULES,
    scan_layers: bool = True,
) -> LoadedDecoder:
  """Reads a preset, an HF directory or a `.gguf` file onto the mesh."""
  return decoder_from_checkpoint(
      load_checkpoint(name_or_path, model_dir=model_dir),
      compute_dtype=compute_dtype,
      param_dtype=param_dtype,
      mesh=mesh,
      mesh_shape=mesh_shape,
      rules=rules,
      scan_layers=scan_layers,
  )


def decoder_from_checkpoint(
    ckpt: Checkpoint,
    *,
    compute_dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Optional[Mesh] = None,
    mesh_shape=(1, -1, 1),
    rules: shd.Rules = shd.DEFAULT_RULES,
    scan_layers: bool = True,
) -> LoadedDecoder:
  """`load_decoder` of a checkpoint already opened."""
  cfg = ModelConfig.from_hf(
      ckpt.hf_config,
      source=ckpt.source,
      compute_dtype=compute_dtype,
      param_dtype=param_dtype,
      scan_layers=scan_layers,
  )
  had_embed = ckpt.tokenizer.token_to_id(EMBED_TOKEN) is not None
  source_vocab = cfg.vocab_size
  tok, cfg = tokenizer_and_config(ckpt, cfg)
  host = convert.host_params(ckpt, cfg, source_vocab)
  if not had_embed:
    convert.set_rows(host, {tok.embed_token_id: "mean"})
  mesh = mesh or shd.make_mesh(mesh_shape)
  model = convert.model_from_host(host, cfg, mesh, rules)
  head_rows = (
      source_vocab if had_embed else min(source_vocab, tok.embed_token_id)
  )
  return LoadedDecoder(model, tok, mesh, ckpt, head_rows)


def random_decoder(
    base: str = "smollm2-135m",
    *,
    seed: int = 0,
    model_dir: Optional[str] = None,
    mesh: Optional[Mesh] = None,
    mesh_shape=(1, -1, 1),
    rules: shd.Rules = shd.DEFAULT_RULES,
    **config_overrides,
) -> LoadedDecoder:
  """A randomly initialised decoder with `base`'s tokenizer and template,
  its config changed by `config_overrides` (e.g. `num_layers=2`);
  parameters are created sharded on the mesh."""
  ckpt = load_checkpoint(base, model_dir=model_dir)
  cfg = ModelConfig.from_hf(ckpt.hf_config, source=ckpt.source)
  tok, cfg = tokenizer_and_config(ckpt, cfg.replace(**config_overrides))
  mesh = mesh or shd.make_mesh(mesh_shape)
  return LoadedDecoder(convert.init_model(cfg, mesh, seed, rules), tok, mesh)


def tokenizer_and_config(
    ckpt: Checkpoint, cfg: ModelConfig
) -> tuple[Tokenizer, ModelConfig]:
  """The checkpoint's tokenizer (with `<|embed_token|>` added when absent)
  and `cfg` with enough embedding rows for it, padded to VOCAB_MULTIPLE."""
  tok = Tokenizer(
      ckpt.tokenizer,
      ckpt.chat_template,
      eos_token=ckpt.eos_token,
      bos_token=ckpt.bos_token,
      pad_token=ckpt.pad_token,
  )
  if tok.vocab_size > cfg.vocab_size:
    cfg = cfg.replace(vocab_size=round_up(tok.vocab_size, VOCAB_MULTIPLE))
  return tok, cfg
