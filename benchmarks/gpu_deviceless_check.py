"""How close is a deviceless XLA:GPU compile (the plan mode's ``h100:N`` target, no GPU) to the real H100?

    # here, no GPU (the CUDA plugin installed, JAX_PLATFORMS=cpu):
    python benchmarks/gpu_deviceless_check.py --mode deviceless --out deviceless.json
    # on an H100:
    python benchmarks/gpu_deviceless_check.py --mode device --out device.json

One program, a transformer-like training step (embedding, L blocks of attention + GELU MLP in bfloat16 with
float32 master weights, log-softmax loss, an Adam-style update with donated state: ~0.4 B parameters), compiled
for one H100. ``deviceless``: the plan mode's compile (``adrpo_jax.recipe.plan.gpu_target_config``), its
``memory_analysis()``. ``device``: the same program compiled on the GPU (its ``memory_analysis()``), then run
twice on real arrays; the allocator's ``peak_bytes_in_use`` minus what was in use before is the measured peak.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODE = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--mode=")), None) or (
    sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "deviceless")
if MODE == "deviceless":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers without a driver only so

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

L, D, F, B, S, V = 8, 2048, 8192, 8, 2048, 32000
GIB = 2 ** 30


def shapes():
    p = {"emb": (V, D), "out": (D, V)}
    for i in range(L):
        p[f"w1_{i}"], p[f"w2_{i}"], p[f"wq_{i}"] = (D, F), (F, D), (D, D)
    return p


def loss(p, tok):
    h = p["emb"][tok].astype(jnp.bfloat16)
    for i in range(L):
        a = jax.nn.softmax((h @ p[f"wq_{i}"].astype(jnp.bfloat16)) @ h.swapaxes(-1, -2) / 45.0, axis=-1) @ h
        h = h + a
        h = h + jax.nn.gelu(h @ p[f"w1_{i}"].astype(jnp.bfloat16)) @ p[f"w2_{i}"].astype(jnp.bfloat16)
    logits = (h @ p["out"].astype(jnp.bfloat16)).astype(jnp.float32)
    return -jax.nn.log_softmax(logits)[..., 0].mean()


def step(p, m, v, tok):
    value, g = jax.value_and_grad(loss)(p, tok)
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
    p = jax.tree.map(lambda p, m, v: p - 1e-3 * m / (jnp.sqrt(v) + 1e-8), p, m, v)
    return p, m, v, value


def memory(compiled):
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("deviceless", "device"), default="deviceless")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.mode == "deviceless":
        from jax.experimental import topologies
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from adrpo_jax.recipe.plan import gpu_target_config
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config("h100"),
                                            topology="1x1x1")
        mesh = topologies.make_mesh(topo, (1,), ("data",))
    else:
        mesh = jax.make_mesh((1,), ("data",), devices=jax.devices("gpu")[:1])
    rep = NamedSharding(mesh, P())
    ps = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep) for k, s in shapes().items()}
    tok = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=rep)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(ps, ps, ps, tok).compile()
    report = {"mode": args.mode, "jax": jax.__version__, "compile_s": time.perf_counter() - t0,
              "params": sum(a * b for a, b in shapes().values()), "memory": memory(compiled)}
    if args.mode == "device":
        dev = jax.devices("gpu")[0]
        report["device"] = dev.device_kind
        p = {k: jax.device_put(jnp.full(s, 0.01, jnp.float32), rep) for k, s in shapes().items()}
        m = jax.tree.map(jnp.zeros_like, p)
        v = jax.tree.map(jnp.zeros_like, p)
        t = jax.device_put(jnp.zeros((B, S), jnp.int32), rep)
        jax.block_until_ready((p, m, v, t))
        before = dev.memory_stats()
        for _ in range(2):
            p, m, v, value = compiled(p, m, v, t)
        jax.block_until_ready(value)
        after = dev.memory_stats()
        report["allocator"] = {"in_use_before": before.get("bytes_in_use"),
                               "peak_bytes_in_use": after.get("peak_bytes_in_use"),
                               "measured_peak_minus_resident_args": after.get("peak_bytes_in_use", 0)
                               - before.get("bytes_in_use", 0)}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
