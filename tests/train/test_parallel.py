"""batch_sharded_loss == the single-device loss (values, metrics, gradients) on several meshes."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax import losses
from adrpo_jax.train.parallel import batch_sharded_loss
from adrpo_jax.train.sharding import make_mesh


def _grpo(batch, axis_name=None):
    return losses.grpo_loss(batch["logp"], batch["old"], batch["ref"], batch["adv"], batch["mask"], beta=0.04,
                            loss_aggregation="sequence_mean", axis_name=axis_name)


def _inputs(b=16, t=7, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((b, t)) < 0.7
    mask[3] = False  # a fully masked row
    return {"logp": jnp.asarray(-rng.random((b, t)) * 3, jnp.float32),
            "old": jnp.asarray(-rng.random((b, t)) * 3, jnp.float32),
            "ref": jnp.asarray(-rng.random((b, t)) * 3, jnp.float32),
            "adv": jnp.asarray(rng.normal(size=b), jnp.float32), "mask": jnp.asarray(mask)}


@pytest.mark.parametrize("mesh_shape", [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2)])
def test_sharded_loss_matches_single_device(mesh_shape):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_shape})
    batch = _inputs()
    theta = jnp.float32(0.3)  # a replicated parameter feeding the sharded inputs

    def single(theta, logp):
        return _grpo(dict(batch, logp=logp * (1 + theta)))

    sharded_loss = batch_sharded_loss(_grpo, mesh)

    def sharded(theta, logp):
        return sharded_loss(dict(batch, logp=logp * (1 + theta)))

    vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (l1, m1), g1 = vg(single)(theta, batch["logp"])
    (l2, m2), g2 = vg(sharded)(theta, batch["logp"])
    # psum of 8 per-device partial sums vs one sum: a different float32 summation order (ulp-level differences that
    # depend on the CPU/ISA), so float32-accumulation tolerances rather than 1e-7
    np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g2[1], g1[1], rtol=1e-5, atol=1e-6)


def test_indivisible_batch_names_the_leaf():
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match=r"\['adv'\].*divisible by 8"):
        batch_sharded_loss(_grpo, mesh)(dict(_inputs(b=16), adv=jnp.zeros((12,))))
    with pytest.raises(ValueError, match="does not have"):
        batch_sharded_loss(_grpo, mesh, batch_axes=("dp",))
