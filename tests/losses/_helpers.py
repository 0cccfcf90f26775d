"""Shared test utilities: meshes over the 8 forced CPU devices and central differences."""

from __future__ import annotations

import jax
import numpy as np

AUTO = jax.sharding.AxisType.Auto


def mesh_1d(n: int = 8) -> jax.sharding.Mesh:
    return jax.make_mesh((n,), ("data",), axis_types=(AUTO,))


def mesh_2d(a: int = 4, b: int = 2) -> jax.sharding.Mesh:
    return jax.make_mesh((a, b), ("data", "fsdp"), axis_types=(AUTO, AUTO))


def central_diff_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Gradient of the float64 NumPy function ``f`` at ``x`` by central differences (independent of JAX AD)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g
