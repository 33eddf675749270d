"""Training, decoding and encoding throughput on whatever device JAX finds,
against transformers + torch on the same device where torch can use it.

    python -m search_r3_jax.benchmarks.accelerator --quick            # CPU: a few minutes
    python -m search_r3_jax.benchmarks.accelerator                    # GPU/TPU: the default sizes
    python -m search_r3_jax.benchmarks.accelerator --model=DIR --dtype=bfloat16

Three figures for one model (`--model`: a preset, HF directory or GGUF;
default the embedded SmolLM2-135M):

  * training tokens/s and MFU: AdamW steps of next-token cross-entropy over
    `--batch` rows of `--seq_len` tokens (stage 1's `sft` loss alone:
    the query rows' forward and backward, every position a target). MFU is
    6 * N * tokens/s over the device's peak: the vendor's dense bf16 figure
    for known GPUs and TPUs, or, on a CPU, a float32 matmul measured in the
    same run (reported as such);
  * decode tokens/s: `--batch` prompts sampled for exactly `--new_tokens`
    tokens with the KV cache (no early stop), after a warm-up;
  * encode documents/s: `encode_documents` over `--docs` documents of about
    `--seq_len` tokens.

The reference side runs the same work with transformers on the same token
ids (its model from the same file; the embedding grown to our padded
vocabulary with `<|embed_token|>`, new rows the mean as ours). Compilation
and warm-up are excluded and reported. One JSON line last.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags
import numpy as np

from search_r3_jax.benchmarks.common import median_time
from search_r3_jax.benchmarks.common import torch_device
from search_r3_jax.benchmarks.common import torch_flags

_QUICK = flags.DEFINE_bool(
    "quick", False, "Small sizes and one timed repeat (for a CPU)."
)
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Preset, HF dir or GGUF.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "float32", "bfloat16"],
    "Compute dtype (auto: bfloat16 on a GPU or TPU, float32 on a CPU).",
)
_BATCH = flags.DEFINE_integer("batch", 16, "Rows per training step / prompts.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per training row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Decoded per prompt.")
_DOCS = flags.DEFINE_integer("docs", 256, "Documents encoded.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_TORCH_DEVICE, _SKIP_TORCH = torch_flags()

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v4": 275e12,
    "TPU v6 lite": 918e12,
}

_WORDS = (
    "the river city north south old new king war music paper light stone "
    "field school bridge market winter summer island language history "
    "science story mountain garden train harbour museum"
).split()


def _text(rng, n_words: int) -> str:
  return " ".join(rng.choice(_WORDS, n_words))


def device_peak(device) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for `device`."""
  kind = str(device.device_kind)
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"{name} dense bf16 data sheet"
  import jax
  import jax.numpy as jnp

  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  s = median_time(lambda: f(a).block_until_ready(), 5)[0]
  return 2 * n**3 / s, f"float32 {n}^3 matmul measured on {kind}"


def training_rows(tok, batch: int, seq_len: int, seed: int = 0):
  """[batch, seq_len] int32 ids of chat rows, cut or padded to seq_len, and
  the mask of real tokens."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, seq_len), tok.pad_id, np.int32)
  for i in range(batch):
    row = tok.encode(_text(rng, seq_len))[:seq_len]
    ids[i, : len(row)] = row
  return ids


def bench_ours_train(m, ids, steps: int):
  import jax
  import ml_collections

  from search_r3_jax.training import stage1
  from search_r3_jax.training import train_state as ts

  b, t = ids.shape
  opt = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-5,
          warmup_steps=1,
          total_steps=1000,
          weight_decay=0.0,
          b1=0.9,
          b2=0.95,
          clip_norm=1.0,
          grad_accum_steps=1,
      )
  )
  tx, schedule = ts.make_optimizer(opt)
  graphdef, state, shardings = ts.create_train_state(
      m.model, tx, m.mesh, with_reference=False
  )
  loss_cfg = dict(weights=dict(sft=1.0), tau=0.05, margin=0.2, in_batch=True)
  step, batch_sh = stage1.make_sft_step(
      graphdef, tx, schedule, loss_cfg, m.mesh, shardings, batch_size=b
  )
  host = dict(
      q_tokens=ids,
      q_lengths=np.full((b,), t, np.int32),
      q_mask=np.ones((b, t), np.int32),
      q_kl_mask=np.zeros((b, t), np.int32),
      q_embed_pos=np.full((b,), t - 1, np.int32),
      d_tokens=np.zeros((b, 1, 8), np.int32),
      d_lengths=np.ones((b, 1), np.int32),
      d_groups=np.zeros((b, 1), np.int32),
  )
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch, rng)
  first_loss = float(metrics["loss"])

  def one():
    nonlocal state
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])

  step_s = median_time(one, steps)[0]
  return dict(step_s=step_s, compile_s=compile_s, first_loss=first_loss)


def bench_ours_decode(m, prompts, new_tokens: int, repeats: int):
  run = lambda seed: m.generate_ids(
      prompts,
      max_new_tokens=new_tokens,
      stop_ids=(),
      seed=seed,
      temperature=1.0,
  )
  t0 = time.perf_counter()
  gen = run(0)
  warm_s = time.perf_counter() - t0
  assert (np.asarray(gen.lengths) == new_tokens).all()
  seeds = iter(range(1, 1000))
  return dict(
      s=median_time(lambda: run(next(seeds)), repeats)[0], warm_s=warm_s
  )


def bench_ours_encode(m, docs, repeats: int, max_length: int):
  enc = lambda: m.encode_documents(
      docs, batch_size=32, max_length=max_length, progress=False
  )
  t0 = time.perf_counter()
  out = enc()
  warm_s = time.perf_counter() - t0
  return dict(s=median_time(enc, repeats)[0], warm_s=warm_s, emb=out)


def torch_reference(m, model_name: str, device: str):
  """transformers' model of the same file, its vocabulary grown to ours."""
  import torch

  if model_name == "smollm2-135m":
    from search_r3_jax.benchmarks.torch_ref import load_torch_gguf

    model = load_torch_gguf()
  else:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_name, torch_dtype=torch.float32
    )
  n_src = model.get_input_embeddings().weight.shape[0]
  if m.cfg.vocab_size > n_src:
    model.resize_token_embeddings(m.cfg.vocab_size)
    with torch.no_grad():
      w = model.get_input_embeddings().weight
      w[n_src:] = w[:n_src].mean(0)
      head = model.get_output_embeddings().weight
      if head.data_ptr() != w.data_ptr():
        head[n_src:] = head[:n_src].mean(0)
  return model.to(device)


def bench_torch(
    model, device, dtype, ids, prompts, pad_id, new_tokens, docs, repeats, steps
):
  import torch

  from search_r3_jax.benchmarks.common import left_pad

  torch.set_num_threads(os.cpu_count() or 1)
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  autocast = (
      torch.autocast(device_type=device, dtype=torch.bfloat16)
      if dtype == "bfloat16"
      else torch.autocast(device_type=device, enabled=False)
  )
  out = {}
  # Training: the same rows, next-token cross-entropy, AdamW.
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
  x = torch.tensor(ids, dtype=torch.long, device=device)

  def train_one():
    opt.zero_grad(set_to_none=True)
    with autocast:
      logits = model(input_ids=x).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sync()
    return loss.item()

  t0 = time.perf_counter()
  out["train_first_loss"] = train_one()
  out["train_warm_s"] = time.perf_counter() - t0
  out["train_step_s"] = median_time(train_one, steps)[0]
  model.eval()
  del opt
  # Decoding.
  p_ids, p_mask = left_pad(prompts, pad_id)
  p_ids = torch.tensor(p_ids, device=device)
  p_mask = torch.tensor(p_mask, device=device)

  def decode(n):
    with torch.no_grad(), autocast:
      g = model.generate(
          input_ids=p_ids,
          attention_mask=p_mask,
          do_sample=True,
          temperature=1.0,
          top_k=0,
          max_new_tokens=n,
          min_new_tokens=n,
          pad_token_id=pad_id,
      )
    sync()
    assert g.shape[1] == p_ids.shape[1] + n

  decode(4)
  out["decode_s"] = median_time(lambda: decode(new_tokens), repeats)[0]
  # Encoding: the same document rows (right-padded), the final hidden state
  # at each row's last token (`<|embed_token|>`).
  rows, lengths = docs

  def encode():
    embs = []
    with torch.no_grad(), autocast:
      for i in range(0, len(rows), 32):
        r, n = rows[i : i + 32], lengths[i : i + 32]
        t = torch.tensor(r, dtype=torch.long, device=device)
        mask = (
            torch.arange(t.shape[1], device=device)[None]
            < torch.tensor(n, device=device)[:, None]
        )
        h = model.model(input_ids=t, attention_mask=mask).last_hidden_state
        e = h[torch.arange(len(n)), torch.tensor(n, device=device) - 1]
        embs.append(torch.nn.functional.normalize(e.float(), dim=-1))
    sync()
    return torch.cat(embs).cpu().numpy()

  encode()
  out["encode_s"] = median_time(encode, repeats)[0]
  out["encode_emb"] = encode()
  return out


def main(argv):
  del argv
  import jax

  from search_r3_jax import SearchR3

  dev = jax.devices()[0]
  dtype = _DTYPE.value
  if dtype == "auto":
    dtype = "float32" if dev.platform == "cpu" else "bfloat16"
  quick = _QUICK.value
  batch = 4 if quick else _BATCH.value
  seq_len = 64 if quick else _SEQ_LEN.value
  new_tokens = 16 if quick else _NEW_TOKENS.value
  n_docs = 32 if quick else _DOCS.value
  repeats = 1 if quick else _REPEATS.value
  steps = 2 if quick else 5

  m = SearchR3.from_pretrained(
      _MODEL.value, compute_dtype=dtype, cpu_kernels=False
  )
  tok = m.tokenizer
  n_params = m.cfg.num_params()
  peak, peak_source = device_peak(dev)
  print(
      f"device: {len(jax.devices())} x {dev.device_kind} ({dev.platform}); "
      f"model {_MODEL.value} ({n_params:,} parameters), compute {dtype}; "
      f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})"
  )
  ids = training_rows(tok, batch, seq_len)
  rng = np.random.default_rng(1)
  prompts = [tok.encode(_text(rng, 12)) for _ in range(batch)]
  docs = [_text(rng, seq_len // 2) for _ in range(n_docs)]

  dec = bench_ours_decode(m, prompts, new_tokens, repeats)
  enc = bench_ours_encode(m, docs, repeats, seq_len)
  # Last: the train state is donated, and it holds the model's arrays.
  tr = bench_ours_train(m, ids, steps)
  train_tps = ids.size / tr["step_s"]
  result = dict(
      benchmark="accelerator",
      quick=quick,
      machine=f"{platform.machine()} {os.cpu_count()} cpu",
      device=f"{len(jax.devices())} x {dev.device_kind}",
      model=_MODEL.value,
      num_params=n_params,
      dtype=dtype,
      batch=batch,
      seq_len=seq_len,
      new_tokens=new_tokens,
      docs=n_docs,
      peak_flops=peak,
      peak_source=peak_source,
      ours_train_tokens_s=round(train_tps, 1),
      ours_mfu=round(6 * n_params * train_tps / peak, 4),
      ours_train_compile_s=round(tr["compile_s"], 1),
      ours_decode_tokens_s=round(batch * new_tokens / dec["s"], 1),
      ours_encode_docs_s=round(n_docs / enc["s"], 1),
  )
  print(
      f"ours : train {train_tps:.0f} tokens/s (MFU {result['ours_mfu']:.1%}), "
      f"decode {result['ours_decode_tokens_s']:.0f} tokens/s, encode "
      f"{result['ours_encode_docs_s']:.1f} docs/s"
  )
  if not _SKIP_TORCH.value:
    device = torch_device(_TORCH_DEVICE.value)
    rows = [
        tok.embedding_prompt(m.prompts, "document", d, max_text_tokens=seq_len)
        for d in docs
    ]
    width = max(len(r) for r in rows)
    padded = np.full((len(rows), width), tok.pad_id, np.int64)
    for i, r in enumerate(rows):
      padded[i, : len(r)] = r
    model = torch_reference(m, _MODEL.value, device)
    ref = bench_torch(
        model,
        device,
        dtype,
        ids,
        prompts,
        tok.pad_id,
        new_tokens,
        (padded, [len(r) for r in rows]),
        repeats,
        steps,
    )
    ref_tps = ids.size / ref["train_step_s"]
    cos = float(np.min(np.sum(ref["encode_emb"] * enc["emb"], -1)))
    result.update(
        torch_device=device,
        torch_train_tokens_s=round(ref_tps, 1),
        torch_mfu=round(6 * n_params * ref_tps / peak, 4),
        torch_decode_tokens_s=round(batch * new_tokens / ref["decode_s"], 1),
        torch_encode_docs_s=round(n_docs / ref["encode_s"], 1),
        train_ratio=round(train_tps / ref_tps, 3),
        decode_ratio=round(ref["decode_s"] / dec["s"], 3),
        encode_ratio=round(ref["encode_s"] / enc["s"], 3),
        first_loss_ours=round(tr["first_loss"], 5),
        first_loss_torch=round(ref["train_first_loss"], 5),
        min_embedding_cosine=round(cos, 5),
    )
    print(
        f"torch: train {ref_tps:.0f} tokens/s, decode "
        f"{result['torch_decode_tokens_s']:.0f} tokens/s, encode "
        f"{result['torch_encode_docs_s']:.1f} docs/s; ratios train "
        f"{result['train_ratio']}, decode {result['decode_ratio']}, encode "
        f"{result['encode_ratio']}; first loss ours {tr['first_loss']:.4f} "
        f"torch {ref['train_first_loss']:.4f}; embeddings agree to cosine "
        f">= {cos:.4f}"
    )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
