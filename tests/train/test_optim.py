"""make_optimizer: every optimizer/schedule builds and steps, schedules, clipping, weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.train import optim
from adrpo_jax.train.config import OPTIMIZERS, SCHEDULES, ConfigError, common_config

PARAMS = {"w": jnp.full((3, 2), 0.5), "b": jnp.full((2,), 0.5)}
GRADS = {"w": jnp.arange(6.0).reshape(3, 2) / 10, "b": jnp.array([0.3, -0.4])}


def cfg(**kw):
    c = common_config().optim
    c.grad_clip_norm = 0.0
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.parametrize("name,schedule", [(n, SCHEDULES[i % len(SCHEDULES)]) for i, n in enumerate(OPTIMIZERS)])
def test_every_optimizer_and_schedule_steps(name, schedule):
    tx, sched = optim.make_optimizer(cfg(name=name, schedule=schedule, learning_rate=0.1, warmup_steps=1,
                                         weight_decay=0.01), total_steps=10)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    for _ in range(2):
        updates, state = step(GRADS, state, PARAMS)
    leaves = jax.tree.leaves(updates)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in leaves)
    assert any(float(jnp.abs(u).max()) > 0 for u in leaves)
    assert float(sched(0)) == 0.0 and math.isclose(float(sched(1)), 0.1, rel_tol=1e-6)


def test_schedules_against_formulas():
    lr, warm, total, end = 2e-3, 10, 110, 0.1
    _, cos = optim.make_optimizer(cfg(learning_rate=lr, warmup_steps=warm, schedule="cosine", end_lr_factor=end), total)
    _, lin = optim.make_optimizer(cfg(learning_rate=lr, warmup_steps=warm, schedule="linear", end_lr_factor=end), total)
    _, const = optim.make_optimizer(cfg(learning_rate=lr, warmup_steps=0, schedule="constant"), total)
    for s in (0, 3, 10, 35, 60, 110, 200):
        if s < warm:
            expect_cos = expect_lin = lr * s / warm
        else:
            frac = min((s - warm) / (total - warm), 1.0)
            expect_cos = lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)))
            expect_lin = lr * (1 - (1 - end) * frac)
        assert math.isclose(float(cos(s)), expect_cos, rel_tol=1e-5, abs_tol=1e-9), s
        assert math.isclose(float(lin(s)), expect_lin, rel_tol=1e-5, abs_tol=1e-9), s
        assert math.isclose(float(const(s)), lr, rel_tol=1e-6)


def test_global_norm_clipping_with_sgd():
    grads = {"w": jnp.array([[3.0, 0.0]]), "b": jnp.array([4.0])}  # global norm 5
    params = {"w": jnp.zeros((1, 2)), "b": jnp.zeros(1)}
    tx, _ = optim.make_optimizer(cfg(name="sgd", learning_rate=1.0, schedule="constant", grad_clip_norm=1.0), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [[-0.6, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)
    tx, _ = optim.make_optimizer(cfg(name="sgd", learning_rate=1.0, schedule="constant", grad_clip_norm=10.0), 10)
    updates, _ = tx.update(grads, tx.init(params), params)  # norm below the threshold: untouched
    np.testing.assert_allclose(updates["b"], [-4.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_mask_excludes_1d_params_by_default(name):
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    lr, wd = 0.5, 0.1
    for include_1d in (False, True):
        tx, _ = optim.make_optimizer(cfg(name=name, learning_rate=lr, schedule="constant", weight_decay=wd,
                                         weight_decay_1d=include_1d), 10)
        updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
        # zero gradient: the only update is the decay -lr * wd * p on decayed leaves
        np.testing.assert_allclose(updates["w"], -lr * wd * 0.5 * np.ones((3, 2)), rtol=1e-6)
        np.testing.assert_allclose(updates["b"], (-lr * wd * 0.5 if include_1d else 0.0) * np.ones(2), rtol=1e-6,
                                   atol=1e-12)
    mask = optim.weight_decay_mask(PARAMS)
    assert mask == {"w": True, "b": False}


def test_bad_optimizer_config_names_key():
    with pytest.raises(ConfigError, match=r"`optim.name` must be one of .* got 'rmsprop'"):
        optim.make_optimizer(cfg(name="rmsprop"), 10)
    with pytest.raises(ConfigError, match=r"`optim.schedule`"):
        optim.make_optimizer(cfg(schedule="exp"), 10)
    with pytest.raises(ConfigError, match=r"`optim.learning_rate` must be > 0.0, got -1.0"):
        optim.make_optimizer(cfg(learning_rate=-1.0), 10)
    with pytest.raises(ConfigError, match=r"`optim.warmup_steps`"):
        optim.make_optimizer(cfg(warmup_steps=20), 10)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_mu_dtype_bfloat16_halves_the_first_moment(name):
    params = {"w": jnp.ones((4, 3), jnp.float32)}
    tx, _ = optim.make_optimizer(cfg(name=name, mu_dtype="bfloat16"), 10)
    state = tx.init(params)
    mus = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (4, 3)]
    assert any(x.dtype == jnp.bfloat16 for x in mus)
    updates, _ = tx.update({"w": jnp.full((4, 3), 0.5)}, state, params)
    assert updates["w"].dtype == jnp.float32
    default = optim.make_optimizer(cfg(name=name), 10)[0].init(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(default) if getattr(x, "shape", None) == (4, 3))


def test_mu_dtype_is_checked():
    with pytest.raises(ConfigError, match=r"`optim.mu_dtype` must be one of .* got 'float16'"):
        optim.make_optimizer(cfg(mu_dtype="float16"), 10)
    with pytest.raises(ConfigError, match=r"`optim.mu_dtype`='bfloat16' applies to adam and adamw"):
        optim.make_optimizer(cfg(name="sgd", mu_dtype="bfloat16"), 10)
    with pytest.raises(ConfigError, match=r"applies to adam and adamw"):
        optim.make_optimizer(cfg(name="lion", mu_dtype="bfloat16"), 10)
