"""Memory of one GRPO / ADRPO update step: LoRA vs full fine-tuning on the same decoder.

    .venv/bin/python benchmarks/bench_lora_memory.py                    # SmolLM2-135M shapes, float32, CPU
    .venv/bin/python benchmarks/bench_lora_memory.py --preset small     # a 4-layer model, seconds
    .venv/bin/python benchmarks/bench_lora_memory.py --preset small --run  # + measured step time / memory

Both variants compile the trainer's real update (`adrpo_jax.rl.step.make_rl_update`: chunked log-probs,
clipped GRPO loss with ADRPO's adaptive KL, AdamW, non-finite guard; parameters and optimizer state donated)
on the same randomly initialised model and batch, differing only in the trainable filter:

  * full:  trainable = every ``nnx.Param``; the trainer also holds a frozen reference copy of all weights.
  * LoRA:  trainable = the adapters (``nnx.LoRAParam``, rank r on q/k/v/o/gate/up/down); the base weights are a
           frozen argument; the reference is the same weights with the adapters off (no copy).

Reported per variant (bytes from XLA's compiled memory analysis of the update executable, so it works on CPU):
trainable parameters; resident state = trainable params + optimizer state + frozen weights + reference copy;
the update's arguments, temporaries and non-aliased outputs; and the step's peak estimate = reference copy (not
an argument of the update, but resident) + arguments + temporaries + outputs - donated aliases. With ``--run``
also the wall time of one (warm) step and the measured memory the step allocates on top of what is resident
(growth of the process's peak RSS during the call, Linux ``/proc/self/clear_refs``; compare it with the XLA
temporaries + non-aliased outputs). Prints a Markdown table with the machine description (and optionally
writes JSON).
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
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from _bench_utils import build_model, machine, make_batch, measured_step_peak, memory_row, nbytes  # noqa: E402
from adrpo_jax.models.llm import DecoderConfig  # noqa: E402
from adrpo_jax.models.lora import LoRAConfig, apply_lora, lora_param_count  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update  # noqa: E402

PRESETS = {
    # SmolLM2-135M(-Instruct) shapes: Llama, 30 layers, hidden 576, 9 heads / 3 kv heads, vocab 49152, tied.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "small": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bench_variant(name, model, trainable, opts, batch, tx, run: bool, reference_copy_bytes: int) -> dict:
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    opt_state = tx.init(params)
    update = jax.jit(make_rl_update(graphdef, tx, opts, None), donate_argnums=(0, 1))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = update.lower(params, opt_state, frozen, batch, key).compile()
    compile_s = time.perf_counter() - t0
    ma = memory_row(compiled)
    row = dict(variant=name, trainable_params=int(sum(x.size for x in jax.tree.leaves(params))),
               trainable_bytes=nbytes(params), opt_state_bytes=nbytes(opt_state), frozen_bytes=nbytes(frozen),
               reference_copy_bytes=reference_copy_bytes, arg_bytes=ma["arg_bytes"], temp_bytes=ma["temp_bytes"],
               out_bytes=ma["out_bytes"], alias_bytes=ma["alias_bytes"], compile_s=compile_s)
    row["resident_bytes"] = (row["trainable_bytes"] + row["opt_state_bytes"] + row["frozen_bytes"]
                             + reference_copy_bytes)
    row["peak_estimate_bytes"] = reference_copy_bytes + ma["peak_bytes"]
    if run:
        copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (donated: keep the model's own arrays alive)
        jax.block_until_ready(compiled(copy(params), copy(opt_state), frozen, batch, key))  # warm-up
        p1, o1 = copy(params), copy(opt_state)
        row["step_s"], row["measured_step_bytes"] = measured_step_peak(compiled, p1, o1, frozen, batch, key)
        del p1, o1
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute and parameter dtype of the base model (adapters stay float32)")
    parser.add_argument("--batch", type=int, default=8, help="rollout rows per update")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--chunk", type=int, default=512, help="log-prob chunk size")
    parser.add_argument("--remat", action="store_true", help="per-layer gradient checkpointing")
    parser.add_argument("--run", action="store_true", help="also run one step of each (slow on CPU)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    cfg = DecoderConfig(**PRESETS[args.preset], dtype=dtype, param_dtype=dtype, remat=args.remat)
    opts = StepOptions(group_size=4, prompt_length=args.prompt_len, max_new_tokens=args.new_tokens, beta=0.04,
                       logprob_chunk_size=args.chunk)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    batch = make_batch(args.batch, args.prompt_len, args.new_tokens, cfg.vocab_size)

    rows = []
    model = build_model(cfg)
    full_bytes = nbytes(nnx.state(model, nnx.Param))
    # full fine-tuning: the trainer holds a frozen reference copy of every weight
    rows.append(bench_variant("full", model, nnx.Param, opts, batch, tx, args.run, reference_copy_bytes=full_bytes))
    apply_lora(model, LoRAConfig(rank=args.rank, alpha=args.alpha, target_modules=TARGETS), rngs=nnx.Rngs(1))
    print(f"LoRA: rank {args.rank} on {', '.join(TARGETS)}: {lora_param_count(model):,} adapter parameters",
          file=sys.stderr)
    rows.append(bench_variant(f"LoRA r={args.rank}", model, nnx.LoRAParam, opts, batch, tx, args.run,
                              reference_copy_bytes=0))

    mib = lambda b: f"{b / 2**20:,.1f}" if b is not None else "n/a"  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - lora_param_count(model)
    print(f"\n{machine()}")
    print(f"model: {args.preset} shapes ({n_params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers), {args.dtype}"
          f"{', remat' if args.remat else ''}; update on {args.batch} rows x {args.prompt_len + args.new_tokens} "
          f"tokens ({args.new_tokens} completion), AdamW, log-prob chunk {args.chunk}\n")
    cols = ["variant", "trainable params", "optimizer state MiB", "resident state MiB", "update args MiB",
            "update temp MiB", "peak estimate MiB", "compile s"]
    if args.run:
        cols += ["step s", "measured step MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["variant"], f"{r['trainable_params']:,}", mib(r["opt_state_bytes"]), mib(r["resident_bytes"]),
                 mib(r["arg_bytes"]), mib(r["temp_bytes"]), mib(r["peak_estimate_bytes"]), f"{r['compile_s']:.1f}"]
        if args.run:
            cells += [f"{r['step_s']:.1f}", mib(r.get("measured_step_bytes"))]
        print("| " + " | ".join(cells) + " |")
    full, lo = rows
    print(f"\nLoRA / full: peak estimate {lo['peak_estimate_bytes'] / full['peak_estimate_bytes']:.2f}x, resident state "
          f"{lo['resident_bytes'] / full['resident_bytes']:.2f}x, update temporaries "
          f"{lo['temp_bytes'] / full['temp_bytes']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
