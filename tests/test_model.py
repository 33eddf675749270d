"""Model-level checks: dtypes, scan vs unrolled blocks, sharding rules."""

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from search_r3_jax.core import sharding as shd
from search_r3_jax.core.config import ConfigError
from search_r3_jax.core.config import ModelConfig
from search_r3_jax.core.model import Decoder
from search_r3_jax.core.weights import convert

CFG = ModelConfig(
    arch="qwen2",
    vocab_size=131,
    hidden_size=44,
    intermediate_size=67,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
    attention_bias=True,
    tie_word_embeddings=False,
)


def _forward(model, tokens):
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return model(tokens, pos, jnp.ones((b, t), bool))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 131, (2, 13)))


def test_forward_shapes_and_final_norm(tokens):
  model = Decoder(CFG.replace(rms_norm_eps=1e-12), rngs=nnx.Rngs(0))
  logits, hidden, cache = _forward(model, tokens)
  assert logits.shape == (2, 13, 131) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 13, 44) and cache is None
  # hidden is after the final RMSNorm (weights are ones at init): unit RMS.
  rms = np.sqrt(np.mean(np.square(np.asarray(hidden)), -1))
  np.testing.assert_allclose(rms, 1.0, atol=1e-3)


def test_unrolled_blocks_equal_scan(tokens):
  scan = Decoder(CFG, rngs=nnx.Rngs(1))
  unrolled = Decoder(CFG.replace(scan_layers=False), rngs=nnx.Rngs(1))
  a, b = _forward(scan, tokens)[0], _forward(unrolled, tokens)[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_and_params(tokens):
  ref = Decoder(CFG, rngs=nnx.Rngs(2))
  low = Decoder(CFG.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(2))
  stored = Decoder(
      CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16"),
      rngs=nnx.Rngs(2),
  )
  nnx.update(
      stored, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(ref))
  )
  assert stored.blocks["wq"][...].dtype == jnp.bfloat16
  assert low.blocks["wq"][...].dtype == jnp.float32
  want = np.asarray(_forward(ref, tokens)[0])
  for m in (low, stored):
    logits, hidden, _ = _forward(m, tokens)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - want).max()
    assert 0 < err < 0.05, err  # bf16 really ran, and stayed close


def test_init_model_is_created_sharded(eight_device_mesh):
  cfg = CFG.replace(vocab_size=136, intermediate_size=68)
  model = convert.init_model(cfg, eight_device_mesh)
  # vocab 136 over tensor=2, embed 44 over fsdp=2; heads 4 over tensor=2.
  assert model.embed[...].sharding.spec == P("tensor", "fsdp")
  assert model.blocks["w_up"][...].sharding.spec == P(None, "fsdp", "tensor")
  assert model.blocks["wq"][...].sharding.spec[:3] == (None, "fsdp", "tensor")
  assert model.embed[...].addressable_shards[0].data.shape == (68, 22)


def test_logical_rules_fall_back_when_not_divisible(eight_device_mesh):
  spec = shd.logical_to_spec(("vocab", "embed"), (131, 37), eight_device_mesh)
  assert spec == P(None, None)
  spec = shd.logical_to_spec(("batch", "seq"), (8, 5), eight_device_mesh)
  assert spec == P(("data", "fsdp"), None)
  spec = shd.logical_to_spec(("batch", "seq"), (6, 5), eight_device_mesh)
  assert spec == P("data", None)  # 6 divides by data=2, not by data*fsdp=4


def test_make_mesh_shapes():
  mesh = shd.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  mesh = shd.make_mesh({"tensor": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    shd.make_mesh((-1, -1, 1))
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    shd.make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="unknown axes"):
    shd.make_mesh({"model": 2})


def test_config_validation():
  with pytest.raises(ConfigError, match="unknown architecture 'gpt2'"):
    ModelConfig(arch="gpt2")
  with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
    ModelConfig(num_heads=9, num_kv_heads=2)
  with pytest.raises(ConfigError, match="head_dim must be even"):
    ModelConfig(head_dim=63)
  with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
    ModelConfig(compute_dtype="fp8")
  with pytest.raises(ConfigError, match="rope_scaling"):
    ModelConfig.from_hf(
        {
            "model_type": "llama",
            "hidden_size": 8,
            "num_attention_heads": 2,
            "vocab_size": 11,
            "intermediate_size": 5,
            "num_hidden_layers": 1,
            "rope_scaling": {"rope_type": "llama3"},
        }
    )
