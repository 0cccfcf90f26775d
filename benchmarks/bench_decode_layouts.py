"""Milliseconds per decode step of `make_generate_fn`, scanned (stacked layers, the default) vs list layout,
per attention implementation and cache length, in one process (issue 13: the scanned decoder's KV cache must
not be copied at every decode step; the list layout's per-layer caches never were).

Random Llama-shaped model (4 layers, hidden 256, intermediate 1024, 4 heads / 2 kv, head_dim 64, vocab 8192,
float32), batch 16, 32-token prompts, greedy, no EOS; jitted once per (layout, impl, length), best of
`--repeats` calls after a warm-up.

    python benchmarks/bench_decode_layouts.py --new-tokens 96,480,992
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adrpo_jax.models.llm import CausalLM, DecoderConfig, SamplingConfig, make_generate_fn


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--new-tokens", default="96,480", help="comma-separated completion lengths")
  ap.add_argument("--impls", default="xla,decode", help="comma-separated attention_impl values")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args(argv)

  rows = []
  toks = jnp.asarray(np.random.RandomState(0).randint(1, 8192, (args.batch, args.prompt_len)), jnp.int32)
  mask = jnp.ones(toks.shape, bool)
  for n in (int(x) for x in args.new_tokens.split(",")):
    for impl in args.impls.split(","):
      per_layout = {}
      for scan in (True, False):
        cfg = DecoderConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, scan_layers=scan,
                            attention_impl=impl)
        graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
        fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=n, greedy=True)))
        jax.block_until_ready(fn(state, toks, mask, jax.random.key(0)))
        times = []
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(state, toks, mask, jax.random.key(0)))
          times.append(time.perf_counter() - t0)
        per_layout[scan] = min(times) / n * 1e3
      rows.append((n, impl, per_layout[True], per_layout[False]))
      print(f"# {n} new tokens, {impl}: scan {per_layout[True]:.2f} ms/step, list {per_layout[False]:.2f}", flush=True)

  print(f"\nbatch {args.batch}, prompt {args.prompt_len}, greedy; jax {jax.__version__}, {jax.default_backend()}\n")
  print("| new tokens (cache slots) | attention_impl | scan (ms / step) | list (ms / step) | scan / list |")
  print("|---:|---|---:|---:|---:|")
  for n, impl, s, l in rows:
    print(f"| {n} ({args.prompt_len + n}) | {impl} | {s:.2f} | {l:.2f} | {s / l:.2f} |")


if __name__ == "__main__":
  main()
