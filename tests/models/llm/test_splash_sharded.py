"""Splash attention (a Pallas Mosaic kernel) on a mesh: GSPMD cannot partition a Mosaic call (the TPU compiler
refuses it: "Mosaic kernels cannot be automatically partitioned"), so the kernel runs inside `jax.shard_map`
(rows over the batch axes, heads over `tensor`). Checked two ways:

* on 8 forced CPU devices in Pallas interpret mode: the sharded kernel equals the `xla` reference, values and
  gradients (two different computations: float32 tolerance 1e-5 on rows that attend a key);
* compiled for a v5e-8 by the TPU compiler at a real prefill shape (Qwen2.5-7B's 28 query / 4 kv heads of 128,
  1,536 slots): the Mosaic custom calls are there, no all-gather of the activations, and `attention_impl='auto'`
  picks splash when the plan traces for a TPU (`activation_sharding.compiling_for`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax import train
from adrpo_jax.models.llm.activation_sharding import compiling_for, target_platform
from adrpo_jax.models.llm.attention import AttentionMask, attention, select_impl
from tests.topologies import tpu_devices

TOL = 1e-5


def _mesh(**axes):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (forced) devices")
  return train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes})


@pytest.mark.slow  # Pallas interpret mode on 8 host devices (~30 s on 2 cores)
@pytest.mark.parametrize("axes", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_splash_interpret_equals_xla(axes):
  mesh = _mesh(**axes)
  b, t, h, kh, hd = 8, 40, 4, 2, 16
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, h, hd), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, kh, hd), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, kh, hd), jnp.float32)
  w = jax.random.normal(ks[3], (b, t, h, hd), jnp.float32)
  valid = np.arange(t)[None, :] >= np.arange(b)[:, None] * 3  # left padding 0, 3, ..., 21
  rows = jnp.asarray(valid)  # a query row attends a key iff it is itself valid (causal, left padding)
  w = w * rows[:, :, None, None]
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))  # noqa: E731
  q, k, v, w, valid = map(put, (q, k, v, w, jnp.asarray(valid)))

  @functools.partial(jax.jit, static_argnums=5)
  def run(q, k, v, valid, w, impl):
    call = lambda q, k, v: attention(q, k, v, AttentionMask(key_valid=valid), impl=impl,  # noqa: E731
                                     interpret=True)
    loss = lambda q, k, v: jnp.sum(call(q, k, v) * w)  # noqa: E731
    return call(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  ref, g_ref = run(q, k, v, valid, w, "xla")
  out, g_out = run(q, k, v, valid, w, "splash")
  hlo = run.lower(q, k, v, valid, w, "splash").as_text()
  assert "manual_computation" in hlo or "SPMDFullToShardShape" in hlo  # the kernel runs per device (shard_map)
  rows = np.asarray(rows)
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=TOL, rtol=0)
  for name, a, r in zip("qkv", g_out, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=TOL, rtol=0, err_msg=name)


def test_compiling_for_sets_the_kernel_choice():
  mask = AttentionMask(key_valid=jnp.ones((8, 1536), bool))
  shapes = dict(q_shape=(8, 1536, 28, 128), k_shape=(8, 1536, 4, 128), dtype=jnp.bfloat16, mask=mask)
  assert target_platform() == jax.default_backend()
  with compiling_for("tpu"):
    assert select_impl("auto", platform=target_platform(), **shapes) == "splash"
  assert select_impl("auto", platform=target_platform(), **shapes) == "chunked"


def _tpu_mesh(name, **axes):
  return train.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **axes}, devices=tpu_devices(name))


@pytest.mark.parametrize("axes", [{"data": 8}, pytest.param({"fsdp": 4, "tensor": 2}, marks=pytest.mark.slow)])
def test_splash_compiles_for_tpu_at_qwen7b_prefill_shape(axes):
  """Forward + backward of `attention_impl='auto'` traced for the TPU: 8 rows x 1,536 slots x 28 heads of 128."""
  mesh = _tpu_mesh("v5e:2x4", **axes)
  b, t, h, kh, hd = 8, 1536, 28, 4, 128
  bs = NamedSharding(mesh, P(("data", "fsdp")))
  q = jax.ShapeDtypeStruct((b, t, h, hd), jnp.bfloat16, sharding=bs)
  k = jax.ShapeDtypeStruct((b, t, kh, hd), jnp.bfloat16, sharding=bs)
  valid = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=bs)

  def loss(q, k, v, valid):
    return jnp.sum(attention(q, k, v, AttentionMask(key_valid=valid)).astype(jnp.float32) ** 2)

  with compiling_for("tpu"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid).compile()
  hlo = compiled.as_text()
  assert hlo.count("tpu_custom_call") >= 3  # the splash forward, dq and dkv kernels (Mosaic)
  assert "all-gather" not in hlo  # rows stay on their devices (heads too, over tensor)
  # per device: its rows' q, k, v (and grads) only, nothing of the global batch
  ma = compiled.memory_analysis()
  assert ma.argument_size_in_bytes < 2 * (b * t * (h + 2 * kh) * hd * 2) / mesh.size + 2 ** 20
