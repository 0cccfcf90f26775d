"""Decode-step time against this CPU's memory-bandwidth floor (MBU), layer scan vs unrolled, one process.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_decode_mbu.py --json mbu.json
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_decode_mbu.py --intermediate 768 --kv-heads 2

A random Llama (default 4 layers, hidden 256, MLP 1,024, 4 heads / 4 kv, vocab 8,192, untied, float32), B rows of
P prompt tokens, greedy, no stop token; single-threaded XLA (``--threads 0``: all cores). Per variant
(``SamplingConfig.unroll_layers``: ``scan`` = the layer `lax.scan`, ``unrolled`` = per-layer weights sliced once
per call), the jitted `make_generate_fn` runs N1 and N2 new tokens; the decode step's time is the difference over
N2 - N1 steps (the prefill cancels), in wall time (best of the rounds) and process CPU time (median: robust on a
loaded machine). The floor (`adrpo_jax.models.llm.roofline`): the weights and the mean filled KV cache of those
steps read once, at the copy bandwidth measured in the same run; MBU = floor / step time (best-of: the best copy
bandwidth over the best step; per round: each round's step against the bandwidth measured just before it, median). XLA's own byte count
of one compiled decode step (`make_plan_fns`' decode: the scanned program) is printed for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _threads(argv) -> str:
  for i, a in enumerate(argv):
    if a == "--threads" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith("--threads="):
      return a.split("=", 1)[1]
  return "1"


if __name__ == "__main__" and _threads(sys.argv[1:]) == "1":  # XLA's thread pool is fixed when jax starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _bench_utils import build_model, machine  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import DecoderConfig, SamplingConfig, make_generate_fn  # noqa: E402
from adrpo_jax.models.llm.roofline import compiled_bytes, decode_step_bytes, floor_seconds, measure_copy_bandwidth  # noqa: E402
from adrpo_jax.models.llm.sampler import make_plan_fns  # noqa: E402

VARIANTS = {"scan": False, "unrolled": True}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--intermediate", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--steps", default="32,96", help="N1,N2 new tokens: the step time is the difference / (N2 - N1)")
  ap.add_argument("--variants", default="scan,unrolled")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--json")
  args = ap.parse_args(argv)
  n1, n2 = (int(x) for x in args.steps.split(","))
  if not 0 < n1 < n2:
    raise ValueError(f"--steps={args.steps!r} must be N1,N2 with 0 < N1 < N2")
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"--variants: unknown {v!r}; use {sorted(VARIANTS)}")
  cfg = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads)
  model = build_model(cfg)
  graphdef, state = nnx.split(model)
  b, p = args.batch, args.prompt_len
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, args.vocab, (b, p)), jnp.int32)
  mask = jnp.ones((b, p), bool)
  fns = {}
  for v in variants:
    for n in (n1, n2):
      fn = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=n, greedy=True,
                                                             unroll_layers=VARIANTS[v])))
      compiled = fn.lower(state, tokens, mask, jax.random.key(0)).compile()
      jax.block_until_ready(compiled(state, tokens, mask, jax.random.key(0)))
      fns[(v, n)] = compiled
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  bandwidths = []
  for _ in range(args.rounds):
    bandwidths.append(measure_copy_bandwidth())
    for k, fn in fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(state, tokens, mask, jax.random.key(0)))
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  bandwidth = max(bandwidths)
  # steps n1 .. n2 - 1 attend over p + i filled slots (the decode step i writes slot p + i - 1)
  mean_slots = p + (n1 + n2 - 1) / 2.0
  step = decode_step_bytes(model, b, mean_slots)
  floor = floor_seconds(step["total"], bandwidth)
  prefill, decode = make_plan_fns(graphdef, SamplingConfig(max_new_tokens=n2, greedy=True))
  _, cache = jax.eval_shape(prefill, state, tokens, mask)
  xla_bytes = compiled_bytes(jax.jit(decode).lower(state, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), cache,
                                                   jax.random.key(0)).compile())
  result = dict(machine=machine(), args=vars(args), load=os.getloadavg(), copy_bandwidth_bytes_per_s=bandwidth,
                copy_bandwidth_all=bandwidths, step_bytes=step, floor_ms=floor * 1e3,
                xla_bytes_accessed_per_step=xla_bytes, params=int(sum(x.size for x in jax.tree.leaves(state))),
                variants={})
  for v in variants:
    w = (np.min(wall[(v, n2)]) - np.min(wall[(v, n1)])) / (n2 - n1)
    c = (np.median(cpu[(v, n2)]) - np.median(cpu[(v, n1)])) / (n2 - n1)
    rounds = [(a - b_) / (n2 - n1) for a, b_ in zip(wall[(v, n2)], wall[(v, n1)])]
    # each round against the copy bandwidth measured just before it (this VM's bandwidth varies by ~30 % over
    # a minute): robust to a slow round, unlike the best-of ratio
    paired = [floor_seconds(step["total"], bw) / r for bw, r in zip(bandwidths, rounds) if r > 0]
    result["variants"][v] = dict(step_ms_wall=w * 1e3, step_ms_cpu=c * 1e3, step_ms_rounds=[r * 1e3 for r in rounds],
                                 mbu_wall=floor / w if w > 0 else None, mbu_cpu=floor / c if c > 0 else None,
                                 mbu_rounds_median=float(np.median(paired)) if paired else None,
                                 mbu_rounds_quartiles=[float(q) for q in np.percentile(paired, [25, 75])]
                                 if paired else None)
  print(f"**Machine:** {result['machine']}; load {result['load']}  ")
  print(f"**Model:** {result['params'] / 1e6:.2f}M parameters ({args.layers} layers, hidden {args.hidden}, MLP "
        f"{args.intermediate}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}), float32, B={b}, P={p}, steps "
        f"{n1}..{n2}; copy bandwidth {bandwidth / 1e9:.2f} GB/s (best of {len(bandwidths)}); per step "
        f"{step['weights'] / 1e6:.1f} MB weights + {step['kv'] / 1e6:.2f} MB KV -> floor {floor * 1e3:.2f} ms; "
        f"XLA counts {xla_bytes / 1e6:.1f} MB accessed per (scanned) step\n")
  print("| variant | ms / step (wall, best) | ms / step (CPU, median) | MBU (wall) | MBU (CPU) | MBU per round, median "
        "[quartiles] |")
  print("|---|---:|---:|---:|---:|---:|")
  pct = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731 (None: a step difference <= 0, a noisy run)
  for v, r in result["variants"].items():
    q = r["mbu_rounds_quartiles"] or [None, None]
    print(f"| {v} | {r['step_ms_wall']:.2f} | {r['step_ms_cpu']:.2f} | {pct(r['mbu_wall'])} | {pct(r['mbu_cpu'])} | "
          f"{pct(r['mbu_rounds_median'])} [{pct(q[0])}, {pct(q[1])}] |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  main()
