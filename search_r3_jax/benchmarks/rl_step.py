"""The stage-2 RL step: where its time goes, and rollout speed against torch.

    python -m search_r3_jax.benchmarks.rl_step          # 1 warm-up, 3 timed steps
    python -m search_r3_jax.benchmarks.rl_step --quick  # 1 warm-up, 1 timed step
    python -m search_r3_jax.benchmarks.rl_step --init_from=runs/sft

Part 1, the loop. `configs/rl.py` as `train` runs it (SmolLM2-135M from the
embedded GGUF with `<|embed_token|>` added, or the stage-1 model `init_from`
names; the config's Q queries x G rollouts per step and reasoning budget),
on an environment of `corpus_size` documents (the config's own, or 300
with `--quick`), encoded once with the starting parameters (no evaluation
runs). `Stage2.step` runs `warmup_steps` times untimed (they compile the
sampler, the forward, the GRPO step and the refresh encoder; their total
seconds are reported as `warmup_seconds`), then `steps` times timed. Each
step's phases are those `Stage2.step` measures:

  * rollout: Q * G samples of reasoning, each row stopping at an end of turn
    or at `<|embed_token|>` (`rollouts.sample`);
  * forward: the old log-probabilities and the embeddings of every rollout;
  * search_and_reward: index search, rewards, advantages, the auxiliary
    documents (`time_reward` in the training metrics);
  * update: the jitted GRPO step (`inner_epochs` of them);
  * refresh: the environment's selective re-encode with the new parameters.

Reported: the median of each phase and of the step over the timed steps,
and each phase's share of the timed steps' total time. Lengths are bucketed,
but a timed step can still meet a new shape (a longer prompt or response
bucket than the warm-up saw) and compile; `timed_compile_seconds` (XLA
backend compilations inside the timed steps) says when it did; raise
`--warmup_steps` if it is large.

Part 2, rollout tokens/s side by side. The prompts of the last timed step's
rollouts (Q * G rows, G copies of each query's reasoning prompt) are
generated from again by this project's sampler (`SearchR3.generate_ids` on
the current policy) and by transformers' `generate` on a torch model that
holds the same parameters (the policy after its updates, copied from ours:
see `torch_from_policy`; `torch_logits_max_abs_diff` checks the copy on one
prompt), with the config's sampling (temperature, top-p, no top-k).
The in-loop rollout stops rows early, so its rows differ in length; for equal
work both sides here produce exactly `max_new_tokens` tokens per row: ours
with no stop id (`stop_ids=()`), torch with `min_new_tokens=max_new_tokens`
(end-of-turn ids suppressed). Tokens/s is rows * max_new_tokens over the
median of `repeats` timed runs, after one full-length warm-up each (ours
compiles there; the same-shape run does not capture the embed token's hidden
state, since no row stops). Each side pads as it does by itself: ours rounds
the prompt length up to a multiple of 32, torch pads to the longest prompt.
The torch model samples over our padded vocabulary rows too (ours masks
them); the work per token is the same.

The in-loop figure (sampled tokens of the timed steps over their rollout
time, stop tokens counted, variable lengths, the embed-token capture
included) is reported separately as `in_loop_rollout_tokens_per_s`.

The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from search_r3_jax.benchmarks.common import left_pad
from search_r3_jax.benchmarks.common import median_time
from search_r3_jax.benchmarks.common import repo_config
from search_r3_jax.benchmarks.common import torch_device
from search_r3_jax.benchmarks.common import torch_flags

QUICK = flags.DEFINE_bool(
    "quick", False, "1 timed step, 1 repeat, a 300-document environment."
)
CONFIG_VARIANT = flags.DEFINE_string(
    "config_variant", "", "Variant of configs/rl.py (e.g. tiny)."
)
STEPS = flags.DEFINE_integer("steps", 3, "Timed loop steps (median).")
WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 1, "Untimed loop steps first (the first one compiles)."
)
REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed generation runs per side (median)."
)
CORPUS_SIZE = flags.DEFINE_integer(
    "corpus_size",
    None,
    "Environment documents (default: the config's, "
    "at most 300 with --quick).",
)
GROUP_SIZE = flags.DEFINE_integer(
    "group_size", None, "Rollouts per query (default: config)."
)
QUERIES = flags.DEFINE_integer(
    "queries_per_step", None, "Queries per step (default: config)."
)
MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Reasoning budget per rollout (default: config)."
)
REFRESH_EVERY = flags.DEFINE_integer(
    "refresh_every",
    1,
    "Environment refresh period in steps (1: every "
    "timed step refreshes; the training config's own period is coarser).",
)
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "A stage-1 workdir or checkpoint to start from "
    "(default: the base model).",
)
TORCH_DEVICE, SKIP_TORCH = torch_flags()

PHASES = (
    ("rollout", "time_rollout"),
    ("forward", "time_forward"),
    ("search_and_reward", "time_reward"),
    ("update", "time_update"),
    ("refresh", "time_refresh"),
)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileClock:
  """Sums XLA backend compile seconds while `active`."""

  def __init__(self):
    self.active, self.seconds, self.count = False, 0.0, 0

  def __call__(self, event, duration, **kwargs):
    del kwargs
    if self.active and event == _COMPILE_EVENT:
      self.seconds += float(duration)
      self.count += 1


def make_config():
  """configs/rl.py (`--config_variant`) with the benchmark's overrides."""
  cfg = repo_config("rl", CONFIG_VARIANT.value)
  corpus = CORPUS_SIZE.value
  if corpus is None:
    corpus = cfg.eval.corpus_size
    if QUICK.value:
      corpus = min(corpus or 300, 300)
  cfg.eval.corpus_size = corpus
  cfg.eval.at_start = False
  for flag, key in (
      (GROUP_SIZE, "group_size"),
      (QUERIES, "queries_per_step"),
      (MAX_NEW_TOKENS, "max_new_tokens"),
  ):
    if flag.value is not None:
      cfg.rl[key] = flag.value
  cfg.env.refresh_every = REFRESH_EVERY.value
  if INIT_FROM.value:
    cfg.init_from = INIT_FROM.value
  return cfg


def _steps() -> int:
  return 1 if QUICK.value else STEPS.value


def bench_loop(cfg, warmup_steps: int, steps: int) -> dict:
  """Builds the loop and its environment, runs untimed then timed steps."""
  import jax

  from search_r3_jax.training.stage2 import Stage2

  t = time.perf_counter()
  loop = Stage2(cfg)
  load_s = time.perf_counter() - t
  t = time.perf_counter()
  loop.build_env()
  env_s = time.perf_counter() - t
  print(
      f"loop ready in {load_s:.1f} s; environment of {len(loop.corpus)} "
      f"documents encoded in {env_s:.1f} s; {len(loop.stream.pairs)} "
      "training queries"
  )

  def check(values):
    if not (np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"])):
      raise FloatingPointError(f"non-finite update: {values}")

  t = time.perf_counter()
  for step in range(warmup_steps):
    v = loop.step(step, check)
    print(f"warm-up step {step}: {v['step_seconds']:.1f} s")
  warmup_s = time.perf_counter() - t

  clock = CompileClock()
  jax.monitoring.register_event_duration_secs_listener(clock)
  rows, last = [], None
  try:
    clock.active = True
    for step in range(warmup_steps, warmup_steps + steps):
      last = loop.run_step(step, check)
      rows.append(last.values)
      print(
          f"timed step {step}: {rows[-1]['step_seconds']:.1f} s, "
          f"{rows[-1]['rollout_tokens']:.0f} rollout tokens"
      )
  finally:
    clock.active = False
    jax.monitoring.unregister_event_duration_listener(clock)
  return dict(
      loop=loop,
      rows=rows,
      last=last,
      load_s=load_s,
      env_s=env_s,
      warmup_s=warmup_s,
      compile_s=clock.seconds,
      compiles=clock.count,
  )


def bench_ours_generate(loop, prompts, new_tokens: int, repeats: int) -> dict:
  """Full-length sampling of `prompts` by this project's sampler."""
  rl, m = loop.cfg.rl, loop.policy()
  run = lambda seed: m.generate_ids(
      prompts,
      max_new_tokens=new_tokens,
      temperature=rl.temperature,
      top_p=rl.top_p,
      seed=seed,
      stop_ids=(),
  )
  t = time.perf_counter()
  gen = run(0)
  compile_s = time.perf_counter() - t
  if not (gen.lengths == new_tokens).all():
    raise AssertionError(f"rows stopped early: lengths {gen.lengths}")
  seeds = iter(range(1, 1000))
  gen_s, times = median_time(lambda: run(next(seeds)), repeats)
  return dict(gen_s=gen_s, times=times, compile_s=compile_s)


def torch_from_policy(loop):
  """A float32 transformers model (eval mode) holding the current policy's
  parameters: its architecture from our `ModelConfig`, every tensor copied
  from ours (the inverse of `weights.convert`'s layout change), the padded
  vocabulary rows included."""
  import transformers

  from search_r3_jax.benchmarks.torch_ref import torch_model
  from search_r3_jax.core.weights import convert

  model = loop.policy().model()
  c = model.cfg
  common = dict(
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads,
      rope_theta=c.rope_theta,
      rms_norm_eps=c.rms_norm_eps,
      tie_word_embeddings=c.tie_word_embeddings,
      max_position_embeddings=c.max_position_embeddings,
      hidden_act="silu",
  )
  if c.arch == "llama":
    config = transformers.LlamaConfig(
        head_dim=c.head_dim,
        attention_bias=c.attention_bias,
        mlp_bias=False,
        **common,
    )
  elif c.arch == "qwen2":
    if c.head_dim * c.num_heads != c.hidden_size:
      raise ValueError(
          "Qwen2 in transformers derives head_dim from "
          f"hidden_size / heads; ours is {c.head_dim}"
      )
    config = transformers.Qwen2Config(**common)
  else:
    raise ValueError(f"no torch reference for architecture {c.arch!r}")
  return torch_model(
      config, convert.hf_tensors(model), source="policy -> torch"
  )


def bench_torch(
    loop, prompts, new_tokens: int, repeats: int, device: str
) -> dict:
  """transformers `generate` on the same parameters and prompts."""
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  tok, rl = loop.tokenizer, loop.cfg.rl
  model = torch_from_policy(loop)

  # The copy must compute what ours does: logits of the first prompt.
  probe = np.asarray([prompts[0]], np.int64)
  want = loop.policy().logits(probe)
  with torch.no_grad():
    got = model(torch.from_numpy(probe)).logits.float().numpy()
  diff = float(np.abs(got - want).max())
  print(f"torch copy of the policy: max |logit difference| {diff:.2e}")
  if not diff < 1e-2:
    raise AssertionError(
        f"the torch model's logits differ from ours by "
        f"{diff}: the parameter copy is wrong"
    )

  model = model.to(device)
  ids, mask = left_pad(prompts, tok.pad_id)
  ids = torch.tensor(ids, device=device)
  mask = torch.tensor(mask, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None

  def run(n):
    with torch.no_grad():
      out = model.generate(
          input_ids=ids,
          attention_mask=mask,
          do_sample=True,
          temperature=rl.temperature,
          top_p=rl.top_p,
          top_k=0,
          max_new_tokens=n,
          min_new_tokens=n,
          pad_token_id=tok.pad_id,
          eos_token_id=list(tok.eos_ids),
      )
    sync()
    if out.shape[1] != ids.shape[1] + n:
      raise AssertionError(
          f"torch generated {out.shape[1] - ids.shape[1]} "
          f"tokens, {n} expected"
      )
    return out

  t = time.perf_counter()
  run(new_tokens)  # warm-up, the same work as a timed run
  warmup_s = time.perf_counter() - t
  gen_s, times = median_time(lambda: run(new_tokens), repeats)
  return dict(
      gen_s=gen_s, times=times, warmup_s=warmup_s, logits_max_abs_diff=diff
  )


def main(argv):
  del argv
  import jax

  steps = _steps()
  repeats = 1 if QUICK.value else REPEATS.value
  warmup_steps = WARMUP_STEPS.value
  if steps < 1 or repeats < 1 or warmup_steps < 0:
    raise app.UsageError(
        "--steps and --repeats must be >= 1, " "--warmup_steps >= 0"
    )
  cfg = make_config()
  rl = cfg.rl
  q, g, new_tokens = (
      int(rl.queries_per_step),
      int(rl.group_size),
      int(rl.max_new_tokens),
  )
  init = cfg.init_from or (
      f"random {cfg.model} ({dict(cfg.random_init)})"
      if cfg.random_init
      else f"{cfg.model} (base, from the embedded GGUF)"
  )
  print(
      f"stage 2 on {init}: {q} queries x {g} rollouts, {new_tokens} new "
      f"tokens at most, environment of {cfg.eval.corpus_size or 'all'} "
      f"documents; {warmup_steps} warm-up + {steps} timed steps"
  )

  res = bench_loop(cfg, warmup_steps, steps)
  loop, rows = res["loop"], res["rows"]
  med = {name: statistics.median(r[key] for r in rows) for name, key in PHASES}
  totals = {name: sum(r[key] for r in rows) for name, key in PHASES}
  step_total = sum(r["step_seconds"] for r in rows)
  fractions = {name: totals[name] / step_total for name, _ in PHASES}
  step_s = statistics.median(r["step_seconds"] for r in rows)
  loop_tokens = sum(r["rollout_tokens"] for r in rows)
  loop_tok_s = loop_tokens / max(totals["rollout"], 1e-9)

  print(f"\n{'phase':<20}{'median s':>10}{'share':>9}")
  for name, _ in PHASES:
    print(f"{name:<20}{med[name]:>10.3f}{fractions[name]:>9.1%}")
  print(f"{'step':<20}{step_s:>10.3f}{1:>9.1%}")
  print(
      f"warm-up ({warmup_steps} step(s), compiles): {res['warmup_s']:.1f} s;"
      f" compiles inside the timed steps: {res['compiles']} "
      f"({res['compile_s']:.1f} s)"
  )
  print(
      f"in-loop rollout: {loop_tokens:.0f} tokens in "
      f"{totals['rollout']:.2f} s = {loop_tok_s:.1f} tok/s (rows stop at "
      "eos / the embed token)"
  )

  prompts = [list(p) for p in res["last"].rollouts.prompts]
  work = len(prompts) * new_tokens
  ours = bench_ours_generate(loop, prompts, new_tokens, repeats)
  ours_tok_s = work / ours["gen_s"]
  print(
      f"\nsame-shape rollout: {len(prompts)} rows x {new_tokens} tokens, "
      "no early stop"
  )
  print(
      f"ours : {ours_tok_s:.1f} tok/s ({ours['gen_s']:.2f} s; compile "
      f"{ours['compile_s']:.1f} s)"
  )

  last = rows[-1]
  backend = jax.default_backend()
  result = {
      "benchmark": "rl_step",
      "quick": QUICK.value,
      "machine": f"{platform.machine()} {os.cpu_count()} cpu",
      "jax_backend": backend,
      "jax_device": str(jax.devices()[0].device_kind),
      "jax_devices": jax.device_count(),
      "model": init,
      "config_variant": CONFIG_VARIANT.value,
      "dtype": cfg.compute_dtype,
      "config": {
          "queries_per_step": q,
          "group_size": g,
          "rows": q * g,
          "max_new_tokens": new_tokens,
          "temperature": float(rl.temperature),
          "top_p": float(rl.top_p),
          "corpus_size": len(loop.corpus),
          "env_engine": loop.env_cfg.engine,
          "refresh_every": loop.env_cfg.refresh_every,
          "inner_epochs": int(rl.inner_epochs),
          "init": cfg.init_from or "base",
      },
      "warmup_steps": warmup_steps,
      "timed_steps": steps,
      "setup_seconds": round(res["load_s"], 2),
      "env_build_seconds": round(res["env_s"], 2),
      "warmup_seconds": round(res["warmup_s"], 2),
      "timed_compile_seconds": round(res["compile_s"], 2),
      "timed_compiles": res["compiles"],
      "phase_seconds": {k: round(v, 4) for k, v in med.items()},
      "phase_fractions": {k: round(v, 4) for k, v in fractions.items()},
      "step_seconds": round(step_s, 4),
      "step_times_s": [round(r["step_seconds"], 3) for r in rows],
      "in_loop_rollout_tokens": int(loop_tokens),
      "in_loop_rollout_tokens_per_s": round(loop_tok_s, 2),
      "same_shape_rows": len(prompts),
      "same_shape_tokens": work,
      "rollout_tokens_per_s": round(ours_tok_s, 2),
      "rollout_seconds": round(ours["gen_s"], 4),
      "rollout_compile_seconds": round(ours["compile_s"], 2),
      "repeats": repeats,
      "reward_mean": round(float(np.mean([r["reward_mean"] for r in rows])), 4),
      "embed_rate": round(float(np.mean([r["embed_rate"] for r in rows])), 4),
      "refresh_reencoded": int(last.get("refresh_reencoded", 0)),
  }
  if not SKIP_TORCH.value:
    device = torch_device(TORCH_DEVICE.value)
    ref = bench_torch(loop, prompts, new_tokens, repeats, device)
    torch_tok_s = work / ref["gen_s"]
    print(
        f"torch: {torch_tok_s:.1f} tok/s ({ref['gen_s']:.2f} s; warm-up "
        f"{ref['warmup_s']:.1f} s)"
    )
    print(f"ratio (ours / torch): {ours_tok_s / torch_tok_s:.3f}")
    result.update(
        {
            "torch_device": device,
            "torch_threads": os.cpu_count(),
            "torch_tokens_per_s": round(torch_tok_s, 2),
            "torch_seconds": round(ref["gen_s"], 4),
            "torch_warmup_seconds": round(ref["warmup_s"], 2),
            "torch_logits_max_abs_diff": float(
                f"{ref['logits_max_abs_diff']:.3e}"
            ),
            "ratio": round(ours_tok_s / torch_tok_s, 3),
        }
    )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
