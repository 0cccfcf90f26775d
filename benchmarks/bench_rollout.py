"""Rollouts at reasoning length (issue 26): continuous vs static batching, packed vs padded updates, and the
bounded-staleness asynchronous schedule; one JSON document.

    JAX_PLATFORMS=cpu python benchmarks/bench_rollout.py --json /tmp/bench_rollout.json            # all parts
    JAX_PLATFORMS=cpu python benchmarks/bench_rollout.py --parts continuous --rows 64 --requests 512

Sections (``--parts``):

``continuous``  useful tokens/s of the continuous-batching engine (``adrpo_jax.models.llm.continuous``, S slots
                over R requests) vs static batching (the KV-cached sampler on batches of S rows, each batch
                decoding until its longest row stops), side by side in one process, on the same requests with
                completion lengths drawn from a log-normal (median ``max_new / 8``, sigma 1, clipped to
                [1, max_new]; ``--lengths lognormal``, the default) or from a real run's length histogram
                (``--lengths histogram``: ``--lengths-file``, by default the Qwen2.5 long chain-of-thought
                completions of ``benchmarks/data/reasoning_lengths_skythought_qwen25.json``, scaled from the
                source's budget to ``max_new``; see ``histogram_lengths``). Lengths are imposed as per-request
                budgets with no stop token (the continuous
                engine's ``max_lengths``; a static batch decodes ``max(lengths in the batch)`` steps, which is
                what it does when its rows stop by EOS at those lengths). Useful tokens = sum(lengths).
``packing``     update tokens/s of the GRPO update on packed rows (``rl.pack_tokens``) vs padded rows (completion
                lengths drawn as for ``continuous``, per ``--lengths``).
``async``       the LLM recipe (tiny random model) at rl.max_lag = 0 and 1: the measured phase times per step and
                the simulated lag-1 throughput of a disaggregated pipeline (1 / max(R, U) vs 1 / (R + U)).
``lag_experiment``  reward vs step on the arithmetic task (configs/llm_arith.py:cpu) at max_lag 0 / 1 / 2, seeds.

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


def finish(result: dict, json_path: str = "") -> dict:
    """``result`` with the load average after the run, printed as JSON and written to ``json_path`` if given."""
    result["load_after"] = _load()
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


def lognormal_lengths(n: int, max_new: int, seed: int, sigma: float = 1.0) -> np.ndarray:
    """``n`` completion lengths, log-normal with median ``max_new / 8`` and ``sigma``, clipped to [1, max_new]."""
    rng = np.random.default_rng(seed)
    x = np.exp(np.log(max_new / 8.0) + sigma * rng.standard_normal(n))
    return np.clip(np.round(x), 1, max_new).astype(np.int32)


DEFAULT_LENGTHS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "reasoning_lengths_skythought_qwen25.json")


def load_length_histogram(path: str) -> dict:
    """A completion-length histogram: JSON with ``bin_edges`` (B + 1 increasing token counts, first >= 0),
    ``counts`` (B non-negative, positive sum) and ``budget_tokens`` (the source's max new tokens, >= the last
    edge's start); refused with a ``ValueError`` naming the file and the bad field."""
    with open(path, encoding="utf-8") as f:
        hist = json.load(f)
    edges = np.asarray(hist.get("bin_edges", []), dtype=np.float64)
    counts = np.asarray(hist.get("counts", []), dtype=np.float64)
    budget = hist.get("budget_tokens")
    if edges.ndim != 1 or edges.size < 2 or edges[0] < 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"{path}: bin_edges must be >= 2 increasing non-negative numbers, got {edges.tolist()[:8]}")
    if counts.shape != (edges.size - 1,) or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"{path}: counts must be {edges.size - 1} non-negative numbers with a positive sum")
    if not isinstance(budget, (int, float)) or budget <= edges[0]:
        raise ValueError(f"{path}: budget_tokens must be a number above the first bin edge, got {budget!r}")
    return hist


def histogram_lengths(n: int, max_new: int, seed: int, path: str = DEFAULT_LENGTHS_FILE) -> np.ndarray:
    """``n`` completion lengths drawn from the histogram at ``path`` (``load_length_histogram``) and scaled to
    ``max_new``: a bin i with probability counts[i] / sum(counts), a length L uniform in [edges[i], edges[i+1]),
    then round(L * max_new / budget_tokens) clipped to [1, max_new]. The scaling keeps each completion's share of
    the budget (a completion cut at the source's budget stays at ``max_new``), so the static batch's waste and the
    packing fill match the real run's at any budget."""
    hist = load_length_histogram(path)
    edges = np.asarray(hist["bin_edges"], dtype=np.float64)
    counts = np.asarray(hist["counts"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    b = rng.choice(counts.size, size=n, p=counts / counts.sum())
    x = edges[b] + rng.random(n) * (edges[b + 1] - edges[b])
    return np.clip(np.round(x * max_new / float(hist["budget_tokens"])), 1, max_new).astype(np.int32)


def draw_lengths(args, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """(lengths [n], a description for the JSON) per ``--lengths``."""
    if args.lengths == "lognormal":
        return lognormal_lengths(n, args.max_new, seed), {
            "distribution": "lognormal", "median": args.max_new / 8, "sigma": 1.0}
    path = args.lengths_file or DEFAULT_LENGTHS_FILE
    hist = load_length_histogram(path)
    return histogram_lengths(n, args.max_new, seed, path), {
        "distribution": "histogram", "file": os.path.relpath(path, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "source_completions": hist.get("completions"),
        "source_budget_tokens": hist["budget_tokens"], "scale": args.max_new / float(hist["budget_tokens"]),
        "source": (hist.get("source") or {}).get("repository")}


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
    sb = args.static_rows or s  # static batch rows (the GRPO rollout: all requests in one batch, fewer slots)
    if r % s or r % sb:
        raise SystemExit(f"--requests {r} must be a multiple of --rows {s} and --static-rows {sb}")
    lengths, lengths_info = draw_lengths(args, r, args.seed)
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
    batches = [(slice(i, i + sb), int(lengths[i:i + sb].max())) for i in range(0, r, sb)]
    static_fns = {}
    t0 = time.perf_counter()
    for _, m in batches:
        if m not in static_fns:
            static_fns[m] = jax.jit(make_generate_fn(graphdef, SamplingConfig(max_new_tokens=m, **sampling)))
            jax.block_until_ready(static_fns[m](state, tokens[:sb], mask[:sb], key))
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
        "model": args.model, "layers": cfg.num_hidden_layers, "rows": s, "static_rows": sb, "requests": r,
        "prompt_len": p, "lengths": lengths_info,
        "max_new_tokens": n, "length_mean": float(lengths.mean()), "length_median": float(np.median(lengths)),
        "length_max": int(lengths.max()), "useful_tokens": useful,
        "static": {"time_s": t_static, "cpu_s": c_static, "useful_tokens_per_s": useful / t_static,
                   "useful_tokens_per_cpu_s": useful / c_static, "decode_steps": static_steps,
                   "row_step_utilization": useful / (static_steps * sb), "compile_s": compile_static},
        "continuous": {"time_s": t_cont, "cpu_s": c_cont, "useful_tokens_per_s": useful / t_cont,
                       "useful_tokens_per_cpu_s": useful / c_cont, "decode_steps": decode_steps,
                       "slot_utilization": int(stats.slot_steps_used) / (decode_steps * s),
                       "compile_s": compile_cont},
        "speedup_wall": t_static / t_cont, "speedup_cpu": c_static / c_cont,
        "time_per_decode_step_ms": {"static": 1e3 * t_static / static_steps, "continuous": 1e3 * t_cont / decode_steps},
    }


def _rollout_batch(b: int, p: int, n: int, lengths: np.ndarray, vocab: int, seed: int) -> dict:
    """A rollout batch [b, p + n] whose completions have ``lengths`` (full prompts, random tokens and rewards)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (b, p + n)).astype(np.int32)
    cmask = np.arange(n)[None, :] < lengths[:, None]
    tokens[:, p:] = np.where(cmask, tokens[:, p:], 0)
    return {k: jnp.asarray(v) for k, v in {
        "tokens": tokens, "attention_mask": np.concatenate([np.ones((b, p), bool), cmask], 1),
        "completion_mask": cmask, "lengths": lengths.astype(np.int32), "done": lengths < n,
        "rewards": rng.standard_normal(b).astype(np.float32), "reward_valid": np.ones(b, bool),
        "ref_logp": (-3.0 * rng.random((b, n))).astype(np.float32)}.items()}


def bench_packing(args) -> dict:
    """The GRPO update (one optimizer step, grad_accum_steps=1) on padded rows vs packed rows (rl.pack_tokens),
    same batch, same parameters; also the reference log-prob pass. Real tokens = prompt + completion tokens."""
    import dataclasses

    import optax
    from flax import nnx

    from adrpo_jax.rl.step import StepOptions, make_logprob_fn, make_rl_update

    cfg = DecoderConfig(**{**MODELS[args.model], **({"num_hidden_layers": args.layers} if args.layers else {})})
    graphdef, params = nnx.split(build_model(cfg), nnx.Param)
    b, p, n = args.update_rows, args.prompt_len, args.max_new
    lengths, lengths_info = draw_lengths(args, b, args.seed + 7)
    batch = _rollout_batch(b, p, n, lengths, cfg.vocab_size, args.seed)
    real = int(b * p + lengths.sum())
    opts = StepOptions(group_size=args.group_size, prompt_length=p, max_new_tokens=n, beta=0.04,
                       logprob_chunk_size=512)
    tx = optax.adam(1e-5)
    out = {"model": args.model, "layers": cfg.num_hidden_layers, "rows": b, "prompt_len": p, "max_new_tokens": n,
           "pack_tokens": args.pack_tokens, "lengths": lengths_info, "length_mean": float(lengths.mean()),
           "real_tokens": real,
           "padded_tokens": b * (p + n)}
    from adrpo_jax.rl import packing
    m = packing.packs_per_group(b, p + n, args.pack_tokens)
    out["packs_per_group"] = m
    out["packed_fill"] = float(packing.packed_token_fraction(batch["attention_mask"], p, args.pack_tokens, m))
    variants = {"padded": opts, "packed": dataclasses.replace(opts, pack_tokens=args.pack_tokens)}
    fns = {}
    for name, o in variants.items():
        upd = jax.jit(make_rl_update(graphdef, tx, o, None))
        lp = jax.jit(make_logprob_fn(graphdef, o))
        opt_state = tx.init(params)
        t0 = time.perf_counter()
        jax.block_until_ready(upd(params, opt_state, None, batch, jax.random.key(0)))
        jax.block_until_ready(lp(params, None, batch["tokens"], batch["attention_mask"]))
        out.setdefault(name, {})["compile_s"] = time.perf_counter() - t0
        fns[name] = (upd, lp, opt_state)
    times = {name: {"update": [], "logprobs": []} for name in variants}
    for _ in range(args.repeats):  # interleaved
        for name, (upd, lp, opt_state) in fns.items():
            times[name]["update"].append(_timed(lambda: upd(params, opt_state, None, batch, jax.random.key(0))))
            times[name]["logprobs"].append(_timed(lambda: lp(params, None, batch["tokens"], batch["attention_mask"])))
    for name in variants:
        for part in ("update", "logprobs"):
            wall, cpu = np.median(times[name][part], axis=0)
            out[name][part] = {"time_s": float(wall), "cpu_s": float(cpu), "real_tokens_per_s": real / wall,
                               "real_tokens_per_cpu_s": real / cpu}
    for part in ("update", "logprobs"):
        out[f"speedup_{part}_wall"] = out["padded"][part]["time_s"] / out["packed"][part]["time_s"]
        out[f"speedup_{part}_cpu"] = out["padded"][part]["cpu_s"] / out["packed"][part]["cpu_s"]
    return out


def _tiny_model_dir(path: str) -> str:
    """A tiny random Llama HF directory with the char tokenizer (the arithmetic task's alphabet)."""
    from flax import nnx

    from adrpo_jax.models.llm import CausalLM, save_pretrained
    from adrpo_jax.rl.tasks import build_char_tokenizer
    tok = build_char_tokenizer()
    cfg = DecoderConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=(2,), pad_token_id=0, initializer_range=0.05)
    save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tok)
    return path


def bench_async(args) -> dict:
    """The LLM recipe on a tiny random model, synchronous (max_lag=0) then max_lag=1, side by side: the measured
    phase times per step (means after ``--async-warmup`` steps) and the throughput a lag-1 pipeline reaches when
    rollout and update run on separate devices (simulated from the phase times: sync = 1 / (R + U), lag 1 =
    1 / max(R, U), R = rollout + reward + log-prob time, U = update time). On one device of a 2-core CPU the
    overlap cannot show in wall time; the measured lag-1 step time is reported as well."""
    import tempfile

    import ml_collections

    from adrpo_jax.rl.config import add_llm_config
    from adrpo_jax.rl.trainer import RLTrainer
    from adrpo_jax.train.config import add_common_config
    from adrpo_jax.train.metrics import read_jsonl

    root = tempfile.mkdtemp(prefix="bench_async_")
    model_dir = _tiny_model_dir(os.path.join(root, "model"))
    out = {"steps": args.async_steps, "warmup": args.async_warmup, "max_new_tokens": args.async_max_new}
    for lag in (0, 1):
        config = add_llm_config(add_common_config(ml_collections.ConfigDict()))
        config.model.path = model_dir
        config.total_steps, config.log_every, config.eval_every = args.async_steps, 1, 0
        config.checkpoint.every_steps = 10 ** 6
        config.logging.progress_bar, config.logging.tensorboard = False, False
        config.sampling.max_new_tokens, config.sampling.max_prompt_length = args.async_max_new, 16
        config.rl.num_prompts_per_step, config.rl.group_size = 8, 8
        config.rl.max_lag = lag
        config.rl.importance_correction = "truncate" if lag else "none"
        workdir = os.path.join(root, f"lag{lag}")
        t0 = time.perf_counter()
        RLTrainer(config, workdir).run()
        wall = time.perf_counter() - t0
        recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[args.async_warmup:]
        mean = lambda k: float(np.mean([r.get(k, 0.0) for r in recs]))  # noqa: E731
        row = {"step_time_s": mean("step_time_s"), "total_wall_s": wall,
               "time/update": mean("time/update"), "time/reward": mean("time/reward"),
               "time/logprobs": mean("time/logprobs")}
        if lag:
            row.update({"time/rollout_dispatch": mean("time/rollout_dispatch"),
                        "time/rollout_wait": mean("time/rollout_wait"), "async/lag_mean": mean("async/lag"),
                        "is_ratio_mean": mean("is_ratio_mean"), "is_clipped_fraction": mean("is_clipped_fraction")})
        else:
            row["time/rollout"] = mean("time/rollout")
        out[f"lag{lag}"] = row
    sync = out["lag0"]
    r = sync["time/rollout"] + sync["time/reward"] + sync["time/logprobs"]
    u = sync["time/update"]
    out["simulated"] = {"rollout_s": r, "update_s": u, "sync_steps_per_s": 1.0 / (r + u),
                        "lag1_steps_per_s": 1.0 / max(r, u), "lag1_speedup": (r + u) / max(r, u)}
    out["measured_lag1_over_sync_step_time"] = out["lag1"]["step_time_s"] / sync["step_time_s"]
    return out


def lag_experiment(args) -> dict:
    """What lag costs: the arithmetic task's ADRPO recipe (``configs/llm_arith.py:cpu``: the built-in tiny SFT model)
    at rl.max_lag = 0, 1, 2 (lag > 0 with truncated importance weights), ``--lag-seeds`` seeds, ``--lag-steps``
    steps; the training reward (``reward/exact_match_mean``) every ``log_every`` steps, per run and mean over seeds."""
    import importlib.util
    import tempfile

    from adrpo_jax.rl.trainer import RLTrainer
    from adrpo_jax.train.metrics import read_jsonl

    spec = importlib.util.spec_from_file_location(
        "llm_arith", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                  "llm_arith.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tempfile.mkdtemp(prefix="lag_experiment_")
    out: dict = {"steps": args.lag_steps, "seeds": args.lag_seeds, "runs": {}}
    for lag in (0, 1, 2):
        curves = []
        for seed in range(args.lag_seeds):
            config = module.get_config("cpu")
            config.seed, config.total_steps, config.log_every = seed, args.lag_steps, 5
            config.eval_every, config.checkpoint.every_steps = 0, 10 ** 6
            config.model.save_final, config.logging.progress_bar, config.logging.tensorboard = False, False, False
            config.rl.max_lag = lag
            config.rl.importance_correction = "truncate" if lag else "none"
            workdir = os.path.join(root, f"lag{lag}_seed{seed}")
            RLTrainer(config, workdir).run()
            recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            curve = [(r["step"], r["reward/exact_match_mean"]) for r in recs if "reward/exact_match_mean" in r]
            curves.append(curve)
            out["runs"][f"lag{lag}/seed{seed}"] = curve
        steps = [s for s, _ in curves[0]]
        out[f"lag{lag}_mean"] = [(s, float(np.mean([c[i][1] for c in curves]))) for i, s in enumerate(steps)]
        out[f"lag{lag}_final_mean"] = float(np.mean([np.mean([v for _, v in c[-3:]]) for c in curves]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="continuous")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=0, help="override the depth (0: the model's)")
    ap.add_argument("--rows", type=int, default=64, help="static batch rows = continuous slots")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--static-rows", type=int, default=0,
                    help="static batch rows (0: --rows); e.g. = --requests: the GRPO rollout's one batch vs slots")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--lengths", default="lognormal", choices=("lognormal", "histogram"),
                    help="completion lengths: log-normal (median max_new / 8, sigma 1) or drawn from --lengths-file "
                         "scaled to --max-new")
    ap.add_argument("--lengths-file", default="",
                    help="length histogram JSON (bin_edges, counts, budget_tokens); default "
                         "benchmarks/data/reasoning_lengths_skythought_qwen25.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-rows", type=int, default=64, help="packing: rows of the rollout batch")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=1024)
    ap.add_argument("--async-steps", type=int, default=8)
    ap.add_argument("--async-warmup", type=int, default=2, help="steps left out of the means (compilation)")
    ap.add_argument("--async-max-new", type=int, default=64)
    ap.add_argument("--lag-steps", type=int, default=60)
    ap.add_argument("--lag-seeds", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "load_before": _load(), "argv": sys.argv[1:] if argv is None else list(argv)}
    parts = [x for x in args.parts.split(",") if x]
    if "continuous" in parts:
        result["continuous"] = bench_continuous(args)
    if "packing" in parts:
        result["packing"] = bench_packing(args)
    if "async" in parts:
        result["async"] = bench_async(args)
    if "lag_experiment" in parts:
        result["lag_experiment"] = lag_experiment(args)
    return finish(result, args.json)


if __name__ == "__main__":
    main()
