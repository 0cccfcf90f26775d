"""Memory plan of SD3-medium LoRA fine-tuning (ADRPO-W2 update step) without weights: ``jax.eval_shape`` for the
parameter / optimizer sizes and XLA's compiled ``memory_analysis()`` for the activations.

    python benchmarks/sd3_memory_plan.py [--out benchmarks/sd3_memory_plan.json]

* Model: the diffusers config of ``stabilityai/stable-diffusion-3-medium`` (transformer: sample_size 128, patch
  2, 16 latent channels, 24 layers, 24 heads x 64, joint_attention_dim 4096, caption_projection_dim 1536,
  pooled_projection_dim 2048, pos_embed_max_size 192) as :mod:`adrpo_jax.models.mmdit` builds it, wrapped by
  :class:`adrpo_jax.flow.sd3.MMDiTVelocity` (text states 77 + 256 = 333 tokens of width 4096, the layout
  :mod:`adrpo_jax.flow.text_embeddings` produces); bfloat16 compute, float32 master weights, per-layer remat,
  LoRA rank 16 on every linear layer of the transformer (``all-linear``), Adam on the adapters.
* Step: :func:`adrpo_jax.flow.step.make_flow_update` (ADRPO-W2: one policy forward + backward, one reference
  forward with the adapters off, the loss, Adam), batch = 1 image per device (the rollout's 28 sampling steps
  run without gradients and are not in this number).
* Sizes of the full 24-layer model come from ``nnx.eval_shape`` (exact). Activations: compiling the 24-layer
  step on this 2-core CPU takes too long, so the step is compiled with 3 and 4 layers (``scan_layers``: scans of
  2 and 3 blocks + the last block; a 1-block scan compiles differently and is not used) and XLA's temp memory is
  extrapolated linearly per layer: ``temp(24) = temp(3) + 21 (temp(4) - temp(3))`` (with per-layer remat the
  saved activations grow linearly with depth; the peak of one layer's recompute is in temp(3)).
  ``--linearity-check`` also compiles 5 layers to check the slope.
* "1 GPU": compiled for one device (XLA:CPU's buffer assignment stands in for the GPU's; the GPU compiler fuses
  differently, so read the activations as +-20%). "TPU v5e-8": compiled on 8 forced CPU devices with the
  parameters, adapters and optimizer state FSDP-sharded over 8 (``mesh.fsdp=8``), 1 image per device, per-device
  numbers (a proxy for the TPU compiler, same caveat).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adrpo_jax import train  # noqa: E402
from adrpo_jax.flow.sd3 import MMDiTVelocity  # noqa: E402
from adrpo_jax.flow.config import SD3_LORA_TARGETS as LORA_DEFAULT_TARGETS  # noqa: E402
from adrpo_jax.flow.step import FlowStepOptions, make_flow_update  # noqa: E402
from adrpo_jax.models import mmdit  # noqa: E402
from adrpo_jax.models.lora import LoRAConfig, apply_lora, set_lora_enabled  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TEXT_LEN = 77 + 256
LORA = LoRAConfig(rank=16, alpha=16.0, target_modules=LORA_DEFAULT_TARGETS)
GIB = 1024 ** 3


def model_config(num_layers: int):
    return mmdit.MMDiTConfig(**dict(SD3_MEDIUM, num_layers=num_layers), dtype="bfloat16", param_dtype="float32",
                             remat=True, scan_layers=True)


def new_model(num_layers: int, lora: bool = True):
    model = MMDiTVelocity(mmdit.MMDiT(model_config(num_layers), rngs=nnx.Rngs(0)),
                          jnp.zeros((2, TEXT_LEN, SD3_MEDIUM["joint_attention_dim"]), jnp.float32),
                          jnp.zeros((2, SD3_MEDIUM["pooled_projection_dim"]), jnp.float32), null_id=1)
    if lora:
        apply_lora(model, LORA, rngs=nnx.Rngs(params=1))
    return model


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def sizes() -> dict:
    """Exact sizes of the full model (no allocation)."""
    abstract = nnx.eval_shape(lambda: new_model(SD3_MEDIUM["num_layers"]))
    _, lora_p, rest = nnx.split(abstract, nnx.LoRAParam, ...)
    base = nnx.state(abstract, nnx.Param)
    tx = optax.adam(1e-4)
    opt = jax.eval_shape(tx.init, lora_p)
    return {"base_params": count(base), "base_param_bytes_fp32": nbytes(base), "lora_params": count(lora_p),
            "lora_param_bytes": nbytes(lora_p), "adam_state_bytes": nbytes(opt),
            "frozen_bytes": nbytes(rest)}


def compile_update(num_layers: int, latent: int, mesh_shape: dict | None) -> dict:
    """Compiles the LoRA ADRPO-W2 update of a ``num_layers`` model at ``latent x latent`` latents, one image per
    device; returns XLA's memory analysis (per device) and the compile time."""
    n_dev = 1 if mesh_shape is None else int(np.prod(list(mesh_shape.values())))
    batch = n_dev
    abstract = nnx.eval_shape(lambda: new_model(num_layers))
    graphdef, lora_p, frozen = nnx.split(abstract, nnx.LoRAParam, ...)
    base_graphdef = nnx.split(set_lora_enabled(abstract, False), nnx.LoRAParam, ...)[0]
    tx = optax.adam(1e-4)
    opts = FlowStepOptions(num_conditions=1, null_class=1, image_shape=(latent, latent, SD3_MEDIUM["in_channels"]),
                           method="adrpo", time_sampling="logit_normal")
    if mesh_shape is None:
        mesh = None
        shard = lambda tree: tree  # noqa: E731
        batch_sharding = None
    else:
        mesh = train.make_mesh(dict({"data": 1, "fsdp": 1, "tensor": 1}, **mesh_shape), jax.devices()[:n_dev])

        def shard(tree):
            sh = train.logical_to_named_sharding(tree, mesh)
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

        batch_sharding = train.batch_sharding(mesh)
    opt = jax.eval_shape(tx.init, lora_p)
    update = make_flow_update(graphdef, tx, opts, mesh, ref_graphdef=base_graphdef)

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) if batch_sharding is not None else \
            jax.ShapeDtypeStruct(shape, dtype)

    batch = {"x1": sds((batch, latent, latent, SD3_MEDIUM["in_channels"]), jnp.float32),
             "cond": sds((batch,), jnp.int32), "rewards": sds((batch,), jnp.float32)}
    args = (shard(lora_p), shard(opt), shard(lora_p), shard(frozen), batch, jax.random.key(0))
    t0 = time.perf_counter()
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(*args).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    return {"layers": num_layers, "latent": latent, "devices": n_dev, "compile_s": round(secs, 1),
            "argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes), "alias_bytes": int(ma.alias_size_in_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "sd3_memory_plan.json"))
    parser.add_argument("--latents", default="64,128")
    parser.add_argument("--linearity-check", action="store_true", help="also compile 5 layers (latent 64, 1 device)")
    args = parser.parse_args()
    result = {"sizes": sizes(), "compiled": []}
    s = result["sizes"]
    print(json.dumps(s, indent=1), flush=True)
    for latent in [int(x) for x in args.latents.split(",")]:
        for mesh_shape in (None, {"fsdp": 8}):
            # 3 and 4 layers: scans of 2 and 3 blocks + the last block (a scan of 1 block compiles differently)
            check = latent == 64 and mesh_shape is None and args.linearity_check
            for layers in ((3, 4, 5) if check else (3, 4)):
                r = compile_update(layers, latent, mesh_shape)
                print(json.dumps(r), flush=True)
                result["compiled"].append(r)
    rows = []
    n = SD3_MEDIUM["num_layers"]
    for latent in sorted({r["latent"] for r in result["compiled"]}):
        for devices in (1, 8):
            one, two = [next(r for r in result["compiled"] if r["latent"] == latent and r["devices"] == devices
                             and r["layers"] == k) for k in (3, 4)]
            per_layer = two["temp_bytes"] - one["temp_bytes"]
            act = one["temp_bytes"] + (n - 3) * per_layer
            params = s["base_param_bytes_fp32"] / devices
            state = (s["lora_param_bytes"] + s["adam_state_bytes"]) / devices
            budget = 80 * 1e9 if devices == 1 else 16 * GIB
            total = params + state + act
            rows.append({"target": "1 GPU (80 GB)" if devices == 1 else "TPU v5e-8 (per chip, 16 GiB)",
                         "image_px": latent * 8, "latent": latent, "params_gib": params / GIB,
                         "lora_adam_gib": state / GIB, "act_per_image_gib": act / GIB,
                         "act_per_layer_gib": per_layer / GIB, "total_gib_1_image": total / GIB,
                         "max_images_per_device": int(max(0, (budget - params - state)) // max(act, 1))})
    result["table"] = rows
    print("| target | image | params (fp32) | LoRA + Adam | activations / image (24 layers) | per layer | total, "
          "1 image / device | images / device that fit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['image_px']} px (latent {r['latent']}) | {r['params_gib']:.2f} GiB | "
              f"{r['lora_adam_gib'] * 1024:.0f} MiB | {r['act_per_image_gib']:.2f} GiB | "
              f"{r['act_per_layer_gib'] * 1024:.0f} MiB | {r['total_gib_1_image']:.2f} GiB | "
              f"{r['max_images_per_device']} |")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
