"""Samplers: exactness on fields with closed-form solutions, CFG combination, SDE marginals, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from adrpo_jax.flow import sampling

B, D = 3, 4
COND = jnp.zeros((B,), jnp.int32)


def _x0(seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, D)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("field_name", "num_steps", "method"))
def _solve(x0, params, field_name, num_steps, method):
    a, b = params
    fields = {
        "constant": lambda x, t, c: jnp.broadcast_to(a, x.shape),
        "affine_t": lambda x, t, c: jnp.broadcast_to(a, x.shape) + b * t[:, None],
        "linear_x": lambda x, t, c: x @ a.T,
    }
    return sampling.sample(fields[field_name], x0, COND, num_steps=num_steps, method=method)


@pytest.mark.parametrize("method", sampling.METHODS)
def test_constant_field_is_exact_for_every_method(method):
    x0, a = _x0(), jnp.arange(D, dtype=jnp.float32)
    out = _solve(x0, (a, 0.0), "constant", 5, method)
    np.testing.assert_allclose(out, np.asarray(x0) + np.asarray(a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["heun", "midpoint"])
def test_affine_in_time_field_is_exact_for_second_order_methods(method):
    # dx/dt = a + b t  ->  x(1) = x0 + a + b / 2
    x0, a, b = _x0(), jnp.arange(D, dtype=jnp.float32), 3.0
    out = _solve(x0, (a, b), "affine_t", 3, method)
    np.testing.assert_allclose(out, np.asarray(x0) + np.asarray(a) + b / 2, rtol=1e-6, atol=1e-6)


def test_euler_on_affine_in_time_field_matches_its_left_riemann_sum():
    n, b = 4, 3.0
    x0, a = _x0(), jnp.ones((D,))
    out = _solve(x0, (a, b), "affine_t", n, "euler")
    expected = np.asarray(x0) + 1.0 + b * (n - 1) / (2 * n)  # sum_i h (a + b i h)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", sampling.METHODS)
def test_linear_field_matches_one_step_amplification_and_converges_to_expm(method):
    rng = np.random.default_rng(0)
    A = (0.5 * rng.standard_normal((D, D))).astype(np.float32)
    x0 = _x0(1)
    n = 8
    h = 1.0 / n
    step = np.eye(D) + h * A if method == "euler" else np.eye(D) + h * A + (h * A) @ (h * A) / 2
    expected = np.asarray(x0, np.float64) @ np.linalg.matrix_power(step, n).T
    out = _solve(x0, (jnp.asarray(A), 0.0), "linear_x", n, method)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    exact = np.asarray(x0, np.float64) @ scipy.linalg.expm(A).T
    fine = _solve(x0, (jnp.asarray(A), 0.0), "linear_x", 64, method)
    tol = 5e-2 if method == "euler" else 1e-3
    np.testing.assert_allclose(fine, exact, atol=tol)


def test_trajectory_and_custom_time_grid():
    x0 = _x0()
    field = lambda x, t, c: jnp.ones_like(x) * t[:, None]  # noqa: E731
    grid = jnp.array([0.0, 0.5, 0.6, 1.0])
    x1, traj = sampling.sample(field, x0, COND, num_steps=3, method="heun", timesteps=grid,
                               return_trajectory=True)
    assert traj.shape == (4, B, D)
    np.testing.assert_allclose(traj[0], x0)
    np.testing.assert_allclose(traj[-1], x1)
    # exact integral of t: grid[k]^2 / 2
    np.testing.assert_allclose(traj[:, 0, 0] - x0[0, 0], np.asarray(grid) ** 2 / 2, atol=1e-6)


def test_cfg_combination_and_doubled_batch():
    seen = []

    def field(x, t, c):
        seen.append(c.shape)
        return x * 0.0 + c[:, None].astype(jnp.float32) * 10.0 + 1.0

    cond = jnp.array([2, 3, 4])
    null = 7
    s = 2.5
    v = sampling.guided_velocity(field, s, null_cond=null)(jnp.zeros((3, 2)), jnp.zeros((3,)), cond)
    v_c = np.asarray(cond)[:, None] * 10.0 + 1.0
    v_u = null * 10.0 + 1.0
    np.testing.assert_allclose(v, np.broadcast_to(v_u + s * (v_c - v_u), (3, 2)), rtol=1e-6)
    assert seen == [(6,)]  # one doubled forward
    # one Euler step integrates exactly that guided velocity
    x1 = sampling.sample(field, jnp.zeros((3, 2)), cond, num_steps=1, cfg_scale=s, null_cond=null)
    np.testing.assert_allclose(x1, np.asarray(v), rtol=1e-6)
    # cfg_scale == 1: only the conditional half is evaluated
    seen.clear()
    assert sampling.guided_velocity(field, 1.0, null_cond=None) is field
    # traced cfg scale under jit
    f = jax.jit(lambda s_: sampling.sample(field, jnp.zeros((3, 2)), cond, num_steps=2, cfg_scale=s_,
                                           null_cond=null))
    np.testing.assert_allclose(f(jnp.float32(s)), np.asarray(v), rtol=1e-6)


def test_cfg_with_embedding_conditions_broadcasts_null_vector():
    field = lambda x, t, c: x * 0.0 + jnp.sum(c, axis=-1, keepdims=True)  # noqa: E731
    cond = jnp.ones((2, 3))
    v = sampling.guided_velocity(field, 3.0, null_cond=jnp.zeros((3,)))(jnp.zeros((2, 1)), jnp.zeros((2,)), cond)
    np.testing.assert_allclose(v, np.full((2, 1), 9.0))


def _gaussian_velocity(mu, s):
    # exact marginal velocity of the linear path for data N(mu, s^2), noise N(0, 1)
    def v(x, t, c):
        tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
        var = tb ** 2 * s ** 2 + (1 - tb) ** 2
        return mu + (tb * s ** 2 - (1 - tb)) / var * (x - tb * mu)
    return v


def test_ode_and_sde_reach_the_data_distribution_of_an_exact_field():
    mu, s, n = 1.5, 0.5, 4000
    field = _gaussian_velocity(mu, s)
    x0 = sampling.sample_noise(jax.random.key(0), (n, 1))
    cond = jnp.zeros((n,), jnp.int32)
    ode = jax.jit(lambda x: sampling.sample(field, x, cond, num_steps=50, method="heun"))(x0)
    np.testing.assert_allclose([float(ode.mean()), float(ode.std())], [mu, s], atol=0.03)
    sde = jax.jit(lambda x, k: sampling.sample(field, x, cond, num_steps=200, sde_noise=1.0, key=k))(
        x0, jax.random.key(1))
    np.testing.assert_allclose([float(sde.mean()), float(sde.std())], [mu, s], atol=0.05)
    # the SDE really is stochastic: same x0, other key -> other samples
    sde2 = jax.jit(lambda x, k: sampling.sample(field, x, cond, num_steps=200, sde_noise=1.0, key=k))(
        x0, jax.random.key(2))
    assert float(jnp.mean(jnp.abs(sde - sde2))) > 1e-2


def test_make_sample_fn_takes_params_as_argument():
    apply_fn = lambda p, x, t, c: jnp.broadcast_to(p, x.shape)  # noqa: E731
    fn = sampling.make_sample_fn(apply_fn, num_steps=3, method="midpoint")
    x0 = jnp.zeros((2, 2))
    np.testing.assert_allclose(fn(jnp.float32(2.0), x0, jnp.zeros((2,), jnp.int32)), np.full((2, 2), 2.0))
    np.testing.assert_allclose(fn(jnp.float32(-1.0), x0, jnp.zeros((2,), jnp.int32)), np.full((2, 2), -1.0))


def test_num_function_evaluations():
    assert sampling.num_function_evaluations(10, "euler") == 10
    assert sampling.num_function_evaluations(10, "heun", cfg_scale=2.0) == 40


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="rk4"), "method"),
    (dict(sde_noise=0.5, method="heun", key=jax.random.key(0)), "Euler-Maruyama"),
    (dict(sde_noise=0.5), "key"),
    (dict(sde_noise=-1.0), "sde_noise"),
    (dict(cfg_scale=2.0), "null_cond"),
    (dict(num_steps=0), "num_steps"),
    (dict(timesteps=jnp.zeros(3)), "timesteps"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    kw = dict(num_steps=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampling.sample(lambda x, t, c: x, jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32), **kw)


def test_cond_batch_mismatch_raises():
    with pytest.raises(ValueError, match="cond"):
        sampling.sample(lambda x, t, c: x, jnp.zeros((2, 2)), jnp.zeros((3,), jnp.int32), num_steps=2)
