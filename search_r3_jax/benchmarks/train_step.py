"""Stage-1 training throughput against transformers + torch, side by side.

    python -m search_r3_jax.benchmarks.train_step           # 8 examples, 5 steps
    python -m search_r3_jax.benchmarks.train_step --quick   # 4 examples, 2 steps

Both sides train SmolLM2-135M (fp32) on the same stage-1 loss: next-token
cross-entropy on the response, exact token-level KL to a frozen copy of the
initial model (no gradient), InfoNCE on cosine / tau with in-batch and hard
negatives, and a triplet margin on cosine distance, all weighted 1; AdamW with
global-norm clipping and the same learning-rate schedule. They read the same
numpy batch, built once by `sft.Batcher` from deterministic synthetic English
examples (query, positive, hard negatives).

Identical inputs, identical weights: our model adds `<|embed_token|>` and pads
the vocabulary to a multiple of 128 rows, every new row the mean of the
original ones (tied head, so the new logits are real softmax columns). The
torch model's embedding is grown the same way, so both compute softmaxes over
the same 49,280 columns and the first-step losses must agree (~1e-3 relative).

Tokens. One example is a query sequence (prompt + "The embedding is
<|embed_token|>." + end of turn) and K = 1 + num_negatives document
sequences. "Tokens" are the real (unpadded) tokens of all B * (1 + K)
sequences that go through forward and backward in a step
(`Batcher.tokens_per_batch`); padded tokens (B * (Tq + K * Td), what both
sides actually compute on) are reported too. The default shapes make the
padded tokens per step 8 * (48 + 2 * 104) = 2048, the DESIGN.md reference
setup's 8 x 256: one hard negative, so documents hold about 80 text tokens
(`--num_negatives=3 --doc_len=52` spends the same budget on more, shorter
documents). The reference model's forward (KL) is work on top and is not
counted as tokens. Model FLOP/s use the 6 * N * real-tokens rule with
N = `cfg.num_params()` (embedding included: tied, it is also the head).

Compilation (ours) and the first step (torch) are excluded from the step
times and reported separately. The last line printed is one JSON object.
"""

from __future__ import annotations

import copy
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

QUICK = flags.DEFINE_bool(
    "quick", False, "4 examples, 2 timed steps (about 2 minutes)."
)
EXAMPLES = flags.DEFINE_integer("examples", 8, "Examples per step (B).")
NUM_NEGATIVES = flags.DEFINE_integer(
    "num_negatives", 1, "Hard negatives per example."
)
QUERY_LEN = flags.DEFINE_integer("query_len", 48, "Query sequence length.")
DOC_LEN = flags.DEFINE_integer("doc_len", 104, "Document sequence length.")
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per side (median).")
TORCH_DEVICE, SKIP_TORCH = torch_flags()

LOSS_CFG = {
    "weights": {"sft": 1.0, "kl": 1.0, "infonce": 1.0, "triplet": 1.0},
    "tau": 0.05,
    "margin": 0.2,
    "in_batch": True,
}
OPT_CFG = dict(
    learning_rate=2e-5,
    warmup_steps=10,
    total_steps=1000,
    weight_decay=0.01,
    b1=0.9,
    b2=0.95,
    clip_norm=1.0,
    grad_accum_steps=1,
)
LOSS_NAMES = ("sft", "kl", "infonce", "triplet")

# -- synthetic examples --------------------------------------------------------

_NOUNS = [
    "bridge",
    "castle",
    "library",
    "cathedral",
    "harbour",
    "museum",
    "railway station",
    "university",
    "market hall",
    "theatre",
    "botanical garden",
    "lighthouse",
    "observatory",
    "city wall",
]
_PLACES = [
    "Lisbon",
    "Kyoto",
    "Oslo",
    "Cairo",
    "Lima",
    "Dublin",
    "Hanoi",
    "Quebec",
    "Nairobi",
    "Vienna",
    "Perth",
    "Bergen",
    "Porto",
    "Krakow",
]
_ADJS = [
    "old",
    "famous",
    "small",
    "northern",
    "medieval",
    "modern",
    "busy",
    "royal",
    "ancient",
    "eastern",
]
_BUILDERS = [
    "local merchants",
    "a French engineer",
    "the city council",
    "a group of monks",
    "a railway company",
    "the navy",
    "an Italian architect",
    "a wealthy banker",
    "the king",
]
_CENTURIES = [
    "twelfth",
    "fourteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
    "twentieth",
]
_EVENTS = [
    "a great fire",
    "a flood",
    "an earthquake",
    "a long war",
    "a storm",
    "years of neglect",
]
_FILLER = [
    "Today it is one of the most visited places in the region.",
    "Its walls are made of grey stone brought from a quarry nearby.",
    "Local guides tell many stories about the people who worked there.",
    "A small exhibition explains how the building changed over time.",
    "The surrounding streets are full of cafes, shops and old houses.",
    "Historians still argue about the exact date of its completion.",
    "Several paintings in the national gallery show it at sunset.",
    "Every summer a festival of music and dance is held in front of it.",
]
_QUESTIONS = [
    "When was the {adj} {noun} in {place} built, and by whom?",
    "Who built the {noun} of {place}?",
    "What happened to the {adj} {noun} in {place} after {event}?",
    "History of the {noun} in {place} built by {who}",
]


def _document(rng, noun, place):
  adj, who = rng.choice(_ADJS), rng.choice(_BUILDERS)
  century, event = rng.choice(_CENTURIES), rng.choice(_EVENTS)
  text = (
      f"The {adj} {noun} of {place} was built by {who} in the {century} "
      f"century. After {event} it was restored and opened to the public. "
  )
  text += " ".join(rng.choice(_FILLER, size=5, replace=False))
  return text, dict(adj=adj, noun=noun, place=place, who=who, event=event)


def synthetic_examples(n: int, num_negatives: int, seed: int = 0):
  """Deterministic stage-1 examples with hard negatives.

  The positive describes the queried (noun, place); the hard negatives share
  the noun or the place but not both, so they overlap the query lexically.
  Every other example is a reasoning query with a one-sentence analysis, so
  the KL (over analysis tokens only) has targets.
  """
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    noun, place = rng.choice(_NOUNS), rng.choice(_PLACES)
    positive, facts = _document(rng, noun, place)
    query = str(rng.choice(_QUESTIONS)).format(**facts)
    negatives = []
    for j in range(num_negatives):
      if j % 2 == 0:
        other = (noun, rng.choice([p for p in _PLACES if p != place]))
      else:
        other = (rng.choice([x for x in _NOUNS if x != noun]), place)
      negatives.append(_document(rng, *other)[0])
    ex = {
        "id": f"synthetic-{i}",
        "query": query,
        "positive": positive,
        "negatives": negatives,
    }
    if i % 2:
      ex["reasoning"] = f"The question is about the {noun} in {place}."
    out.append(ex)
  return out


# -- timing helpers ------------------------------------------------------------


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` fp32 n^3 matmul throughput of jitted JAX, GFLOP/s."""
  import jax
  import jax.numpy as jnp

  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  best = min(
      median_time(lambda: mm(a, b).block_until_ready(), 1)[0]
      for _ in range(repeats)
  )
  return 2 * n**3 / best / 1e9


def torch_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  import torch

  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(a, b)
  best = min(
      median_time(lambda: torch.matmul(a, b), 1)[0] for _ in range(repeats)
  )
  return 2 * n**3 / best / 1e9


# -- this project ---------------------------------------------------------------


def bench_ours(m, host_batch, steps):
  """Compiles and runs our step; returns timings and the per-step losses."""
  import jax
  import ml_collections

  from search_r3_jax.training import stage1 as sft
  from search_r3_jax.training import train_state as ts

  tx, schedule = ts.make_optimizer(ml_collections.ConfigDict(OPT_CFG))
  graphdef, state, shardings = ts.create_train_state(m.model, tx, m.mesh)
  b = host_batch["q_tokens"].shape[0]
  step, batch_sh = sft.make_sft_step(
      graphdef, tx, schedule, LOSS_CFG, m.mesh, shardings, batch_size=b
  )
  put = lambda: {
      k: jax.device_put(v, batch_sh[k]) for k, v in host_batch.items()
  }
  rng = jax.random.key(0)
  t = time.perf_counter()
  compiled = step.lower(state, put(), rng).compile()
  compile_s = time.perf_counter() - t

  history = []
  t = time.perf_counter()
  state, metrics = compiled(state, put(), rng)
  first = jax.device_get(metrics)
  first_step_s = time.perf_counter() - t
  history.append(float(first["loss"]))

  def one():
    nonlocal state
    state, metrics = compiled(state, put(), rng)
    history.append(metrics["loss"])
    jax.block_until_ready(metrics["loss"])

  step_s, times = median_time(one, steps)
  return dict(
      compile_s=compile_s,
      first_step_s=first_step_s,
      step_s=step_s,
      times=times,
      first={k: float(first[k]) for k in LOSS_NAMES},
      losses=[float(x) for x in history],
      schedule=schedule,
  )


# -- the transformers + torch reference ----------------------------------------


def _grow_vocab(model, vocab_size):
  """Pads the (tied) embedding to `vocab_size` rows, each the mean row."""
  import torch

  emb = model.get_input_embeddings().weight
  old = emb.shape[0]
  if vocab_size == old:
    return
  model.resize_token_embeddings(vocab_size, mean_resizing=False)
  with torch.no_grad():
    w = model.get_input_embeddings().weight
    w[old:] = w[:old].mean(0)
  if model.config.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == w.data_ptr(), "head not tied"


def _unit(x):
  return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def torch_losses(model, ref, batch, loss_cfg):
  """The stage-1 loss, written independently of `losses.py`."""
  import torch
  import torch.nn.functional as F

  q, q_len = batch["q_tokens"], batch["q_lengths"]
  b, t = q.shape
  q_attn = (torch.arange(t, device=q.device)[None] < q_len[:, None]).long()
  h = model.model(
      input_ids=q, attention_mask=q_attn, use_cache=False
  ).last_hidden_state
  logits = model.lm_head(h).float()
  q_emb = h[torch.arange(b), batch["q_embed_pos"]]

  d, d_len = batch["d_tokens"], batch["d_lengths"]
  _, k, td = d.shape
  flat, lengths = d.reshape(b * k, td), d_len.reshape(b * k)
  d_attn = (torch.arange(td, device=d.device)[None] < lengths[:, None]).long()
  dh = model.model(
      input_ids=flat, attention_mask=d_attn, use_cache=False
  ).last_hidden_state
  d_emb = dh[torch.arange(b * k), lengths - 1].reshape(b, k, -1)

  mask = batch["q_mask"][:, 1:].float()
  denom = mask.sum().clamp_min(1.0)
  logp = F.log_softmax(logits[:, :-1], -1)
  nll = -logp.gather(-1, q[:, 1:, None])[..., 0]
  sft = (nll * mask).sum() / denom

  with torch.no_grad():
    ref_h = ref.model(
        input_ids=q, attention_mask=q_attn, use_cache=False
    ).last_hidden_state
    logq = F.log_softmax(ref.lm_head(ref_h).float()[:, :-1], -1)
  kl_mask = batch["q_kl_mask"][:, 1:].float()
  kl = ((logp.exp() * (logp - logq)).sum(-1) * kl_mask).sum() / (
      kl_mask.sum().clamp_min(1.0)
  )

  qn, dn = _unit(q_emb.float()), _unit(d_emb.float())
  if loss_cfg["in_batch"]:
    scores = qn @ dn.reshape(b * k, -1).T / loss_cfg["tau"]
    target = torch.arange(b, device=q.device) * k
  else:
    scores = torch.einsum("bd,bkd->bk", qn, dn) / loss_cfg["tau"]
    target = torch.zeros(b, dtype=torch.long, device=q.device)
  infonce = F.cross_entropy(scores, target)
  dist = 1.0 - torch.einsum("bd,bkd->bk", qn, dn)
  triplet = F.relu(dist[:, :1] - dist[:, 1:] + loss_cfg["margin"]).mean()
  parts = dict(sft=sft, kl=kl, infonce=infonce, triplet=triplet)
  w = loss_cfg["weights"]
  return sum(w[n] * parts[n] for n in LOSS_NAMES), parts


def bench_torch(host_batch, vocab_size, lrs, steps, device):
  import torch

  from search_r3_jax.benchmarks.torch_ref import load_torch_gguf

  torch.set_num_threads(os.cpu_count() or 1)
  model = load_torch_gguf()
  _grow_vocab(model, vocab_size)
  model = model.to(device).train()
  ref = copy.deepcopy(model).eval().requires_grad_(False)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(
      [
          {
              "params": [p for p in params if p.ndim > 1],
              "weight_decay": OPT_CFG["weight_decay"],
          },
          {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
      ],
      lr=lrs[0],
      betas=(OPT_CFG["b1"], OPT_CFG["b2"]),
      eps=1e-8,
  )
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  history, it = [], iter(range(len(lrs)))

  def one():
    batch = {
        k: torch.from_numpy(v).to(device, torch.long)
        for k, v in host_batch.items()
    }
    opt.zero_grad(set_to_none=True)
    loss, parts = torch_losses(model, ref, batch, LOSS_CFG)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, OPT_CFG["clip_norm"])
    lr = lrs[next(it)]
    for g in opt.param_groups:
      g["lr"] = lr
    opt.step()
    sync()
    history.append(loss.item())
    return parts

  t = time.perf_counter()
  first = one()
  first_step_s = time.perf_counter() - t
  step_s, times = median_time(one, steps)
  return dict(
      first_step_s=first_step_s,
      step_s=step_s,
      times=times,
      first={k: v.item() for k, v in first.items()},
      losses=history,
  )


# -- main ------------------------------------------------------------------------


def main(argv):
  del argv
  import jax

  from search_r3_jax import SearchR3
  from search_r3_jax.training import stage1 as sft

  examples = 4 if QUICK.value else EXAMPLES.value
  steps = 2 if QUICK.value else STEPS.value
  m = SearchR3.from_pretrained("smollm2-135m")
  batcher = sft.Batcher(
      m.tokenizer,
      m.prompts,
      query_len=QUERY_LEN.value,
      doc_len=DOC_LEN.value,
      num_negatives=NUM_NEGATIVES.value,
  )
  host_batch = batcher(synthetic_examples(examples, NUM_NEGATIVES.value))
  real = batcher.tokens_per_batch(host_batch)
  padded = int(host_batch["q_tokens"].size + host_batch["d_tokens"].size)
  k = 1 + NUM_NEGATIVES.value
  print(
      f"batch: {examples} examples x (query {QUERY_LEN.value} + {k} docs x "
      f"{DOC_LEN.value}) = {padded} padded, {real} real tokens per step"
  )

  peak = matmul_peak_gflops(repeats=3 if QUICK.value else 5)
  print(f"fp32 matmul 2048^3 (jax): {peak:.1f} GFLOP/s")

  ours = bench_ours(m, host_batch, steps)
  n_params = m.cfg.num_params()
  ours_gflops = 6 * n_params * real / ours["step_s"] / 1e9
  print(
      f"ours : {ours['step_s']:.2f} s/step, {real / ours['step_s']:.1f} "
      f"tok/s, {ours_gflops:.1f} GFLOP/s (compile {ours['compile_s']:.1f} s)"
      f"; first-step losses {ours['first']}"
  )
  result = {
      "benchmark": "train_step",
      "quick": QUICK.value,
      "machine": f"{platform.machine()} {os.cpu_count()} cpu",
      "jax_device": str(jax.devices()[0].device_kind),
      "model": "smollm2-135m (GGUF Q4_1, dequantized to fp32)",
      "dtype": "float32",
      "num_params": n_params,
      "vocab_rows": m.cfg.vocab_size,
      "batch": {
          "examples": examples,
          "num_negatives": NUM_NEGATIVES.value,
          "docs_per_example": k,
          "query_len": QUERY_LEN.value,
          "doc_len": DOC_LEN.value,
          "sequences": examples * (1 + k),
      },
      "tokens_definition": "real = unpadded tokens of the query and document "
      "sequences per step (Batcher.tokens_per_batch); "
      "padded = B*(Tq+K*Td)",
      "real_tokens_per_step": real,
      "padded_tokens_per_step": padded,
      "losses": LOSS_CFG,
      "optimizer": OPT_CFG,
      "timed_steps": steps,
      "ours_step_s": round(ours["step_s"], 4),
      "ours_step_times_s": [round(x, 3) for x in ours["times"]],
      "ours_compile_s": round(ours["compile_s"], 2),
      "ours_first_step_s": round(ours["first_step_s"], 3),
      "ours_tokens_s": round(real / ours["step_s"], 2),
      "ours_padded_tokens_s": round(padded / ours["step_s"], 2),
      "matmul_peak_gflops": round(peak, 1),
      "ours_gflops": round(ours_gflops, 1),
      "peak_fraction": round(ours_gflops / peak, 3),
      "first_loss_ours": round(ours["losses"][0], 6),
      "first_parts_ours": {k: round(v, 6) for k, v in ours["first"].items()},
      "losses_ours": [round(x, 5) for x in ours["losses"]],
  }
  if not SKIP_TORCH.value:
    device = torch_device(TORCH_DEVICE.value)
    lrs = [float(ours["schedule"](i)) for i in range(steps + 1)]
    ref = bench_torch(host_batch, m.cfg.vocab_size, lrs, steps, device)
    torch_peak = torch_matmul_gflops(repeats=3) if device == "cpu" else None
    rel = abs(ref["losses"][0] - ours["losses"][0]) / abs(ref["losses"][0])
    print(
        f"torch: {ref['step_s']:.2f} s/step, {real / ref['step_s']:.1f} "
        f"tok/s (first step {ref['first_step_s']:.1f} s); first-step "
        f"losses {ref['first']}"
    )
    print(
        f"first-step loss: ours {ours['losses'][0]:.6f} torch "
        f"{ref['losses'][0]:.6f} (relative difference {rel:.2e}); last: "
        f"ours {ours['losses'][-1]:.6f} torch {ref['losses'][-1]:.6f}"
    )
    result.update(
        {
            "torch_device": device,
            "torch_threads": os.cpu_count(),
            "torch_step_s": round(ref["step_s"], 4),
            "torch_step_times_s": [round(x, 3) for x in ref["times"]],
            "torch_first_step_s": round(ref["first_step_s"], 3),
            "torch_tokens_s": round(real / ref["step_s"], 2),
            "torch_padded_tokens_s": round(padded / ref["step_s"], 2),
            "torch_gflops": round(6 * n_params * real / ref["step_s"] / 1e9, 1),
            "torch_matmul_gflops": (
                round(torch_peak, 1) if torch_peak else None
            ),
            "ratio": round(ref["step_s"] / ours["step_s"], 3),
            "first_loss_torch": round(ref["losses"][0], 6),
            "first_parts_torch": {
                k: round(v, 6) for k, v in ref["first"].items()
            },
            "first_loss_rel_diff": float(f"{rel:.3g}"),
            "losses_torch": [round(x, 5) for x in ref["losses"]],
        }
    )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
