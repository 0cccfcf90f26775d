"""Decoder benchmark: KV-cached sampler throughput and chunked vs naive log-prob memory (150k vocabulary).

    .venv/bin/python benchmarks/bench_decoder.py                  # CPU preset (small model, vocab 151936)
    python benchmarks/bench_decoder.py --preset gpu               # Qwen3-0.6B-shaped model in bfloat16

Measures, on a randomly initialised model (weights do not matter for speed or memory):
  * sampler: tokens/s of `generate` (prefill + lax.while_loop decode, no EOS so every row makes
    `new_tokens` tokens), after a warm-up call that compiles; compile time reported separately;
  * log-probs: temp memory of `value_and_grad(sum(token_logprobs))` w.r.t. all parameters, chunked vs
    naive (full [B, T, V] float32 logits + log_softmax), from XLA's compiled memory analysis; on GPU also
    the measured peak device memory of each and its step time.
Prints a Markdown table with the machine description (and optionally writes JSON).
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
  args = parser.parse_args(argv)
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
