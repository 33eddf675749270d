"""Generation and prefill throughput against transformers + torch, side by side.

    python -m search_r3_jax.benchmarks.generate           # 8 prompts x 64 tokens
    python -m search_r3_jax.benchmarks.generate --quick   # 8 prompts x 16 tokens

Both sides load the same SmolLM2 weights from the same GGUF, get the same
token ids (left-padded), sample with the same settings and must produce
exactly `new_tokens` tokens per row (no early stop). Times exclude
compilation and warm-up, which are reported separately. The last line
printed is one JSON object.

Weights: transformers dequantizes the GGUF to float32. This project, on one
CPU device, decodes with the file's own Q4_1/Q8_0 blocks through its CPU
kernels (`--cpu_kernels=auto`, the library's default; the numbers are the
same, read in 5-8.5 bits instead of 32), or with the float32 parameters
(`--cpu_kernels=off`). Both sides compute in float32.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags

from search_r3_jax.benchmarks.common import left_pad
from search_r3_jax.benchmarks.common import median_time
from search_r3_jax.benchmarks.common import torch_device
from search_r3_jax.benchmarks.common import torch_flags
from search_r3_jax.core import kernels

QUICK = flags.DEFINE_bool("quick", False, "16 new tokens, one timed repeat.")
NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens per prompt.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype of this project's model.",
)
TORCH_DEVICE, SKIP_TORCH = torch_flags()
CPU_KERNELS = flags.DEFINE_enum(
    "cpu_kernels",
    "auto",
    list(kernels.FLAG_VALUES),
    "Decode with the GGUF's blocks on the CPU kernels (auto: where they "
    "apply) or with float32 weights (off).",
)

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the capital of Japan and what is it known for?",
    "Give three tips for learning a new language.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a refrigerator keep food cold?",
    "List some uses of machine learning in medicine.",
    "Describe the water cycle to a ten-year-old.",
]
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95)


def bench_ours(prompts, new_tokens, repeats):
  from flax import nnx
  import jax

  from search_r3_jax import SearchR3
  from search_r3_jax.core import model as model_lib

  m = SearchR3.from_pretrained(
      "smollm2-135m",
      compute_dtype=DTYPE.value,
      cpu_kernels=kernels.FLAG_VALUES[CPU_KERNELS.value],
  )
  run = lambda seed: m.generate_ids(
      prompts, max_new_tokens=new_tokens, stop_ids=(), seed=seed, **SAMPLING
  )
  t = time.perf_counter()
  gen = run(0)
  compile_s = time.perf_counter() - t
  assert (gen.lengths == new_tokens).all()
  seeds = iter(range(1, 1000))
  gen_s = median_time(lambda: run(next(seeds)), repeats)[0]

  # Prefill: the cache-filling forward over the padded prompts plus the
  # last position's logits, as generation runs it.
  ids, mask = left_pad(prompts, m.tokenizer.pad_id)
  graphdef, state = nnx.split(m.model)

  @jax.jit
  def prefill(state, ids, mask):
    model = nnx.merge(graphdef, state)
    pos = jax.numpy.maximum(jax.numpy.cumsum(mask, -1) - 1, 0)
    cache = model_lib.KVCache.zeros(model.cfg, ids.shape[0], ids.shape[1])
    _, hidden, cache = model(
        ids, pos, mask.astype(bool), cache, 0, return_logits=False
    )
    return model.logits_from_hidden(hidden[:, -1:]), cache

  args = (
      state,
      jax.numpy.asarray(ids, jax.numpy.int32),
      jax.numpy.asarray(mask),
  )
  jax.block_until_ready(prefill(*args))
  pre_s = median_time(lambda: jax.block_until_ready(prefill(*args)), repeats)[0]
  return dict(
      gen_s=gen_s,
      compile_s=compile_s,
      prefill_s=pre_s,
      prefill_tokens=int(ids.size),
      sample=m.tokenizer.decode(gen.tokens[0][:24]),
      weights=(
          "GGUF Q4_1/Q8_0 blocks, CPU kernels"
          if m.quantized is not None
          else f"dequantized to {m.cfg.param_dtype}"
      ),
  )


def bench_torch(prompts, pad_id, new_tokens, repeats, device):
  import torch

  from search_r3_jax.benchmarks.torch_ref import load_torch_gguf

  torch.set_num_threads(os.cpu_count() or 1)
  model = load_torch_gguf().to(device)
  ids, mask = left_pad(prompts, pad_id)
  ids, mask = torch.tensor(ids, device=device), torch.tensor(
      mask, device=device
  )
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None

  def run(n):
    with torch.no_grad():
      out = model.generate(
          input_ids=ids,
          attention_mask=mask,
          do_sample=True,
          max_new_tokens=n,
          min_new_tokens=n,
          pad_token_id=pad_id,
          **SAMPLING,
      )
    sync()
    assert out.shape[1] == ids.shape[1] + n
    return out

  run(4)  # warm-up
  gen_s = median_time(lambda: run(new_tokens), repeats)[0]

  def prefill():
    with torch.no_grad():
      model(
          input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1
      )
    sync()

  prefill()
  pre_s = median_time(prefill, repeats)[0]
  return dict(gen_s=gen_s, prefill_s=pre_s, prefill_tokens=int(ids.numel()))


def main(argv):
  del argv
  new_tokens = 16 if QUICK.value else NEW_TOKENS.value
  repeats = 1 if QUICK.value else REPEATS.value
  from search_r3_jax.core.tokenizer import Tokenizer
  from search_r3_jax.core.weights.gguf import find_smollm2_gguf
  from search_r3_jax.core.weights.gguf import read_gguf

  ckpt = read_gguf(find_smollm2_gguf())
  tok = Tokenizer(
      ckpt.tokenizer,
      ckpt.chat_template,
      ckpt.eos_token,
      ckpt.bos_token,
      ckpt.pad_token,
  )
  prompts = [
      tok.encode(
          tok.apply_chat_template(
              [{"role": "user", "content": p}], add_generation_prompt=True
          )
      )
      for p in PROMPTS
  ]
  n_new = len(prompts) * new_tokens
  ours = bench_ours(prompts, new_tokens, repeats)
  print(
      f"ours : {n_new / ours['gen_s']:.1f} gen tok/s, "
      f"{ours['prefill_tokens'] / ours['prefill_s']:.0f} prefill tok/s "
      f"(compile {ours['compile_s']:.1f}s; weights: {ours['weights']}); "
      f"sample: {ours['sample']!r}"
  )
  result = {
      "benchmark": "generate",
      "quick": QUICK.value,
      "machine": f"{platform.machine()} {os.cpu_count()} cpu",
      "model": "smollm2-135m (GGUF: Q4_1 blocks, Q8_0 embedding)",
      "ours_weights": ours["weights"],
      "dtype": DTYPE.value,
      "prompts": len(prompts),
      "new_tokens": new_tokens,
      "sampling": SAMPLING,
      "ours_gen_tok_s": round(n_new / ours["gen_s"], 2),
      "ours_prefill_tok_s": round(
          ours["prefill_tokens"] / ours["prefill_s"], 1
      ),
      "ours_compile_s": round(ours["compile_s"], 2),
  }
  import jax

  result["jax_device"] = str(jax.devices()[0].device_kind)
  if not SKIP_TORCH.value:
    device = torch_device(TORCH_DEVICE.value)
    result["torch_device"] = device
    result["torch_weights"] = "dequantized to float32 by transformers"
    ref = bench_torch(prompts, tok.pad_id, new_tokens, repeats, device)
    print(
        f"torch: {n_new / ref['gen_s']:.1f} gen tok/s, "
        f"{ref['prefill_tokens'] / ref['prefill_s']:.0f} prefill tok/s"
    )
    result.update(
        {
            "torch_gen_tok_s": round(n_new / ref["gen_s"], 2),
            "torch_prefill_tok_s": round(
                ref["prefill_tokens"] / ref["prefill_s"], 1
            ),
            "gen_ratio": round(ref["gen_s"] / ours["gen_s"], 3),
            "prefill_ratio": round(ref["prefill_s"] / ours["prefill_s"], 3),
        }
    )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
