"""MMDiT's cuDNN attention compiles for an H100 at SD3's odd token count (4,096 image + 333 text = 4,429), forward
and backward, by XLA's GPU compiler without a GPU (the plan mode's deviceless target). Before, cuDNN's fused kernel
refused it in training ("Unsupported sequence length Q 4429, KV 4429"): the token axes are now padded to a
multiple of 64 with cuDNN's padding mask. (Running the kernel needs a GPU: benchmarks/gpu_smoke.sh.)"""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax.models.mmdit import CUDNN_SEQ_MULTIPLE, _sdpa
from tests.topologies import h100_devices


def _h100_mesh():
  return jax.sharding.Mesh(h100_devices(1), ("data",))


@pytest.mark.parametrize("t,s", [(4429, 4429), (4096, 4429)])  # joint attention; text queries dropped (last block)
def test_cudnn_attention_compiles_at_an_odd_token_count(t, s):
  mesh = _h100_mesh()
  rep = NamedSharding(mesh, P())
  q = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16, sharding=rep)
  kv = jax.ShapeDtypeStruct((1, s, 2, 64), jnp.bfloat16, sharding=rep)

  def loss(q, k, v):
    return jnp.sum(_sdpa(q, k, v, scale=0.125, implementation="cudnn").astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
  assert "cudnn" in compiled.as_text().lower()


def test_padding_is_only_for_cudnn_and_odd_lengths():
  q = jnp.ones((1, 6, 2, 8), jnp.float32)
  out = _sdpa(q, q, q, scale=0.5, implementation=None)  # xla: unchanged, no padding
  assert out.shape == q.shape and CUDNN_SEQ_MULTIPLE == 64
