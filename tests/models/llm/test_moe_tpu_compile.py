"""The MoE layer compiles for a real TPU topology on this CPU (jax[tpu]'s libtpu compiler, no TPU needed): the
Pallas Megablox grouped matmul (Mosaic) inside the expert-parallel shard_map with its all-to-alls, forward and
backward, and XLA's native ragged_dot."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax.models.llm import DecoderConfig, moe
from adrpo_jax.train.sharding import logical_to_named_sharding, make_mesh
from tests.topologies import tpu_devices


@pytest.mark.slow  # the TPU compiler (Mosaic) on a 2-core CPU
@pytest.mark.parametrize("impl", ["megablox", "ragged"])
def test_moe_layer_compiles_for_v5p_with_expert_parallelism(impl):
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}, devices=tpu_devices("v5p:2x2x2"))
  cfg = DecoderConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=2, model_type="qwen3_moe", qk_norm=True, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=256, moe_impl=impl, dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16)

  def build():
    with nnx.use_eager_sharding(False):
      return moe.SparseMoeBlock(cfg, rngs=nnx.Rngs(0))

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  shardings = logical_to_named_sharding(abstract, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  x = jax.ShapeDtypeStruct((16, 128, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp", "expert"))))

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state).forward(x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled = jax.jit(jax.value_and_grad(loss)).lower(state, x).compile()
  hlo = compiled.as_text()
  assert "all-to-all" in hlo
  if impl == "megablox":
    assert "tpu_custom_call" in hlo  # the Mosaic kernels (gmm forward, gmm / tgmm backward)
  assert compiled.memory_analysis().temp_size_in_bytes > 0
