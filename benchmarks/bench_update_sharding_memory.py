"""Per-device XLA temp memory of the real `make_rl_update` on 8 forced CPU devices, fsdp=8 vs data=8 (issue 13
item 5, the issue's shape): SmolLM2-135M layer shape (hidden 576, 9 / 3 heads, intermediate 1536, vocab 49,152,
tied), the `tpu` config's numerics (configs/llm_arith.py: bfloat16 compute, float32 parameters, per-layer
remat, log-prob chunk 1024, AdamW, adaptive ADRPO, full fine-tuning), one minibatch of 128 rows x (128 prompt +
64 completion) tokens. Compile + `memory_analysis()` only, nothing runs.

    python benchmarks/bench_update_sharding_memory.py --layers 4,12
    python benchmarks/bench_update_sharding_memory.py --layers 4 --before   # also without the batch hint
"""
import argparse
import contextlib
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from adrpo_jax import train  # noqa: E402
from adrpo_jax.models.llm import CausalLM, DecoderConfig  # noqa: E402
from adrpo_jax.rl.step import StepOptions, make_rl_update  # noqa: E402
from adrpo_jax.train.sharding import BATCH_AXES  # noqa: E402


def temp_mib(cfg, mesh_shape, b, pl, nl, *, hint=True):
  mesh = train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
  tx = optax.adamw(1e-6)

  def init():
    params = nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    return {"params": params, "opt_state": tx.init(params)}

  abstract = train.plan_sharded(init, mesh)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
  opts = StepOptions(group_size=8, prompt_length=pl, max_new_tokens=nl, beta=0.04, adaptive=True,
                     logprob_chunk_size=1024)
  bs = NamedSharding(mesh, P(BATCH_AXES))
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)  # noqa: E731
  batch = {"tokens": s((b, pl + nl), jnp.int32), "attention_mask": s((b, pl + nl), jnp.bool_),
           "completion_mask": s((b, nl), jnp.bool_), "lengths": s((b,), jnp.int32), "done": s((b,), jnp.bool_),
           "rewards": s((b,), jnp.float32), "reward_valid": s((b,), jnp.bool_), "ref_logp": s((b, nl), jnp.float32)}
  update = make_rl_update(graphdef, tx, opts, mesh)
  import adrpo_jax.rl.step as step_lib
  original = step_lib._mesh_context
  if not hint:  # the "before": no abstract mesh while tracing, so no batch constraint in the model
    step_lib._mesh_context = lambda m: contextlib.nullcontext()
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(update).lower(abstract["params"], abstract["opt_state"], None, batch,
                                     jax.random.key(0)).compile()
    dt = time.perf_counter() - t0
  finally:
    step_lib._mesh_context = original
  return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, dt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", default="4,12")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--completion", type=int, default=64)
  ap.add_argument("--meshes", default="fsdp,data")
  ap.add_argument("--before", action="store_true", help="also compile without the batch hint (the old graph)")
  args = ap.parse_args()
  print(f"{jax.device_count()} CPU devices, jax {jax.__version__}; B={args.batch}, P={args.prompt}, "
        f"N={args.completion}; bfloat16 compute, float32 params, remat, chunk 1024", flush=True)
  for n_layers in [int(x) for x in args.layers.split(",")]:
    cfg = DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                        dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    for hint in ((True, False) if args.before else (True,)):
      for axis in args.meshes.split(","):
        mib, dt = temp_mib(cfg, {axis: 8}, args.batch, args.prompt, args.completion, hint=hint)
        print(f"layers {n_layers:3d}  {axis}=8  {'after (batch hint)' if hint else 'before (no hint)':20s} "
              f"temp {mib:9.1f} MiB per device   compile {dt:6.1f} s", flush=True)


if __name__ == "__main__":
  main()
