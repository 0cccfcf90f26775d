"""SD3's flow convention vs ours (adrpo_jax.flow.sd3) against diffusers' FlowMatchEulerDiscreteScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax import losses
from adrpo_jax.flow import sd3
from adrpo_jax.flow.sampling import sample

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")


def _scheduler(shift):
    return schedulers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_sigmas_and_timesteps_match_diffusers(shift, steps):
    sch = _scheduler(shift)
    sch.set_timesteps(steps)
    np.testing.assert_allclose(sd3.sd3_sigmas(steps, shift), sch.sigmas.numpy(), rtol=0, atol=1e-7)
    grid = np.asarray(sd3.sd3_time_grid(steps, shift))
    assert grid[0] == pytest.approx(0.0, abs=1e-7) and grid[-1] == 1.0 and np.all(np.diff(grid) > 0)
    np.testing.assert_allclose(np.asarray(sd3.t_to_timestep(jnp.asarray(grid[:-1]))), sch.timesteps.numpy(),
                               rtol=1e-6, atol=1e-3)


def _field(x, timestep):
    """A fixed nonlinear 'transformer output' (diffusers convention); works on torch and jax arrays."""
    return 0.7 * x - 0.3 * (timestep / 1000.0)[:, None, None, None] * x ** 2 + 0.1


def test_euler_sampler_on_the_shifted_grid_equals_diffusers_steps():
    steps, shift = 6, 3.0
    x0 = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    # diffusers: x <- scheduler.step(model_output(x, timestep), timestep, x)
    sch = _scheduler(shift)
    sch.set_timesteps(steps)
    x = torch.from_numpy(x0)
    seen = []
    for ts in sch.timesteps:
        tb = ts.expand(x.shape[0])
        seen.append(float(ts))
        x = sch.step(_field(x, tb), ts, x).prev_sample
    ref = x.numpy()
    # ours: dx/dt = -model_output(x, 1000 (1 - t)) from t = 0 to 1 on 1 - sigmas

    def velocity(x, t, c):
        del c
        return sd3.velocity_from_diffusers(_field(x, sd3.t_to_timestep(t)))

    out = sample(velocity, jnp.asarray(x0), jnp.zeros((2,), jnp.int32), num_steps=steps, method="euler",
                 timesteps=sd3.sd3_time_grid(steps, shift))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # and the same timesteps reach the model
    ours_seen = np.asarray(sd3.t_to_timestep(sd3.sd3_time_grid(steps, shift)[:-1]))
    np.testing.assert_allclose(ours_seen, np.asarray(seen), rtol=1e-6, atol=1e-3)


def test_path_and_target_map_onto_rectified_flow():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    noise = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    sigma = np.array([0.9, 0.5, 0.1], np.float32)
    # diffusers' scale_noise at those sigmas (looked up on its training schedule)
    sch = _scheduler(1.0)
    idx = np.array([99, 499, 899])  # training sigmas (1000 - i) / 1000 = 0.901, 0.501, 0.101
    sig = sch.sigmas.numpy()[idx]
    ref = sch.scale_noise(torch.from_numpy(data), sch.timesteps[idx], torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(np.asarray(sd3.diffusers_noisy_sample(data, noise, jnp.asarray(sig))), ref, atol=1e-6)
    # our path at t = 1 - sigma with x0 = noise, x1 = data is the same point; our target is -(noise - data)
    x_t, u = losses.rectified_flow_path(jnp.asarray(noise), jnp.asarray(data), sd3.sigma_to_t(jnp.asarray(sigma)))
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(sd3.diffusers_noisy_sample(data, noise, sigma)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sd3.velocity_to_diffusers(u)), noise - data, atol=1e-6)


class _Echo(nnx.Module):
    """Stand-in transformer: returns channel-broadcast (timestep/1000 + sum of the text state + pooled[0])."""

    def __call__(self, latents, timestep, states, pooled):
        s = timestep / 1000.0 + jnp.sum(states, axis=(1, 2)) + pooled[:, 0]
        return jnp.broadcast_to(s[:, None, None, None], latents.shape)


def test_mmdit_velocity_looks_up_prompts_and_flips_sign():
    emb = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)   # row sums 6, 22, 38
    pooled = np.array([[0.5], [1.5], [2.5]], np.float32)
    v = sd3.MMDiTVelocity(_Echo(), emb, pooled, null_id=0)
    x = jnp.zeros((3, 2, 2, 4))
    t = jnp.array([0.0, 0.25, 1.0])
    out = v(x, t, jnp.array([1, 2, 2]))
    expect = -(np.array([1.0, 0.75, 0.0]) + np.array([22, 38, 38]) + np.array([1.5, 2.5, 2.5]))
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), expect, rtol=1e-6)
    dropped = v(x, t, jnp.array([1, 2, 2]), drop_mask=jnp.array([False, True, False]))
    np.testing.assert_allclose(np.asarray(dropped[1, 0, 0, 0]), -(0.75 + 6 + 0.5), rtol=1e-6)
    assert v.null_class == 0
    # the table is not a trainable parameter
    assert not jax.tree.leaves(nnx.state(v, nnx.Param))
    with pytest.raises(ValueError, match="null_id"):
        sd3.MMDiTVelocity(_Echo(), emb, pooled, null_id=3)
    with pytest.raises(ValueError, match="cond"):
        v(x, t, jnp.array([0.0, 1.0, 2.0]))
