"""Chips, rooflines and utilization (adrpo_jax/train/perf.py) and the loop-aware FLOP count of programs."""

import time

import jax
import jax.numpy as jnp
import pytest

from adrpo_jax.train import perf
from adrpo_jax.train.programs import Program, loop_factor, matmul_flops


def test_chip_table_and_roofline():
    v5e = perf.chip_for("v5e:2x4")
    assert v5e is perf.CHIPS["v5e"] and v5e.hbm_bytes == 16 * perf.GIB
    assert perf.roofline_seconds(197e12, 0.0, v5e) == pytest.approx(1.0)  # compute-bound: 1 s of peak FLOPs
    assert perf.roofline_seconds(1.0, 819e9, v5e) == pytest.approx(1.0)  # memory-bound: 1 s of bandwidth
    with pytest.raises(KeyError, match="unknown chip 'tpu9'"):
        perf.chip_for("tpu9")
    u = perf.utilization(2e12, 1e12, 2.0, v5e, num_chips=8)
    assert u["mfu"] == pytest.approx(2e12 / 2.0 / (197e12 * 8)) and u["mbu"] == pytest.approx(1e12 / 2.0 / (819e9 * 8))


def test_mfu_of_a_matmul_of_known_size(tmp_path, monkeypatch):
    """The MFU a run reports for a matmul = 2 n^3 / time / this CPU's measured peak (cached once)."""
    monkeypatch.setenv("ADRPO_JAX_CACHE", str(tmp_path))
    chip = perf.cpu_chip(refresh=True)
    assert (tmp_path / "cpu_peaks.json").exists() and chip.peak_flops > 1e8 and chip.bandwidth > 1e8
    n = 512
    fn = lambda a: a @ a  # noqa: E731
    x = jnp.ones((n, n), jnp.float32)
    flops = matmul_flops(jax.make_jaxpr(fn)(x), count_loops=True)
    assert flops == 2 * n ** 3
    jitted = jax.jit(fn)
    jitted(x).block_until_ready()
    t0 = time.perf_counter()
    jitted(x).block_until_ready()
    seconds = time.perf_counter() - t0
    mfu = perf.utilization(flops, 0.0, seconds, chip)["mfu"]
    assert mfu == pytest.approx(2 * n ** 3 / seconds / chip.peak_flops) and 0 < mfu < 1.5


def test_loop_factor_counts_scanned_bodies():
    """A compiler's cost analysis counts a loop body once; the plan's figures count every iteration."""
    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=6)[0]

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    assert loop_factor(scanned, (x, x)) == 6.0
    compiled = Program("s", scanned, args=lambda: (x, x)).compile()
    assert compiled.cost["xla_flops"] == pytest.approx(2 * 64 ** 3, rel=0.05)
    assert compiled.cost["flops"] == pytest.approx(6 * compiled.cost["xla_flops"])
