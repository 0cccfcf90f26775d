"""MoE layer time: the dropless grouped-matmul experts against a dense SwiGLU MLP of the same active parameters and
against the naive "every expert on every token" form, same process, interleaved runs, medians to JSON.

    python benchmarks/bench_moe.py --tokens 2048 --hidden 512 --experts 16 --top-k 2 --expert-width 512 \\
        --impls blocked,ragged --backward --repeats 10 --out moe.json

Variants (all jitted, inputs and weights identical across runs):
  moe:<impl>   `moe.SparseMoeBlock.forward` with `moe_impl=<impl>` (router + top-k + dropless experts);
  dense        a SwiGLU MLP of width k * F (the same active parameters and expert FLOPs per token as the MoE, no
               router): what the MoE would cost if sparsity were free;
  naive        every expert on every token, combined with the gates (`moe_impl='dense'`): E / k times the work.
Each repeat runs every variant once in a shuffled order (A B C, C A B, ...), so a load change on a shared machine
hits all variants alike; the ratios are of medians. `--backward` times value_and_grad of a scalar loss instead.
The MoE outputs are checked against the naive form first (max |diff|, float32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from adrpo_jax.models.llm import DecoderConfig, moe  # noqa: E402
from adrpo_jax.models.llm.modeling import MLP  # noqa: E402


def _random_state(module, seed: int, std: float):
  graphdef, state = nnx.split(module)
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return graphdef, state


def build(args, impl: str):
  cfg = DecoderConfig(vocab_size=8, hidden_size=args.hidden, intermediate_size=args.top_k * args.expert_width,
                      num_hidden_layers=1, num_attention_heads=1, head_dim=2, model_type="qwen3_moe",
                      num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width,
                      moe_impl="auto" if impl == "mlp" else impl, moe_block_size=args.block, dtype=args.dtype,
                      param_dtype=args.dtype)

  def make():
    with nnx.use_eager_sharding(False):
      return moe.SparseMoeBlock(cfg, rngs=nnx.Rngs(0)) if impl != "mlp" else MLP(cfg, rngs=nnx.Rngs(0))

  return _random_state(nnx.eval_shape(make), 0, args.hidden ** -0.5)


def make_fn(graphdef, backward: bool):
  def forward(state, x):
    module = nnx.merge(graphdef, state)
    return module.forward(x)[0] if hasattr(module, "forward") else module(x)

  if not backward:
    return jax.jit(forward)
  return jax.jit(jax.value_and_grad(lambda state, x: jnp.sum(forward(state, x).astype(jnp.float32) ** 2),
                                    argnums=(0, 1)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=2048, help="N = B * T tokens through the layer")
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--experts", type=int, default=16)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--expert-width", type=int, default=512)
  parser.add_argument("--block", type=int, default=128, help="moe_block_size (rows per tile of 'blocked')")
  parser.add_argument("--impls", default="blocked,ragged", help="MoE implementations to time (blocked, ragged, "
                      "megablox on TPU)")
  parser.add_argument("--no-naive", action="store_true", help="skip the every-expert-on-every-token form")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--backward", action="store_true", help="time value_and_grad instead of the forward")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="", help="write the JSON here (always printed)")
  args = parser.parse_args(argv)
  impls = [i for i in args.impls.split(",") if i]
  for i in impls:
    if i not in ("blocked", "ragged", "megablox"):
      raise ValueError(f"--impls entry {i!r}: use blocked, ragged or megablox")

  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, args.tokens, args.hidden)), args.dtype)
  variants = {f"moe:{i}": build(args, i) for i in impls}
  variants["dense"] = build(args, "mlp")
  if not args.no_naive:
    variants["naive"] = build(args, "dense")
  fns = {name: make_fn(gd, args.backward) for name, (gd, _) in variants.items()}

  check = {}
  if not args.no_naive:  # same weights: the dropless experts equal the every-expert form
    ref = np.asarray(make_fn(variants["naive"][0], False)(variants["naive"][1], x), np.float32)
    for i in impls:
      out = np.asarray(make_fn(variants[f"moe:{i}"][0], False)(variants[f"moe:{i}"][1], x), np.float32)
      check[f"moe:{i}"] = float(np.abs(out - ref).max())

  compile_s = {}
  for name, fn in fns.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(variants[name][1], x))
    compile_s[name] = time.perf_counter() - t
  times: dict[str, list[float]] = {name: [] for name in fns}
  order = list(fns)
  for r in range(args.repeats):
    for name in order[r % len(order):] + order[:r % len(order)]:  # rotate the order every repeat
      t = time.perf_counter()
      jax.block_until_ready(fns[name](variants[name][1], x))
      times[name].append(time.perf_counter() - t)
  stats = {name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
           for name, v in times.items()}
  active = 3 * args.hidden * args.expert_width * args.top_k
  result = {
      "machine": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cores, jax {jax.__version__}",
      "config": {k: getattr(args, k) for k in ("tokens", "hidden", "experts", "top_k", "expert_width", "block",
                                                "dtype", "backward", "repeats")},
      "active_expert_params": active, "total_expert_params": active * args.experts // args.top_k,
      "max_abs_diff_vs_naive": check, "compile_s": compile_s, "times": stats,
      "ratios": {f"{name}_over_dense": stats[name]["median_ms"] / stats["dense"]["median_ms"] for name in stats
                 if name != "dense"},
  }
  if "naive" in stats:
    result["ratios"].update({f"naive_over_{name}": stats["naive"]["median_ms"] / stats[name]["median_ms"]
                             for name in stats if name.startswith("moe:")})
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main()
