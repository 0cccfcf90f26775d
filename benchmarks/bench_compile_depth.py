"""Compile time of `jit(value_and_grad(token_logprobs))` against depth, scan over layers vs a Python list of layers.

For each layout (`DecoderConfig.scan_layers` False / True, in the same process) and each depth, lowers and compiles
the gradient of the summed token log-probs w.r.t. all parameters (a fresh jit each time, so nothing is cached)
and prints the compile time (lower + compile, best of `--repeats`), the ratio deep / shallow per layout, and the
number of `while` loops in the optimized HLO. With the scan the compiled program has the same size at every depth,
so the ratio should stay near 1 (target <= 1.3x); with the list it grows with depth.

    python benchmarks/bench_compile_depth.py                       # 2 vs 16 layers, SmolLM2-like widths
    python benchmarks/bench_compile_depth.py --depths 2 8 16 --hidden 256 --remat
    python benchmarks/bench_compile_depth.py --lora-update --layouts scan   # SmolLM2-135M-shaped LoRA RL update

`--lora-update`: instead, the compile time of the trainer's jitted LoRA update (`make_rl_update`, all-linear
rank-16 adapters, AdamW, ADRPO) on a SmolLM2-135M-shaped decoder (30 layers, hidden 576, vocab 49,152, tied),
8 rows of 64 prompt + 128 completion tokens, for the layouts in `--layouts`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import CausalLM, DecoderConfig  # noqa: E402
from adrpo_jax.models.llm.logprobs import token_logprobs  # noqa: E402


def compile_seconds(cfg: DecoderConfig, batch: int, length: int, repeats: int = 1) -> tuple[float, int]:
  """Best-of-`repeats` lower + compile seconds of jit(value_and_grad(sum token_logprobs)), and the HLO's while
  loop count. The model is abstract (`nnx.eval_shape`): only shapes matter for compilation."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

  def loss(state, tokens, mask):
    return jnp.sum(token_logprobs(nnx.merge(graphdef, state), tokens, mask))

  best, whiles = float("inf"), 0
  for _ in range(repeats):
    fn = jax.jit(jax.value_and_grad(loss))  # a fresh function: no compilation cache hit
    t0 = time.perf_counter()
    compiled = fn.lower(state, tokens, mask).compile()
    best = min(best, time.perf_counter() - t0)
    whiles = compiled.as_text().count(" while(")
  return best, whiles


def lora_update_compile_seconds(scan: bool, layers: int, rows: int = 8, prompt_len: int = 64,
                                new_tokens: int = 128) -> float:
  import optax

  from adrpo_jax.models import lora
  from adrpo_jax.rl.step import StepOptions, make_rl_update
  from benchmarks._bench_utils import make_batch
  cfg = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, scan_layers=scan)
  model = nnx.eval_shape(lambda: lora.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)),
                                                 lora.LoRAConfig(rank=16, alpha=32.0), rngs=nnx.Rngs(1)))
  graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.0))
  opt_state = jax.eval_shape(tx.init, params)
  batch = make_batch(rows, prompt_len, new_tokens, cfg.vocab_size)
  opts = StepOptions(group_size=4, prompt_length=prompt_len, max_new_tokens=new_tokens, beta=0.04, adaptive=True)
  update = jax.jit(make_rl_update(graphdef, tx, opts, None), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  update.lower(params, opt_state, frozen, batch, jax.random.key(0)).compile()
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--depths", type=int, nargs="+", default=[2, 16])
  ap.add_argument("--hidden", type=int, default=576)
  ap.add_argument("--intermediate", type=int, default=1536)
  ap.add_argument("--heads", type=int, default=9)
  ap.add_argument("--kv-heads", type=int, default=3)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--length", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best of)")
  ap.add_argument("--remat", action="store_true", help="per-layer remat (remat_policy=None: save nothing)")
  ap.add_argument("--lora-update", action="store_true", help="SmolLM2-shaped LoRA RL update instead (see doc)")
  ap.add_argument("--layouts", nargs="+", choices=("list", "scan"), default=["list", "scan"])
  args = ap.parse_args(argv)
  from benchmarks._bench_utils import machine
  print(machine())
  if args.lora_update:
    out = {}
    for layout in args.layouts:
      out[layout] = lora_update_compile_seconds(layout == "scan", 30)
      print(f"SmolLM2-135M-shaped LoRA update (30 layers), scan_layers={layout == 'scan'}: compile "
            f"{out[layout]:.1f} s", flush=True)
    return out
  print(f"model: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads}, "
        f"vocab {args.vocab}; batch {args.batch} x {args.length} tokens; remat={args.remat}")
  results, whiles = {}, {}
  # Interleaved rounds (every configuration once per round, best of the rounds): a contended machine's load
  # drifts, and interleaving spreads the drift over all configurations alike.
  for round_ in range(args.repeats):
    for scan in (False, True):
      for depth in args.depths:
        cfg = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=depth, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, tie_word_embeddings=True, remat=args.remat,
                            scan_layers=scan)
        seconds, whiles[scan, depth] = compile_seconds(cfg, args.batch, args.length)
        results[scan, depth] = min(seconds, results.get((scan, depth), float("inf")))
        print(f"round {round_}: scan_layers={scan!s:5} {depth:3d} layers: compile {seconds:7.2f} s", flush=True)
  for (scan, depth), seconds in results.items():
    print(f"scan_layers={scan!s:5}  {depth:3d} layers: compile {seconds:7.2f} s (best)  "
          f"(HLO while loops: {whiles[scan, depth]})")
  lo, hi = min(args.depths), max(args.depths)
  for scan in (False, True):
    print(f"scan_layers={scan!s:5}  compile({hi} layers) / compile({lo} layers) = "
          f"{results[scan, hi] / results[scan, lo]:.2f}x")
  print(f"compile({hi} layers): list {results[False, hi]:.2f} s -> scan {results[True, hi]:.2f} s")
  return results


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
