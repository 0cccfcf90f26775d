"""Decoder benchmark: KV-cached sampler throughput and chunked vs naive log-prob memory (150k vocabulary).

    .venv/bin/python benchmarks/bench_decoder.py                  # CPU preset (small model, vocab 151936)
    python benchmarks/bench_decoder.py --preset gpu               # Qwen3-0.6B-shaped model in bfloat16
    .venv/bin/python benchmarks/bench_decoder.py --vs-transformers  # ours vs transformers `generate`, same process

Measures, on a randomly initialised model (weights do not matter for speed or memory):
  * sampler: tokens/s of `generate` (prefill + lax.while_loop decode, no EOS so every row makes
    `new_tokens` tokens), after a warm-up call that compiles; compile time reported separately;
  * log-probs: temp memory of `value_and_grad(sum(token_logprobs))` w.r.t. all parameters, chunked vs
    naive (full [B, T, V] float32 logits + log_softmax), from XLA's compiled memory analysis; on GPU also
    the measured peak device memory of each and its step time.
Prints a Markdown table with the machine description (and optionally writes JSON).

`--vs-transformers` instead runs our sampler and transformers `generate` in one process on one random Llama
saved by transformers (4 layers, hidden 256, vocab 8192; batch 16, 32-token prompts, 96 new tokens, no EOS),
per mode (greedy, temperature 1, top-p 0.95; transformers with top_k=0 so both sample the same distribution),
for our fast sampler and the previous sorted/Gumbel one (`sampler="reference"`); the prefill work with shared
prompts (G = 8 rows per prompt: one prefill row per prompt); and a roofline of one decode step: XLA's
cost analysis (FLOPs, bytes) against the FLOP/s of a plain matmul and the bandwidth of a large copy measured
on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import CausalLM, DecoderConfig, SamplingConfig, make_generate_fn, token_logprobs  # noqa: E402

PRESETS = {
    # A small body with the real Qwen vocabulary so the output projection dominates as in real RL.
    "cpu": dict(model=dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, model_type="qwen3",
                           qk_norm=True, tie_word_embeddings=True),
                dtype="float32", batch=4, prompt_len=32, new_tokens=32, lp_batch=4, lp_len=1024, chunk=256),
    # Qwen3-0.6B shapes (596M parameters with tied embeddings).
    "gpu": dict(model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, model_type="qwen3",
                           qk_norm=True, tie_word_embeddings=True),
                dtype="bfloat16", batch=64, prompt_len=128, new_tokens=256, lp_batch=8, lp_len=2048, chunk=1024),
}


def machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  import flax
  return (f"{dev.platform.upper()} {kind} x{jax.device_count()}, {os.cpu_count()} CPU cores, "
          f"{platform.machine()}, jax {jax.__version__}, flax {flax.__version__}")


def build_model(cfg: DecoderConfig, seed: int = 0) -> CausalLM:
  """Random weights drawn with numpy on the host (an XLA-compiled random init of a 28-layer model compiles
  for minutes on GPU), N(0, 0.02) like HF's init; norms 1, biases 0."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = str(path[-1].key)
    if name == "weight":
      v = np.ones(x.shape, np.float32)
    elif name == "bias":
      v = np.zeros(x.shape, np.float32)
    else:
      v = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(cfg.initializer_range)
    return jax.device_put(v.astype(x.dtype))

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_sampler(model, batch, prompt_len, new_tokens, repeats, **sampling):
  graphdef, state = nnx.split(model)
  fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=new_tokens, **sampling)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, prompt_len)), jnp.int32)
  mask = jnp.asarray(np.arange(prompt_len)[None, :] >= rng.integers(0, prompt_len // 2, (batch, 1)))
  start = time.perf_counter()
  out = fn(state, tokens, mask, jax.random.key(0))
  jax.block_until_ready(out.tokens)
  compile_s = time.perf_counter() - start
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    out = fn(state, tokens, mask, jax.random.key(i + 1))
    jax.block_until_ready(out.tokens)
    times.append(time.perf_counter() - start)
  generated = int(np.asarray(out.lengths).sum())
  best = float(np.median(times))
  return dict(compile_s=compile_s, seconds=best, tokens=generated, tokens_per_s=generated / best)


def bench_logprobs(model, batch, length, chunk, measure_runtime: bool, remat: bool = True):
  graphdef, state = nnx.split(model, nnx.Param)
  if remat:  # per-layer gradient checkpointing, as an RL trainer uses for long sequences (same parameters)
    cfg = model.config.replace(remat=True)
    graphdef = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, length)), jnp.int32)
  mask = jnp.ones((batch, length), bool)

  def chunked(state):
    return jnp.sum(token_logprobs((graphdef, state), tokens, mask, chunk_size=chunk))

  def naive(state):
    logits = nnx.merge(graphdef, state)(tokens, attention_mask=mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  results = {}
  for name, fn in (("chunked", chunked), ("naive", naive)):  # chunked first: the peak counter only grows
    compiled = jax.jit(jax.value_and_grad(fn)).lower(state).compile()
    analysis = compiled.memory_analysis()
    row = dict(temp_bytes=analysis.temp_size_in_bytes, arg_bytes=analysis.argument_size_in_bytes,
               out_bytes=analysis.output_size_in_bytes)
    if measure_runtime:
      jax.block_until_ready(compiled(state))
      start = time.perf_counter()
      for _ in range(3):
        jax.block_until_ready(compiled(state))
      row["seconds"] = (time.perf_counter() - start) / 3
      row["peak_bytes"] = peak_bytes()
    results[name] = row
  return results


# ---------------------------------------------------------------------------------------------------------
# Ours vs transformers `generate`
# ---------------------------------------------------------------------------------------------------------
HF_MODES = (("greedy", dict(greedy=True), dict(do_sample=False)),
            ("temperature 1", dict(temperature=1.0), dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)),
            ("top-p 0.95", dict(temperature=1.0, top_p=0.95), dict(do_sample=True, temperature=1.0, top_k=0,
                                                                      top_p=0.95)))


def _median_time(fn, repeats):
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    fn(i)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)))


def machine_peaks(repeats: int = 5) -> dict:
  """FLOP/s of a plain float32 matmul and bytes/s of a large copy (read + write) as XLA runs them here."""
  n = 1024
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  t_mm = min(_median_time(lambda i: jax.block_until_ready(mm(a, a)), repeats)[1])
  big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
  cp = jax.jit(lambda x: x * 2.0)
  jax.block_until_ready(cp(big))
  t_cp = min(_median_time(lambda i: jax.block_until_ready(cp(big)), repeats)[1])
  return dict(flops_per_s=2 * n**3 / t_mm, bytes_per_s=2 * big.nbytes / t_cp)


def bench_vs_transformers(args) -> dict:
  import tempfile
  import torch
  import transformers
  from adrpo_jax.models.llm import load_pretrained
  from adrpo_jax.models.llm.sampler import _last_logits, _prefill, _select

  b, p, n, v = args.batch or 16, args.prompt_len or 32, args.new_tokens or 96, 8192
  hf_cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=256, intermediate_size=1024,
                                    num_hidden_layers=args.layers or 4, num_attention_heads=4,
                                    num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  tmp = tempfile.mkdtemp(prefix="bench_decoder_")
  hf.save_pretrained(tmp)
  model = load_pretrained(tmp)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, v, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  tokens_j, mask_j = jnp.asarray(prompts), jnp.asarray(mask)
  tokens_t, mask_t = torch.tensor(prompts, dtype=torch.long), torch.ones((b, p), dtype=torch.long)
  print(f"# load average {os.getloadavg()[0]:.1f} at the start", flush=True)
  print(f"# vs transformers {transformers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads): Llama {hf_cfg.num_hidden_layers} layers, hidden 256, vocab {v}; batch {b}, prompt {p}, "
        f"{n} new tokens, no EOS", flush=True)

  results = {}
  default_threads = torch.get_num_threads()
  thread_counts = list(dict.fromkeys((default_threads, 1)))
  for label, ours_kw, hf_kw in HF_MODES:
    row = {}

    def hf_runner(threads, hf_kw=hf_kw):
      def run(i):
        torch.set_num_threads(threads)
        torch.manual_seed(i)
        with torch.inference_mode():
          out = hf.generate(input_ids=tokens_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=None, pad_token_id=0, **hf_kw)
        torch.set_num_threads(default_threads)
        assert out.shape == (b, p + n), out.shape
      return run

    # torch's default thread count and 1 thread (on a loaded machine OpenMP barriers can make the default
    # several times slower); the ratio uses the faster of the two, the conservative choice.
    runners = {f"transformers_{t}threads": hf_runner(t) for t in thread_counts}
    for sampler in ("reference", "fast"):
      fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=n, sampler=sampler, **ours_kw)))
      start = time.perf_counter()
      out = jax.block_until_ready(fn(state, tokens_j, mask_j, jax.random.key(0)))
      row[f"{sampler}_compile_s"] = time.perf_counter() - start
      assert int(out.lengths.sum()) == b * n
      runners[sampler] = (lambda i, fn=fn: jax.block_until_ready(
          fn(state, tokens_j, mask_j, jax.random.key(i + 1)).tokens))
    for name, run in runners.items():
      if name.startswith("transformers"):
        run(0)  # warm-up
    # Interleaved repeats: on a shared machine every contender sees the same load over time.
    times = {name: [] for name in runners}
    for i in range(args.repeats):
      for name, run in runners.items():
        start = time.perf_counter()
        run(i)
        times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
      row[f"{name}_s"] = float(np.median(ts))
    row["transformers_s"] = min(row[f"transformers_{t}threads_s"] for t in thread_counts)
    for sampler in ("reference", "fast"):
      row[f"{sampler}_ratio"] = row["transformers_s"] / row[f"{sampler}_s"]
    results[label] = row
    print(f"# {label}: {row}", flush=True)

  # Shared prompts: b rows = b / G prompts x G; one prefill row per prompt.
  g = 8
  shared_prompts = np.repeat(prompts[: b // g], g, axis=0)
  sj = jnp.asarray(shared_prompts)
  prefill = {}
  for gg in (1, g):
    cfg = SamplingConfig(max_new_tokens=n, temperature=1.0, prompt_group_size=gg)
    pre = jax.jit(lambda st, t, m, c=cfg: _prefill(nnx.merge(graphdef, st), t, m, p + n, c)[0])
    compiled = pre.lower(state, sj, mask_j).compile()
    jax.block_until_ready(compiled(state, sj, mask_j))
    sec = _median_time(lambda i: jax.block_until_ready(compiled(state, sj, mask_j)), args.repeats)[0]
    fn = jax.jit(make_generate_fn(graphdef, cfg))
    jax.block_until_ready(fn(state, sj, mask_j, jax.random.key(0)))
    total = _median_time(lambda i: jax.block_until_ready(fn(state, sj, mask_j, jax.random.key(i)).tokens),
                         args.repeats)[0]
    prefill[gg] = dict(_cost(compiled), prefill_s=sec, generate_s=total)
  results["shared_prompts"] = dict(group=g, unshared=prefill[1], shared=prefill[g],
                                   flops_ratio=prefill[1]["flops"] / max(prefill[g]["flops"], 1.0))
  print(f"# shared prompts G={g}: {results['shared_prompts']}", flush=True)

  # Roofline of one decode step (the while-loop body: one token through the model, logits, selection).
  _, cache = jax.jit(lambda st: _prefill(nnx.merge(graphdef, st), tokens_j, mask_j, p + n,
                                         SamplingConfig(max_new_tokens=n)))(state)
  peaks = machine_peaks()
  roof = {}
  for label, ours_kw, _ in HF_MODES:
    cfg = SamplingConfig(max_new_tokens=n, **ours_kw)

    def step(st, token, cache, key, cfg=cfg):
      m = nnx.merge(graphdef, st)
      hidden, cache = m.hidden_states(token[:, None], attention_mask=jnp.ones((b, 1), bool), cache=cache)
      return _select(_last_logits(m, hidden[:, 0]), key, cfg), cache

    compiled = jax.jit(step).lower(state, tokens_j[:, -1], cache, jax.random.key(0)).compile()
    c = _cost(compiled)
    bound = max(c["flops"] / peaks["flops_per_s"], c["bytes"] / peaks["bytes_per_s"])
    per_step = results[label]["fast_s"] / n
    roof[label] = dict(c, bound_s=bound, measured_step_s=per_step, distance=per_step / bound,
                       hf_step_s=results[label]["transformers_s"] / n)
  results["roofline"] = dict(peaks=peaks, steps=roof)
  print(f"# roofline: {results['roofline']}", flush=True)

  print(f"\n**Machine:** {machine()}; transformers {transformers.__version__}, torch {torch.__version__} "
        f"(best of {torch.get_num_threads()} and 1 threads); load average {os.getloadavg()[0]:.1f} at the end  ")
  print(f"**Model:** random Llama saved by transformers, {hf_cfg.num_hidden_layers} layers, hidden 256, "
        f"intermediate 1024, vocab {v}, float32. Batch {b}, {p}-token prompts, {n} new tokens, no EOS.\n")
  print("| mode | transformers (s) | ours before (s) | ours after (s) | before: x transformers | "
        "after: x transformers |")
  print("|---|---:|---:|---:|---:|---:|")
  for label, _, _ in HF_MODES:
    r = results[label]
    print(f"| {label} | {r['transformers_s']:.3f} | {r['reference_s']:.3f} | {r['fast_s']:.3f} | "
          f"{r['reference_ratio']:.2f}x | {r['fast_ratio']:.2f}x |")
  sp = results["shared_prompts"]
  print(f"\nShared prompts ({b // g} prompts x G={g} rows): prefill {sp['unshared']['flops'] / 1e9:.3f} -> "
        f"{sp['shared']['flops'] / 1e9:.3f} GFLOP ({sp['flops_ratio']:.1f}x less), prefill "
        f"{sp['unshared']['prefill_s'] * 1e3:.1f} -> {sp['shared']['prefill_s'] * 1e3:.1f} ms, whole generate "
        f"{sp['unshared']['generate_s']:.3f} -> {sp['shared']['generate_s']:.3f} s\n")
  print(f"Roofline of one decode step (XLA cost analysis) vs this machine: matmul "
        f"{peaks['flops_per_s'] / 1e9:.1f} GFLOP/s, copy {peaks['bytes_per_s'] / 1e9:.1f} GB/s\n")
  print("| mode | MFLOP / step | MB / step | bound (ms) | ours (ms / step) | ours / bound | transformers "
        "(ms / step) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for label, r in roof.items():
    print(f"| {label} | {r['flops'] / 1e6:.1f} | {r['bytes'] / 1e6:.1f} | {r['bound_s'] * 1e3:.2f} | "
          f"{r['measured_step_s'] * 1e3:.2f} | {r['distance']:.1f}x | {r['hf_step_s'] * 1e3:.2f} |")
  return results


def gib(x):
  return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if jax.default_backend() == "gpu" else "cpu")
  for name in ("batch", "prompt_len", "new_tokens", "lp_batch", "lp_len", "chunk", "layers"):
    parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-remat", action="store_true", help="log-prob grads without per-layer remat")
  parser.add_argument("--skip-logprob-runtime", action="store_true",
                      help="only compile the log-prob functions (memory analysis), do not run them")
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")
  parser.add_argument("--vs-transformers", action="store_true",
                      help="only: ours (fast and reference sampler) vs transformers generate, shared prompts, "
                           "decode-step roofline (batch/prompt-len/new-tokens/layers default to 16/32/96/4)")
  args = parser.parse_args(argv)
  if args.vs_transformers:
    results = bench_vs_transformers(args)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(machine=machine(), vs_transformers=results), f, indent=2, default=str)
    return
  preset = dict(PRESETS[args.preset])
  for key in ("batch", "prompt_len", "new_tokens", "lp_batch", "lp_len", "chunk", "dtype"):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  model_kw = dict(preset["model"])
  if args.layers is not None:
    model_kw["num_hidden_layers"] = args.layers
  cfg = DecoderConfig(**model_kw, dtype=preset["dtype"], param_dtype=preset["dtype"])
  print(f"# bench_decoder: preset={args.preset}, {cfg.num_params() / 1e6:.1f}M params, vocab {cfg.vocab_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.dtype.name}\n# machine: {machine()}", flush=True)
  start = time.perf_counter()
  model = build_model(cfg)
  jax.block_until_ready(nnx.state(model))
  print(f"# init {time.perf_counter() - start:.1f}s", flush=True)

  measure = jax.default_backend() != "cpu" and not args.skip_logprob_runtime
  lp = bench_logprobs(model, preset["lp_batch"], preset["lp_len"], preset["chunk"], measure, not args.no_remat)
  print(f"# logprobs: {lp}", flush=True)
  b, p, n = preset["batch"], preset["prompt_len"], preset["new_tokens"]
  sampler_rows = []
  for label, kw in (("sampling T=1.0", dict(temperature=1.0)),
                    ("sampling T=1.0, top-k 50, top-p 0.95", dict(temperature=1.0, top_k=50, top_p=0.95)),
                    ("greedy", dict(greedy=True))):
    r = bench_sampler(model, b, p, n, args.repeats, **kw)
    sampler_rows.append((label, r))
    print(f"# sampler {label}: {r}", flush=True)

  full_logits = preset["lp_batch"] * (preset["lp_len"] - 1) * cfg.vocab_size * 4
  print(f"\n**Machine:** {machine()}  ")
  print(f"**Model:** {cfg.model_type}-shaped, {cfg.num_params() / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {cfg.dtype.name}\n")
  print(f"Sampler: batch {b}, prompt {p} (left-padded up to {p // 2}), {n} new tokens, KV cache {p + n} slots\n")
  print("| sampler | compile (s) | time (s) | tokens/s |")
  print("|---|---:|---:|---:|")
  for label, r in sampler_rows:
    print(f"| {label} | {r['compile_s']:.1f} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} |")
  print(f"\nLog-probs + grad w.r.t. all params{'' if args.no_remat else ' (per-layer remat)'}: batch "
        f"{preset['lp_batch']}, length {preset['lp_len']}, chunk {preset['chunk']} tokens; [B,T,V] float32 logits "
        f"alone = {gib(full_logits)}\n")
  print("| log-probs (value_and_grad) | XLA temp memory | measured peak | step (s) |")
  print("|---|---:|---:|---:|")
  for name in ("chunked", "naive"):
    r = lp[name]
    seconds = f"{r['seconds']:.3f}" if "seconds" in r else "n/a"
    print(f"| {name} | {gib(r['temp_bytes'])} | {gib(r.get('peak_bytes'))} | {seconds} |")
  ratio = lp["naive"]["temp_bytes"] / max(lp["chunked"]["temp_bytes"], 1)
  print(f"\nnaive / chunked temp memory: {ratio:.1f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=machine(), preset=args.preset, config=model_kw, dtype=cfg.dtype.name,
                     sampler=dict(sampler_rows), logprobs=lp, settings=preset | {"model": None}), f, indent=2,
                default=str)


if __name__ == "__main__":
  main()
