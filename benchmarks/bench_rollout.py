"""Rollouts at reasoning length (issue 26): continuous vs static batching, packed vs padded updates, and the
bounded-staleness asynchronous schedule; one JSON document.

    JAX_PLATFORMS=cpu python benchmarks/bench_rollout.py --json /tmp/bench_rollout.json            # all parts
    JAX_PLATFORMS=cpu python benchmarks/bench_rollout.py --parts continuous --rows 64 --requests 512

Sections (``--parts``):

``continuous``  useful tokens/s of the continuous-batching engine (``adrpo_jax.models.llm.continuous``, S slots
                over R requests) vs static batching (the KV-cached sampler on batches of S rows, each batch
                decoding until its longest row stops), side by side in one process, on the same requests with
                completion lengths drawn from a log-normal (median ``max_new / 8``, sigma 1, clipped to
                [1, max_new]). Lengths are imposed as per-request budgets with no stop token (the continuous
                engine's ``max_lengths``; a static batch decodes ``max(lengths in the batch)`` steps, which is
                what it does when its rows stop by EOS at those lengths). Useful tokens = sum(lengths).
``packing``     update tokens/s of the GRPO update on packed rows (``rl.pack_tokens``) vs padded rows.
``async``       the asynchronous schedule's phase times (rollout / update) and the simulated lag-1 throughput.

Timings are wall-clock medians of ``--repeats`` runs after a compile / warm-up call, on whatever machine runs
this; the JSON records the load average before and after (a shared 2-core machine is noisy: compare the ratios
of one run, never numbers across runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import build_model, machine  # noqa: E402

from adrpo_jax.models.llm import DecoderConfig  # noqa: E402
from adrpo_jax.models.llm.continuous import make_continuous_generate_fn  # noqa: E402
from adrpo_jax.models.llm.sampler import SamplingConfig, make_generate_fn  # noqa: E402

MODELS = {
    # a tiny decoder (the unit tests' scale)
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # SmolLM2-135M's layer shape (width, heads, vocabulary); --layers sets the depth (30 in the real model)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def lognormal_lengths(n: int, max_new: int, seed: int, sigma: float = 1.0) -> np.ndarray:
    """``n`` completion lengths, log-normal with median ``max_new / 8`` and ``sigma``, clipped to [1, max_new]."""
    rng = np.random.default_rng(seed)
    x = np.exp(np.log(max_new / 8.0) + sigma * rng.standard_normal(n))
    return np.clip(np.round(x), 1, max_new).astype(np.int32)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one blocking call. On a loaded machine the CPU time (all
    threads) tracks the work better than the wall time; both are reported."""
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def bench_continuous(args) -> dict:
    cfg = DecoderConfig(**{**MODELS[args.model], **({"num_hidden_layers": args.layers} if args.layers else {})})
    model = build_model(cfg)
    from flax import nnx
    graphdef, state = nnx.split(model)
    r, s, p, n = args.requests, args.rows, args.prompt_len, args.max_new
    if r % s:
        raise SystemExit(f"--requests {r} must be a multiple of --rows {s}")
    lengths = lognormal_lengths(r, n, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (r, p)).astype(np.int32))
    mask = jnp.ones((r, p), bool)
    key = jax.random.key(0)
    sampling = dict(temperature=1.0, eos_token_ids=(), pad_token_id=0)

    # continuous: S slots over the R requests, per-request budgets
    cont = jax.jit(make_continuous_generate_fn(graphdef, SamplingConfig(max_new_tokens=n, **sampling), s,
                                               return_stats=True))
    lens = jnp.asarray(lengths)
    t0 = time.perf_counter()
    out, stats = jax.block_until_ready(cont(state, tokens, mask, key, None, lens))
    compile_cont = time.perf_counter() - t0
    assert np.array_equal(np.asarray(out.lengths), lengths), "continuous: lengths differ from the budgets"

    # static: batches of S rows, each decoding max(lengths of the batch) steps (one compilation per distinct max)
    batches = [(slice(i, i + s), int(lengths[i:i + s].max())) for i in range(0, r, s)]
    static_fns = {}
    t0 = time.perf_counter()
    for _, m in batches:
        if m not in static_fns:
            static_fns[m] = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=m, **sampling)))
            jax.block_until_ready(static_fns[m](state, tokens[:s], mask[:s], key))
    compile_static = time.perf_counter() - t0

    def run_static():
        return [static_fns[m](state, tokens[sl], mask[sl], jax.random.fold_in(key, i))
                for i, (sl, m) in enumerate(batches)]

    def run_cont():
        return cont(state, tokens, mask, key, None, lens)

    # interleaved repeats, so the load drifts over both alike
    t_static, t_cont = [], []
    for _ in range(args.repeats):
        t_static.append(_timed(run_static))
        t_cont.append(_timed(run_cont))
    (t_static, c_static), (t_cont, c_cont) = np.median(t_static, axis=0), np.median(t_cont, axis=0)
    useful = int(lengths.sum())
    static_steps = int(sum(m for _, m in batches))
    decode_steps = int(stats.decode_steps)
    return {
        "model": args.model, "layers": cfg.num_hidden_layers, "rows": s, "requests": r, "prompt_len": p,
        "max_new_tokens": n, "length_mean": float(lengths.mean()), "length_median": float(np.median(lengths)),
        "length_max": int(lengths.max()), "useful_tokens": useful,
        "static": {"time_s": t_static, "cpu_s": c_static, "useful_tokens_per_s": useful / t_static,
                   "useful_tokens_per_cpu_s": useful / c_static, "decode_steps": static_steps,
                   "row_step_utilization": useful / (static_steps * s), "compile_s": compile_static},
        "continuous": {"time_s": t_cont, "cpu_s": c_cont, "useful_tokens_per_s": useful / t_cont,
                       "useful_tokens_per_cpu_s": useful / c_cont, "decode_steps": decode_steps,
                       "slot_utilization": int(stats.slot_steps_used) / (decode_steps * s),
                       "compile_s": compile_cont},
        "speedup_wall": t_static / t_cont, "speedup_cpu": c_static / c_cont,
        "time_per_decode_step_ms": {"static": 1e3 * t_static / static_steps, "continuous": 1e3 * t_cont / decode_steps},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="continuous")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=0, help="override the depth (0: the model's)")
    ap.add_argument("--rows", type=int, default=64, help="static batch rows = continuous slots")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "load_before": _load(), "argv": sys.argv[1:] if argv is None else list(argv)}
    parts = [x for x in args.parts.split(",") if x]
    if "continuous" in parts:
        result["continuous"] = bench_continuous(args)
    result["load_after"] = _load()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
