"""Flags shared by the command-line programs (absl)."""

from absl import flags

from search_r3_jax.core import kernels

MODEL = flags.DEFINE_string(
    "model", "smollm2-135m", "Preset name, HF directory or .gguf file to load."
)
MODEL_DIR = flags.DEFINE_string(
    "model_dir",
    None,
    "Directory for presets that load user-provided weights "
    "(qwen2.5-1.5b-instruct).",
)
DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Compute dtype."
)
MESH = flags.DEFINE_list(
    "mesh",
    ["1", "-1", "1"],
    "('data', 'fsdp', 'tensor') mesh sizes; -1 = the rest.",
)
CPU_KERNELS = flags.DEFINE_enum(
    "cpu_kernels",
    "auto",
    list(kernels.FLAG_VALUES),
    "Decode with a GGUF's own quantized blocks on the CPU kernels: auto "
    "where they apply, on (fail where they cannot), off (float32).",
)


def load_model():
  from search_r3_jax.api import SearchR3

  return SearchR3.from_pretrained(
      MODEL.value,
      model_dir=MODEL_DIR.value,
      compute_dtype=DTYPE.value,
      mesh_shape=[int(x) for x in MESH.value],
      cpu_kernels=kernels.FLAG_VALUES[CPU_KERNELS.value],
  )
