"""Memory plan of GRPO / ADRPO LoRA fine-tuning of the Qwen2.5-Omni-7B thinker (no weights, nothing allocated).

    .venv/bin/python benchmarks/omni_memory_plan.py [--prompt-len 384] [--new-tokens 256] [--json out.json]

What it does:

* **Parameters** of the full model from ``nnx.eval_shape`` (shapes only): the thinker's LM (Qwen2 layers:
  hidden 3584, 28 layers, 28 heads / 4 kv heads, MLP 18944, vocab 152064, untied lm_head, q/k/v bias) in
  bfloat16 with rank-``r`` LoRA adapters (float32) on q/k/v/o/gate/up/down, and the audio encoder (Whisper-like:
  d_model 1280, 32 layers, 20 heads, FFN 5120, 128 mels, conv1/conv2, ``ln_post``, ``proj`` 1280 -> 3584),
  counted from its shapes (it is frozen; bfloat16).
* **The LoRA update** compiled for abstract inputs (``jax.jit(...).lower(ShapeDtypeStructs).compile()``, the
  trainer's real :func:`adrpo_jax.rl.step.make_rl_update`: chunked completion log-probs, clipped GRPO loss with
  ADRPO's adaptive KL, AdamW, per-layer remat, layer scan) and read from XLA's ``memory_analysis`` (CPU
  compiler: TPU / GPU compilers lay buffers out differently, so these are estimates of the same program).
  Compiling all 28 layers of 7B shapes is slow on a laptop CPU, so it compiles the model with ``2`` and ``4``
  layers and ``b`` and ``2b`` sequences and extrapolates linearly: per layer and per sequence (stated in the
  output). The frozen encoder runs once per prompt outside the update (no gradient, no stored activations):
  its forward temporaries are small next to the LM's and are not part of the update.
  The update is compiled in **float32** (weights and activations): XLA's CPU compiler upcasts bfloat16 matmul
  operands to float32 copies (a whole layer's weights per layer in the temporaries), which would swamp the
  activations; float32 activations are an upper bound of the bfloat16 ones (about 2x).
* **Two targets**: one 80 GB GPU (one device, micro-batch of ``b`` sequences), and a TPU v5e-8 (8 chips x
  16 GiB) proxied by an 8-device CPU mesh (``fsdp=8``: weights, adapters and optimizer state sharded 8 ways,
  one sequence per chip per micro-batch); per-device numbers.
* **The rollout's KV cache** (bfloat16, ``2 * layers * kv_heads * head_dim`` per token) for ``G`` samples.

The audio tokens: 25 per second of audio (a 10 s AVQA clip = 250 tokens, 30 s = 750); the default prompt of
384 tokens is a ~10 s clip plus the question and the chat template; the completion budget 256 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from adrpo_jax.models.llm import CausalLM, DecoderConfig  # noqa: E402
from adrpo_jax.models.lora import LoRAConfig, apply_lora  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update  # noqa: E402
from adrpo_jax.train.sharding import logical_to_named_sharding  # noqa: E402

GiB = 2**30
LM = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
          num_attention_heads=28, num_key_value_heads=4, attention_bias=True, rope_theta=1e6,
          tie_word_embeddings=False, rms_norm_eps=1e-6)
ENC = dict(d_model=1280, layers=32, heads=20, ffn=5120, n_mels=128, out_dim=3584, max_source_positions=1500)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def encoder_param_count(e=ENC) -> int:
  """Parameters of the Omni audio encoder (Whisper-like; sinusoidal positions are not parameters)."""
  d, f = e["d_model"], e["ffn"]
  attn = 4 * d * d + 3 * d  # q, k, v, out; q/v/out bias (no k bias)
  mlp = 2 * d * f + f + d
  norms = 2 * 2 * d
  layer = attn + mlp + norms
  convs = e["n_mels"] * d * 3 + d + d * d * 3 + d
  return e["layers"] * layer + convs + 2 * d + d * e["out_dim"] + e["out_dim"]  # ln_post, proj


def abstract_model(layers: int, rank: int, dtype=jnp.bfloat16):
  cfg = DecoderConfig(**dict(LM, num_hidden_layers=layers), dtype=dtype, param_dtype=dtype,
                      remat=True, scan_layers=True, attention_impl="chunked")
  lora = LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS)
  return nnx.eval_shape(lambda: apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), lora, rngs=nnx.Rngs(1)))


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_batch(b, p, n, sharding=None):
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  return {"tokens": s((b, p + n), jnp.int32), "attention_mask": s((b, p + n), jnp.bool_),
          "completion_mask": s((b, n), jnp.bool_), "lengths": s((b,), jnp.int32), "done": s((b,), jnp.bool_),
          "rewards": s((b,), jnp.float32), "reward_valid": s((b,), jnp.bool_), "ref_logp": s((b, n), jnp.float32)}


def compile_update(layers: int, batch: int, args, mesh: Mesh | None) -> dict:
  model = abstract_model(layers, args.rank, jnp.float32)  # see the module docstring: f32 on the CPU compiler
  graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
  tx = optax.adamw(1e-6, weight_decay=0.0)
  opt_state = jax.eval_shape(tx.init, params)
  opts = StepOptions(group_size=min(batch, 8), prompt_length=args.prompt_len, max_new_tokens=args.new_tokens,
                     beta=0.04, logprob_chunk_size=args.chunk)
  if mesh is not None:
    shard = lambda t: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t,  # noqa: E731
                                   logical_to_named_sharding(t, mesh))
    params, frozen = shard(params), shard(frozen)
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
        mesh, P())) if a.ndim == 0 else a, opt_state)
    batch_tree = abstract_batch(batch, args.prompt_len, args.new_tokens, NamedSharding(mesh, P(("data", "fsdp"))))
  else:
    batch_tree = abstract_batch(batch, args.prompt_len, args.new_tokens)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  fn = jax.jit(make_rl_update(graphdef, tx, opts, mesh), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = fn.lower(params, opt_state, frozen, batch_tree, key).compile()
  ma = compiled.memory_analysis()
  return dict(layers=layers, batch=batch, temp=int(ma.temp_size_in_bytes), arg=int(ma.argument_size_in_bytes),
              out=int(ma.output_size_in_bytes), alias=int(ma.alias_size_in_bytes),
              compile_s=time.perf_counter() - t0)


def extrapolate(rows, layers: int, batch: int) -> float:
  """temp(L, b) ~ c + L * (l0 + b * l1) + b * s: fitted on the (2, b0), (4, b0), (2, 2 b0), (4, 2 b0) corners."""
  (l_a, l_b), (b_a, b_b) = sorted({r["layers"] for r in rows}), sorted({r["batch"] for r in rows})
  t = {(r["layers"], r["batch"]): r["temp"] for r in rows}
  per_layer = {bb: (t[(l_b, bb)] - t[(l_a, bb)]) / (l_b - l_a) for bb in (b_a, b_b)}
  base = {bb: t[(l_a, bb)] - l_a * per_layer[bb] for bb in (b_a, b_b)}
  lay = per_layer[b_a] + (per_layer[b_b] - per_layer[b_a]) * (batch - b_a) / (b_b - b_a)
  bas = base[b_a] + (base[b_b] - base[b_a]) * (batch - b_a) / (b_b - b_a)
  return bas + layers * lay


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompt-len", type=int, default=384)
  ap.add_argument("--new-tokens", type=int, default=256)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--chunk", type=int, default=256, help="log-prob chunk size")
  ap.add_argument("--group-size", type=int, default=8, help="G: samples per prompt (KV cache)")
  ap.add_argument("--json")
  args = ap.parse_args(argv)
  p, n, L = args.prompt_len, args.new_tokens, LM["num_hidden_layers"]

  full = abstract_model(L, args.rank)
  lora, base = nnx.state(full, nnx.LoRAParam), nnx.state(full, nnx.Not(nnx.LoRAParam))
  enc_params = encoder_param_count()
  r = dict(lm_params=count(base), lm_bytes=nbytes(base), lora_params=count(lora), lora_bytes=nbytes(lora),
           adam_bytes=2 * nbytes(lora), encoder_params=enc_params, encoder_bytes=2 * enc_params)
  kv_per_token = 2 * L * LM["num_key_value_heads"] * (LM["hidden_size"] // LM["num_attention_heads"]) * 2
  r["kv_bytes_per_token"] = kv_per_token
  print(f"LM {r['lm_params'] / 1e9:.2f} B params ({r['lm_bytes'] / GiB:.2f} GiB bf16); audio encoder "
        f"{enc_params / 1e6:.0f} M ({r['encoder_bytes'] / GiB:.2f} GiB bf16); LoRA r={args.rank} "
        f"{r['lora_params'] / 1e6:.1f} M ({r['lora_bytes'] / GiB:.3f} GiB f32) + AdamW {r['adam_bytes'] / GiB:.3f} GiB",
        flush=True)

  # -- one GPU: compile 2 / 4 layers x 1 / 2 sequences, extrapolate to 28 layers --------------------------
  gpu_rows = []
  for layers in (2, 4):
    for b in (1, 2):
      gpu_rows.append(compile_update(layers, b, args, None))
      print(f"  gpu proxy: {layers} layers, {b} seq: temp {gpu_rows[-1]['temp'] / GiB:.2f} GiB "
            f"(compile {gpu_rows[-1]['compile_s']:.0f} s)", flush=True)
  resident = r["lm_bytes"] + r["encoder_bytes"] + r["lora_bytes"] + r["adam_bytes"]
  per_seq = extrapolate(gpu_rows, L, 2) - extrapolate(gpu_rows, L, 1)
  fixed = extrapolate(gpu_rows, L, 1) - per_seq
  kv = kv_per_token * (p + n) * args.group_size
  budget = 80e9 * 0.9 - resident - max(0.0, fixed)
  gpu = dict(resident=resident, update_fixed=fixed, update_per_seq=per_seq, kv_cache_group=kv,
             max_micro_batch=int(budget // per_seq) if per_seq > 0 else None, rows=gpu_rows)

  # -- TPU v5e-8 proxy: 8-device CPU mesh, fsdp=8, one sequence per device -------------------------------
  devices = np.array(jax.devices()[:8]).reshape(1, 8, 1)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  tpu_rows = []
  for layers in (2, 4):
    for b in (8, 16):
      tpu_rows.append(compile_update(layers, b, args, mesh))
      print(f"  tpu proxy (8 devices, fsdp=8): {layers} layers, {b} seq: temp/device "
            f"{tpu_rows[-1]['temp'] / GiB:.2f} GiB (compile {tpu_rows[-1]['compile_s']:.0f} s)", flush=True)
  t1, t2 = extrapolate(tpu_rows, L, 8), extrapolate(tpu_rows, L, 16)  # 1 and 2 sequences per device
  t_per_seq = t2 - t1  # per device, per sequence per device
  t_fixed = t1 - t_per_seq
  t_resident = resident / 8  # everything sharded 8 ways (fsdp)
  t_budget = 16 * GiB * 0.9 - t_resident - max(0.0, t_fixed)
  tpu = dict(resident_per_device=t_resident, update_fixed_per_device=t_fixed,
             update_per_seq_per_device=t_per_seq, kv_cache_group_per_device=kv / 8,
             max_seqs_per_device=int(t_budget // t_per_seq) if t_per_seq > 0 else None, rows=tpu_rows)

  g = lambda x: f"{x / GiB:.2f}"  # noqa: E731
  print(f"\nQwen2.5-Omni-7B thinker, LoRA r={args.rank} (q/k/v/o/gate/up/down), bf16 weights, f32 adapters + AdamW, "
        f"remat + layer scan; update temporaries measured with float32 activations (an upper bound, ~2x bf16); sequence = {p} prompt (audio + text) + {n} completion tokens. Update temporaries "
        f"compiled for 2 and 4 layers x 2 micro-batch sizes on CPU and extrapolated linearly to {L} layers.\n")
  print("| target | weights (LM + encoder) | LoRA + AdamW | update: fixed | update: per sequence | "
        f"KV cache, G={args.group_size} x {p + n} tok | sequences per micro-batch (90% of memory) |")
  print("|---|---|---|---|---|---|---|")
  print(f"| 1x 80 GB GPU | {g(r['lm_bytes'] + r['encoder_bytes'])} GiB | {g(r['lora_bytes'] + r['adam_bytes'])} GiB | "
        f"{g(fixed)} GiB | {g(per_seq)} GiB | {g(kv)} GiB | {gpu['max_micro_batch']} |")
  print(f"| TPU v5e-8 (per chip, fsdp=8) | {g((r['lm_bytes'] + r['encoder_bytes']) / 8)} GiB | "
        f"{g((r['lora_bytes'] + r['adam_bytes']) / 8)} GiB | {g(tpu['update_fixed_per_device'])} GiB | "
        f"{g(t_per_seq)} GiB | {g(kv / 8)} GiB | {tpu['max_seqs_per_device']} per chip |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "params": r, "gpu": gpu, "tpu": tpu}, f, indent=2)
  return r, gpu, tpu


if __name__ == "__main__":
  main()
