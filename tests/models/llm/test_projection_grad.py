"""`modeling.projection`: the einsum of every Dense (and of the log-prob chunks' output projection) with a kernel
gradient that contracts the batch dims directly; values equal autodiff's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adrpo_jax.models.llm.modeling import projection


@pytest.mark.parametrize("equation,x_shape,k_shape", [
    ("btd,df->btf", (2, 5, 8), (8, 12)),
    ("btf,fd->btd", (2, 5, 12), (12, 8)),
    ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)),
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
])
def test_projection_gradients_equal_autodiff(equation, x_shape, k_shape):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  k = jax.random.normal(kk, k_shape)
  dy = jax.random.normal(kg, jnp.einsum(equation, x, k).shape)

  def grads(fn):
    return jax.vjp(fn, x, k)[1](dy)

  ours = jax.jit(lambda: grads(lambda a, b: projection(equation, a, b)))()
  ref = jax.jit(lambda: grads(lambda a, b: jnp.einsum(equation, a, b)))()
  np.testing.assert_allclose(projection(equation, x, k), jnp.einsum(equation, x, k), rtol=0, atol=0)
  for a, b in zip(ours, ref):  # the same sums in float32 (a different contraction order may round differently)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert a.dtype == b.dtype and a.shape == b.shape


def test_projection_mixed_precision_logits():
  """bfloat16 inputs with float32 output (the log-prob chunks): float32 values, bfloat16 kernel gradient close to
  autodiff's."""
  x = jax.random.normal(jax.random.key(1), (2, 3, 8), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (8, 16), jnp.bfloat16)
  y = projection("bcd,dv->bcv", x, w, jnp.float32)
  assert y.dtype == jnp.float32
  ref_y = jnp.einsum("bcd,dv->bcv", x, w, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(y, ref_y, rtol=0, atol=0)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
  g = jax.grad(loss(lambda a, b: projection("bcd,dv->bcv", a, b, jnp.float32)), argnums=(0, 1))(x, w)
  r = jax.grad(loss(lambda a, b: jnp.einsum("bcd,dv->bcv", a, b, preferred_element_type=jnp.float32)),
               argnums=(0, 1))(x, w)
  for a, b in zip(g, r):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-2, atol=2e-2)
