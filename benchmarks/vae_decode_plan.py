"""Memory and FLOPs of the SD3 VAE decode (``adrpo_jax.models.vae``) without weights: ``nnx.eval_shape`` for the
parameters and XLA's compiled ``memory_analysis()`` / ``cost_analysis()`` of the jitted decode
(:func:`adrpo_jax.models.vae.make_decode_fn`: the VAE state is an argument, as inside the sampler).

    python benchmarks/vae_decode_plan.py [--batch 4] [--latent 64 128] [--dtype float32 bfloat16]
                                         [--batch-chunk 0 1] [--time-latent 16] [--out benchmarks/vae_decode_plan.json]

* Model: SD3 / SD3.5's VAE config (:func:`adrpo_jax.models.vae.sd3_config`: channels (128, 256, 512, 512), 2
  layers per block, 16 latent channels, mid-block attention); latents ``[batch, s, s, 16]`` -> images
  ``[batch, 8 s, 8 s, 3]`` (s = 64: 512 px, s = 128: 1024 px). Forward only (the reward needs no gradient
  through the decode).
* ``--batch-chunk k``: decode k images at a time (``make_decode_fn(..., batch_chunk=k)``, ``jax.lax.map``).
* Compiled for one XLA:CPU device; a GPU compiler fuses differently (read the temp bytes as +-20%).
* ``--time-latent s``: also runs a real decode (random init) of ``[1, s, s, 16]`` on this machine and reports
  seconds (CPU; a rough lower bound on work, not a GPU number).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adrpo_jax.models import vae as V  # noqa: E402

GIB = 1024 ** 3


def plan(batch: int, latent: int, dtype: str, batch_chunk: int | None = None) -> dict:
  config = V.sd3_config(dtype=dtype, param_dtype=dtype)
  abstract = nnx.eval_shape(lambda: V.AutoencoderKL(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  param_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  z = jax.ShapeDtypeStruct((batch, latent, latent, config.latent_channels), jnp.float32)
  t0 = time.time()
  lowered = jax.jit(V.make_decode_fn(graphdef, scaled=True, batch_chunk=batch_chunk)).lower(state, z)
  compiled = lowered.compile()
  compile_s = time.time() - t0
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  out = {"batch": batch, "batch_chunk": batch_chunk, "latent": latent, "image": latent * config.downsample_factor, "dtype": dtype,
         "params": params, "param_bytes": param_bytes,
         "argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
         "temp_bytes": int(ma.temp_size_in_bytes), "flops": flops, "compile_s": round(compile_s, 1)}
  out["peak_gib"] = round((out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]) / GIB, 3)
  return out


def time_decode(latent: int) -> dict:
  config = V.sd3_config()
  vae = V.AutoencoderKL(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(vae)
  fn = jax.jit(V.make_decode_fn(graphdef))
  z = jnp.zeros((1, latent, latent, config.latent_channels), jnp.float32)
  jax.block_until_ready(fn(state, z))
  t0 = time.time()
  jax.block_until_ready(fn(state, z))
  return {"latent": latent, "batch": 1, "dtype": "float32", "device": str(jax.devices()[0]),
          "decode_s": round(time.time() - t0, 2)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--latent", type=int, nargs="+", default=[64, 128])
  ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--batch-chunk", type=int, nargs="+", default=[0], help="0 = whole batch at once")
  ap.add_argument("--time-latent", type=int, default=0)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  rows = []
  for latent in args.latent:
    for dtype in args.dtype:
      for chunk in args.batch_chunk:
        row = plan(args.batch, latent, dtype, chunk or None)
        rows.append(row)
        print(f"decode [{row['batch']}, {latent}, {latent}, 16] (chunk {chunk or row['batch']}) -> {row['image']} px "
              f"{dtype}: params {row['params'] / 1e6:.1f}M ({row['param_bytes'] / GIB:.3f} GiB), temp "
              f"{row['temp_bytes'] / GIB:.2f} GiB, output {row['output_bytes'] / GIB:.3f} GiB, peak "
              f"{row['peak_gib']:.2f} GiB, {row['flops'] / 1e12:.2f} TFLOP (compile {row['compile_s']} s)", flush=True)
  result = {"plan": rows}
  if args.time_latent:
    result["timing"] = time_decode(args.time_latent)
    print(result["timing"], flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
