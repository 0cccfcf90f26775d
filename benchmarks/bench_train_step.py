"""Train-step benchmark: GRPO vs ADRPO update time (same batch, interleaved) and update memory vs sequence length.

    .venv/bin/python benchmarks/bench_train_step.py --skip-memory --prompt-len 32 --new-tokens 96   # (a), ~5 min
    .venv/bin/python benchmarks/bench_train_step.py --skip-time                                     # (c), ~10 min
    (times on a loaded 2-core machine; benchmarks/RESULTS.md has the exact commands and results)

Both parts run the trainer's real update, ``jax.jit(make_rl_update(...), donate_argnums=(0, 1))``
(``adrpo_jax/rl/step.py``: rewards -> group advantages -> chunked completion log-probs -> clipped GRPO loss with
token-level k3 KL to the reference -> AdamW with global-norm clipping, non-finite guard), on a randomly initialised
Llama-shaped decoder and a synthetic rollout batch (tokens, completion masks of varying length, rewards,
reference log-probs), single device, float32.

(a) GRPO (``adaptive=False``: fixed beta_0) vs ADRPO (``adaptive=True``: beta_i = beta_0 - clip(A_i)), identical
    model, batch and options otherwise. Each variant keeps its own donated (params, opt_state) chain. After a
    warm-up, the repetitions alternate A B B A A B ... (so slow drift of a shared machine hits both equally);
    reported: median step time of each, the ratio of medians, and the median and interquartile range of the
    per-round ratios. For scale, also the loss alone (``grpo_loss`` value-and-grad on [B, N] log-probs).
(c) Update memory as the sequence grows (prompt P fixed, completion T - P; or ``--completion-lengths``: the
    completion N given, T = P + N): XLA's compiled memory analysis (arguments + temporaries + outputs - donated
    aliases; works on CPU, needs no run) for the variants of ``--variants``:
      default   the default settings: stacked layers run by ``lax.scan``, ``attention_impl='auto'`` (on CPU:
                chunked flash-style attention from T*S >= 1024**2, xla below), chunked log-probs of the
                completion positions only (chunk 512 token positions)
      remat     default + per-layer remat (``DecoderConfig(remat=True)``, nothing saved)
      xla       default with ``attention_impl='xla'``: the quadratic reference (materialized [B, H, T, S] scores)
      onechunk  default with one log-prob chunk (= the full [B*N, V] float32 completion logits)
    With ``--measure-up-to L`` the step also runs for T <= L and the measured growth of the process's peak RSS
    during the step and its wall time are reported (Linux; temporaries + outputs).
    Issue 13 item 6 (the update at completion lengths 1,024 and 4,096 on the default settings)::

      .venv/bin/python benchmarks/bench_train_step.py --skip-time --completion-lengths 1024,4096 --measure-up-to 0

``--dry-run`` parses the arguments, builds the model config and prints the plan (no compilation).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from _bench_utils import build_model, machine, make_batch, measured_step_peak, memory_row, mib  # noqa: E402
from adrpo_jax import losses  # noqa: E402
from adrpo_jax.models.llm import CausalLM, DecoderConfig  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False, model_type="llama")


def make_tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))


def compile_update(graphdef, opts, params, opt_state, frozen, batch):
    update = jax.jit(make_rl_update(graphdef, make_tx(), opts, None), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = update.lower(params, opt_state, frozen, batch, jax.random.key(0)).compile()
    return compiled, time.perf_counter() - t0


def copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------------------------------------
# (a) GRPO vs ADRPO
# ----------------------------------------------------------------------------------------------------------

def bench_time(model, args) -> dict:
    b, p, n = args.prompts * args.group, args.prompt_len, args.new_tokens
    batch = make_batch(b, p, n, model.config.vocab_size)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = make_tx()
    variants = {}
    for name, adaptive in (("GRPO", False), ("ADRPO", True)):
        opts = StepOptions(group_size=args.group, prompt_length=p, max_new_tokens=n, beta=0.04, adaptive=adaptive,
                           logprob_chunk_size=args.chunk)
        p0 = copy_tree(params)
        o0 = tx.init(p0)
        compiled, compile_s = compile_update(graphdef, opts, p0, o0, frozen, batch)
        cost = compiled.cost_analysis() or {}
        variants[name] = dict(fn=compiled, state=[p0, o0], compile_s=compile_s, times=[],
                              flops=float(cost.get("flops", float("nan"))),
                              bytes_accessed=float(cost.get("bytes accessed", float("nan"))))

    key = jax.random.key(1)

    def step(v):
        t0 = time.perf_counter()
        out = v["fn"](v["state"][0], v["state"][1], frozen, batch, key)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        v["state"] = [out[0], out[1]]
        return dt, out[2]

    for _ in range(args.warmup):
        for v in variants.values():
            step(v)
    names = list(variants)
    for r in range(args.reps):
        order = names if r % 2 == 0 else names[::-1]  # A B, B A, A B, ...
        for name in order:
            variants[name]["times"].append(step(variants[name])[0])
    _, metrics = step(variants["ADRPO"])
    tg, ta = np.array(variants["GRPO"]["times"]), np.array(variants["ADRPO"]["times"])
    per_round = ta / tg
    loss_only = bench_loss_only(b, n, args.reps)
    return dict(rows=b, prompt_len=p, new_tokens=n, tokens_per_step=int(b * (p + n)),
                grpo_compile_s=variants["GRPO"]["compile_s"], adrpo_compile_s=variants["ADRPO"]["compile_s"],
                grpo_median_s=float(np.median(tg)), adrpo_median_s=float(np.median(ta)),
                ratio_of_medians=float(np.median(ta) / np.median(tg)),
                per_round_ratio_median=float(np.median(per_round)),
                per_round_ratio_q25=float(np.quantile(per_round, 0.25)),
                per_round_ratio_q75=float(np.quantile(per_round, 0.75)),
                grpo_flops=variants["GRPO"]["flops"], adrpo_flops=variants["ADRPO"]["flops"],
                grpo_bytes_accessed=variants["GRPO"]["bytes_accessed"],
                adrpo_bytes_accessed=variants["ADRPO"]["bytes_accessed"],
                grpo_times=tg.tolist(), adrpo_times=ta.tolist(),
                adrpo_beta_eff_mean=float(metrics["beta_eff_mean"]), adrpo_beta_eff_min=float(metrics["beta_eff_min"]),
                adrpo_beta_eff_max=float(metrics["beta_eff_max"]), loss_only=loss_only)


def bench_loss_only(b: int, n: int, reps: int) -> dict:
    """value_and_grad of grpo_loss alone on [b, n] arrays, adaptive off vs on (microseconds, interleaved)."""
    rng = np.random.default_rng(0)
    logp = jnp.asarray(-3.0 * rng.random((b, n)), jnp.float32)
    ref = jnp.asarray(-3.0 * rng.random((b, n)), jnp.float32)
    adv = jnp.asarray(rng.standard_normal(b), jnp.float32)
    mask = jnp.asarray(np.arange(n)[None] < rng.integers(n // 2, n + 1, (b, 1)))
    fns = {}
    for name, adaptive in (("GRPO", False), ("ADRPO", True)):
        f = jax.jit(jax.value_and_grad(lambda lp, a=adaptive: losses.grpo_loss(lp, None, ref, adv, mask, beta=0.04,
                                                                                adaptive=a)[0]))
        jax.block_until_ready(f(logp))
        fns[name] = f
    times = {k: [] for k in fns}
    for r in range(max(reps, 20) * 10):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](logp))
            times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) * 1e6 for k, v in times.items()}


# ----------------------------------------------------------------------------------------------------------
# (c) memory vs sequence length
# ----------------------------------------------------------------------------------------------------------

VARIANTS = ("default", "remat", "xla", "onechunk")


def variant_plan(cfg: DecoderConfig, args) -> list[tuple[str, DecoderConfig, int | None]]:
    """(label, model config, log-prob chunk or None = one chunk) per ``--variants`` entry."""
    plan = []
    for name in args.variants.split(","):
        if name == "default":
            plan.append((f"default (attention {cfg.attention_impl}, scan, chunk {args.chunk})", cfg, args.chunk))
        elif name == "remat":
            plan.append(("default + per-layer remat", cfg.replace(remat=True), args.chunk))
        elif name == "xla":
            plan.append(("xla attention (quadratic reference)", cfg.replace(attention_impl="xla"), args.chunk))
        elif name == "onechunk":
            plan.append(("one log-prob chunk (full logits)", cfg, None))
        else:
            raise ValueError(f"--variants entry {name!r} is not one of {VARIANTS}")
    return plan


def memory_lengths(args) -> list[tuple[int, int]]:
    """(total length T, completion N) per measured length."""
    p = args.prompt_len
    if args.completion_lengths:
        out = [(p + int(n), int(n)) for n in args.completion_lengths.split(",")]
    else:
        out = [(int(t), int(t) - p) for t in args.lengths.split(",")]
    for t, n in out:
        if n < 2:
            raise ValueError(f"length {t} must exceed --prompt-len={p} by at least 2")
    return out


def bench_memory(cfg: DecoderConfig, args) -> list[dict]:
    b, p = args.mem_rows, args.prompt_len
    lengths = memory_lengths(args)
    plan = variant_plan(cfg, args)
    model = build_model(cfg)
    _, params, frozen = nnx.split(model, nnx.Param, ...)
    graphdefs = [nnx.split(nnx.eval_shape(lambda c=c: CausalLM(c, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
                 for _, c, _ in plan]
    tx = make_tx()
    rows = []
    for t, n in lengths:
        batch = make_batch(b, p, n, cfg.vocab_size)
        for (variant, _, chunk), gd in zip(plan, graphdefs):
            chunk = chunk or b * t
            opts = StepOptions(group_size=args.group, prompt_length=p, max_new_tokens=n, beta=0.04, adaptive=True,
                               logprob_chunk_size=chunk)
            opt_state = tx.init(params)
            compiled, compile_s = compile_update(gd, opts, params, opt_state, frozen, batch)
            row = dict(length=t, completion=n, rows=b, variant=variant, compile_s=compile_s, **memory_row(compiled),
                       logits_bytes=b * n * cfg.vocab_size * 4)
            if t <= args.measure_up_to:
                run = lambda: compiled(copy_tree(params), copy_tree(opt_state), frozen, batch,  # noqa: E731
                                       jax.random.key(0))
                jax.block_until_ready(run())  # warm (allocator, thread pools)
                p1, o1 = copy_tree(params), copy_tree(opt_state)
                row["step_s"], row["measured_bytes"] = measured_step_peak(
                    compiled, p1, o1, frozen, batch, jax.random.key(0))
                del p1, o1
            rows.append(row)
            print(f"# memory T={t} (N={n}) {variant}: {row}", file=sys.stderr, flush=True)
            del compiled
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"])
    parser.add_argument("--vocab", type=int, default=MODEL["vocab_size"])
    parser.add_argument("--prompts", type=int, default=2, help="(a) prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=192, help="(a) completion slots")
    parser.add_argument("--chunk", type=int, default=512, help="log-prob chunk (token positions)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40, help="(a) timed steps per variant")
    parser.add_argument("--lengths", default="256,512,1024,2048", help="(c) total sequence lengths P + N")
    parser.add_argument("--completion-lengths", default="",
                        help="(c) completion lengths N instead of --lengths (T = --prompt-len + N), e.g. 1024,4096")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"(c) comma-separated subset of {VARIANTS}")
    parser.add_argument("--attention-impl", default="auto", help="attention_impl of the default model config")
    parser.add_argument("--mem-rows", type=int, default=4, help="(c) rollout rows")
    parser.add_argument("--measure-up-to", type=int, default=1024,
                        help="(c) also run the step and measure peak RSS growth for lengths <= this (0: never)")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="parse, build the config, print the plan; no compile")
    args = parser.parse_args(argv)

    hidden = args.hidden
    cfg = DecoderConfig(**dict(MODEL, num_hidden_layers=args.layers, hidden_size=hidden, vocab_size=args.vocab,
                               intermediate_size=3 * hidden, num_attention_heads=max(hidden // 64, 1),
                               num_key_value_heads=max(hidden // 128, 1), attention_impl=args.attention_impl))
    if args.dry_run:
        plan = dict(params=cfg.num_params(), time=not args.skip_time,
                    memory=None if args.skip_memory else dict(
                        lengths=memory_lengths(args), variants=[v for v, _, _ in variant_plan(cfg, args)]))
        print(json.dumps(plan))
        return plan
    print(f"# bench_train_step: {cfg.num_params() / 1e6:.2f}M params; machine: {machine()}", file=sys.stderr,
          flush=True)
    result: dict = dict(machine=machine(), args=vars(args), params=cfg.num_params())
    print(f"**Machine:** {machine()}  ")
    print(f"**Model:** Llama-shaped decoder, {cfg.num_params() / 1e6:.2f}M params, {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, vocab "
          f"{cfg.vocab_size}, float32; update = `make_rl_update` (beta_0 0.04, k3 KL, token_mean, AdamW + clip 1.0), "
          f"jitted, donated, 1 device\n")
    if not args.skip_time:
        t = bench_time(build_model(cfg), args)
        result["time"] = t
        print(f"(a) GRPO vs ADRPO update step: {t['rows']} rows ({args.prompts} prompts x {args.group}), prompt "
              f"{t['prompt_len']} + {t['new_tokens']} completion slots ({t['tokens_per_step']} tokens), "
              f"{args.reps} interleaved steps each after {args.warmup} warm-up\n")
        print("| variant | compile (s) | median step (s) | tokens/s | XLA flops | XLA bytes accessed |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, key in (("GRPO (fixed beta_0)", "grpo"), ("ADRPO (beta_0 - clip(A))", "adrpo")):
            med = t[f"{key}_median_s"]
            print(f"| {name} | {t[f'{key}_compile_s']:.1f} | {med:.4f} | {t['tokens_per_step'] / med:,.0f} | "
                  f"{t[f'{key}_flops']:.4g} | {t[f'{key}_bytes_accessed']:.4g} |")
        print(f"| **ADRPO / GRPO** | | **{t['ratio_of_medians']:.4f}** | | {t['adrpo_flops'] / t['grpo_flops']:.6f} | "
              f"{t['adrpo_bytes_accessed'] / t['grpo_bytes_accessed']:.6f} |")
        lo = t["loss_only"]
        print(f"\nADRPO / GRPO step time: **{t['ratio_of_medians']:.4f}** (ratio of medians); per-round ratio median "
              f"{t['per_round_ratio_median']:.4f}, IQR [{t['per_round_ratio_q25']:.4f}, {t['per_round_ratio_q75']:.4f}]"
              f"  \nLoss alone (value_and_grad of grpo_loss on [{t['rows']}, {t['new_tokens']}]): GRPO "
              f"{lo['GRPO']:.0f} us, ADRPO {lo['ADRPO']:.0f} us (difference = "
              f"{100 * (lo['ADRPO'] - lo['GRPO']) * 1e-6 / t['grpo_median_s']:+.3f}% of a step)  \n"
              f"ADRPO beta_eff over the batch: mean {t['adrpo_beta_eff_mean']:.3f}, min {t['adrpo_beta_eff_min']:.3f}, "
              f"max {t['adrpo_beta_eff_max']:.3f}\n")
    if not args.skip_memory:
        rows = bench_memory(cfg, args)
        result["memory"] = rows
        print(f"(c) Update memory vs sequence length: {args.mem_rows} rows, prompt {args.prompt_len}, completion "
              f"N = T - {args.prompt_len}; XLA estimate = args + temp + out - donated aliases (MiB); measured = growth "
              f"of peak RSS during one step (MiB)\n")
        print("| T | N | variant | compile (s) | XLA temp | XLA peak estimate | measured | step (s) | "
              "[B,N,V] f32 logits |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            step_s = f"{r['step_s']:.2f}" if "step_s" in r else "n/a"
            print(f"| {r['length']} | {r['completion']} | {r['variant']} | {r['compile_s']:.1f} | "
                  f"{mib(r['temp_bytes'])} | {mib(r['peak_bytes'])} | {mib(r.get('measured_bytes'))} | {step_s} | "
                  f"{mib(r['logits_bytes'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
