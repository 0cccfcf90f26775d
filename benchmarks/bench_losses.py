"""Micro-benchmark: the ADRPO losses vs their fixed-coefficient baselines on identical inputs.

ADRPO's claim is "negligible overhead": the adaptive coefficient costs a few scalar operations per sample. This
measures ``jit(value_and_grad)`` (with the metrics, as a trainer would call it) of

* ``grpo_loss`` w.r.t. ``logp`` on B=64 x T=1024 tokens, ``adaptive=True`` (ADRPO) vs ``adaptive=False``
  (GRPO with fixed beta), and
* the flow losses on ``[256, 16, 16, 1]`` velocities: ``adrpo_flow_loss`` (adaptive) vs ``adaptive=False`` and
  the ORW-CFM-W2 baseline,

with interleaved repetitions (A, B, A, B, ...) so that machine load affects both alike, reporting the medians
and the median of the per-round ratios, plus XLA's static cost analysis (flops, bytes: load-independent).
Each is timed with its metrics dict (as a trainer logs it) and with the loss only (metrics dead-code
eliminated), which separates the loss's cost from the extra metric reductions (the fixed coefficient's
``beta_eff`` statistics are compile-time constants). Not a test; run it directly::

    python benchmarks/bench_losses.py [--rounds 200] [--batch 64] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adrpo_jax import losses


def _time_interleaved(fns: dict, args: dict, rounds: int, inner: int) -> dict[str, list[float]]:
    """Each round runs every function ``inner`` times back to back; returns seconds per call per round."""
    for name, fn in fns.items():  # compile + warm up
        jax.block_until_ready(fn(*args[name]))
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order too
        for name in order:
            fn, a = fns[name], args[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn(*a)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def _xla_cost(fn, args) -> dict[str, float]:
    """XLA's static cost analysis of the compiled program (deterministic, load-independent)."""
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed")}


def _report(title: str, times: dict[str, list[float]], base: str, costs: dict[str, dict[str, float]]
            ) -> dict[str, float]:
    print(f"\n{title}")
    ratios = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        c = costs[name]
        line = (f"  {name:<32s} median {med * 1e3:8.3f} ms  (XLA: {c['flops'] / 1e6:7.2f} MFLOP, "
                f"{c['bytes accessed'] / 1e6:6.2f} MB)")
        if name != base:
            per_round = [a / b for a, b in zip(ts, times[base])]
            ratios[name] = statistics.median(per_round)
            cb = costs[base]
            line += (f"\n    vs {base}: time ratio {ratios[name]:.4f} (median of per-round ratios), "
                     f"ratio of medians {med / statistics.median(times[base]):.4f}, "
                     f"XLA flops ratio {c['flops'] / max(cb['flops'], 1):.5f}, "
                     f"bytes ratio {c['bytes accessed'] / max(cb['bytes accessed'], 1):.5f}")
        print(line)
    return ratios


def bench_grpo(batch: int, tokens: int, rounds: int, inner: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(-rng.uniform(0.01, 5.0, size=(batch, tokens)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(size=(batch, tokens)) * 0.05, jnp.float32)
    ref = logp + jnp.asarray(rng.normal(size=(batch, tokens)) * 0.1, jnp.float32)
    rewards = jnp.asarray(rng.integers(0, 2, size=batch), jnp.float32)
    adv = losses.group_advantages(rewards, group_size=8)
    lengths = rng.integers(tokens // 4, tokens + 1, size=batch)
    mask = jnp.asarray(np.arange(tokens)[None, :] < lengths[:, None])

    def make(adaptive: bool):
        def loss(lp, o, r, a, m):
            return losses.grpo_loss(lp, o, r, a, m, beta=0.04, adaptive=adaptive)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    def make_loss_only(adaptive: bool):  # metrics dropped (dead-code eliminated by XLA)
        def loss(lp, o, r, a, m):
            return losses.grpo_loss(lp, o, r, a, m, beta=0.04, adaptive=adaptive)[0]
        return jax.jit(jax.value_and_grad(loss))

    fns = {"grpo_loss adaptive=True (ADRPO)": make(True), "grpo_loss adaptive=False (GRPO)": make(False),
           "  same, loss only, adaptive=True": make_loss_only(True),
           "  same, loss only, adaptive=False": make_loss_only(False)}
    args = {k: (logp, old, ref, adv, mask) for k in fns}
    costs = {k: _xla_cost(fn, args[k]) for k, fn in fns.items()}
    times = _time_interleaved(fns, args, rounds, inner)
    ratios = _report(f"GRPO loss + grad + metrics, B={batch} x T={tokens} ({jax.devices()[0].platform})",
                     {k: times[k] for k in list(fns)[:2]}, "grpo_loss adaptive=False (GRPO)", costs)
    _report("  (loss + grad only, metrics dropped)", {k: times[k] for k in list(fns)[2:]},
            "  same, loss only, adaptive=False", costs)
    return ratios["grpo_loss adaptive=True (ADRPO)"]


def bench_flow(n: int, rounds: int, inner: int, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    shape = (n, 16, 16, 1)
    x0 = jnp.asarray(rng.normal(size=shape), jnp.float32)
    x1 = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.uniform(size=n), jnp.float32)
    x_t, u = losses.rectified_flow_path(x0, x1, t)
    v = x_t * 0.9 + 0.1
    v_ref = x_t * 0.8
    rewards = jnp.asarray(rng.uniform(size=n), jnp.float32)
    prompts = jnp.asarray(rng.integers(0, 10, size=n), jnp.int32)
    adv = losses.prompt_mean_advantages(rewards, prompts, 10)

    def make(kind: str, with_metrics: bool = True):
        def loss(vv, vr, uu, a, r):
            if kind == "orw":
                out = losses.orw_cfm_w2_loss(vv, vr, uu, r)
            else:
                out = losses.adrpo_flow_loss(vv, vr, uu, a, beta=0.5, adaptive=kind == "adaptive")
            return out if with_metrics else out[0]
        return jax.jit(jax.value_and_grad(loss, has_aux=with_metrics))

    fns = {"adrpo_flow_loss adaptive=True": make("adaptive"), "adrpo_flow_loss adaptive=False": make("fixed"),
           "orw_cfm_w2_loss": make("orw"), "  same, loss only, adaptive=True": make("adaptive", False),
           "  same, loss only, adaptive=False": make("fixed", False)}
    args = {k: (v, v_ref, u, adv, rewards) for k in fns}
    costs = {k: _xla_cost(fn, args[k]) for k, fn in fns.items()}
    times = _time_interleaved(fns, args, rounds, inner)
    ratios = _report(f"Flow loss + grad + metrics, v {list(shape)}", {k: times[k] for k in list(fns)[:3]},
                     "adrpo_flow_loss adaptive=False", costs)
    _report("  (loss + grad only, metrics dropped)", {k: times[k] for k in list(fns)[3:]},
            "  same, loss only, adaptive=False", costs)
    return ratios["adrpo_flow_loss adaptive=True"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--flow-batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--inner", type=int, default=20)
    a = p.parse_args()
    t0 = time.perf_counter()
    r_grpo = bench_grpo(a.batch, a.tokens, a.rounds, a.inner)
    r_flow = bench_flow(a.flow_batch, a.rounds, a.inner)
    print(f"\nADRPO / fixed-beta time ratio (loss + grad + metrics): GRPO {r_grpo:.4f} "
          f"(target < 1.02: {'OK' if r_grpo < 1.02 else 'ABOVE'}), flow {r_flow:.4f}; "
          f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
