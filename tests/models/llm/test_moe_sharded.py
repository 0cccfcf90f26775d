"""Expert parallelism on 8 forced CPU devices: the MoE layer under an `expert` mesh axis (all-to-all token exchange
inside shard_map), alone and with fsdp and tensor, equals the single-device result, gradients included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adrpo_jax.models.llm import moe
from adrpo_jax.train.sharding import logical_to_named_sharding, make_mesh
from tests.models.llm.test_moe import _block

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (forced) devices")


def _loss(graphdef, state, x):
  y, aux = nnx.merge(graphdef, state).forward(x)
  return jnp.sum(y * jnp.cos(y)), (y, aux.expert_indices, aux.load)


def _run(block, x, mesh=None):
  graphdef, state = nnx.split(block)
  fn = jax.value_and_grad(_loss, argnums=(1, 2), has_aux=True)
  if mesh is None:
    return jax.jit(fn, static_argnums=0)(graphdef, state, x), None
  state = jax.device_put(state, logical_to_named_sharding(state, mesh))
  axes = ("data", "fsdp", "expert") if x.shape[0] % 8 == 0 else ("data",)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes)))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the trainer / sampler trace
    jitted = jax.jit(fn, static_argnums=0)
    hlo = jitted.lower(graphdef, state, x).compile().as_text()
    return jitted(graphdef, state, x), hlo


def _compare(got, want):
  (l1, (y1, i1, load1)), g1 = got
  (l0, (y0, i0, load0)), g0 = want
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(i0))
  np.testing.assert_array_equal(np.asarray(load1), np.asarray(load0))
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)  # other reduction orders
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # float32 sums in other orders: 1e-5 of the scale
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())), rtol=1e-4)


@pytest.mark.parametrize("shape,lora", [
    ({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}, False),
    pytest.param({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}, True, marks=pytest.mark.slow),
])
def test_expert_parallel_layer_equals_single_device(shape, lora):
  block = _block8(lora)  # 8 experts: they divide over expert=4
  x = jax.random.normal(jax.random.key(0), (8, 5, 16)) * 2
  want, _ = _run(block, x)
  got, hlo = _run(block, x, make_mesh(shape))
  _compare(got, want)
  assert "all-to-all" in hlo  # the tokens travel to their experts' devices (batch 8 divides data x fsdp x expert)


@pytest.mark.slow  # Pallas interpret mode inside shard_map
def test_megablox_under_expert_parallelism_equals_single_device():
  """The Pallas grouped matmul (interpret mode on CPU) inside the expert-parallel shard_map (run with
  check_vma=False: Pallas outputs declare no varying axes) gives the single-device values and gradients."""
  x = jax.random.normal(jax.random.key(0), (8, 5, 16)) * 2
  want, _ = _run(_block8(False), x)
  got, _ = _run(_block8(False, impl="megablox"), x, make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}))
  _compare(got, want)


@pytest.mark.slow
def test_small_batch_replicates_tokens_over_the_expert_axis():
  """A batch that does not divide over the expert axis (a decode step): tokens replicated over it, each shard adds
  its experts' part (psum over expert), same result."""
  block = _block8(False)
  x = jax.random.normal(jax.random.key(1), (2, 3, 16)) * 2
  want, _ = _run(block, x)
  got, hlo = _run(block, x, make_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}))
  _compare(got, want)
  assert "all-to-all" not in hlo


def _block8(lora, impl="blocked"):
  from tests.models.llm import test_moe

  saved = test_moe._LAYER_CFG
  try:
    test_moe._LAYER_CFG = saved.replace(num_experts=8)
    return _block(impl, lora=lora, shared=lora)
  finally:
    test_moe._LAYER_CFG = saved


def test_expert_kernels_shard_over_the_expert_axis():
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
  block = _block8(True)
  shardings = logical_to_named_sharding(nnx.state(block), mesh)
  assert tuple(shardings["experts"]["gate_proj"].get_value().spec) == ("expert", "fsdp", "tensor")
  assert tuple(shardings["experts"]["down_proj"].get_value().spec) == ("expert", "tensor", "fsdp")
  assert tuple(shardings["experts"]["gate_proj_lora"]["lora_a"].get_value().spec) == ("expert", "fsdp")
  assert moe.resolve_impl("auto", "cpu") == "blocked"


@pytest.mark.slow
def test_streamed_load_places_expert_kernels_on_the_expert_axis():
  """load_pretrained with a mesh reads each device's block of a stacked [L, E, D, F] kernel from the tensors it
  covers only, and the values equal the unsharded load."""
  from adrpo_jax.models.llm import load_pretrained
  from tests.models.llm.families import tiny_hf

  tiny = tiny_hf("qwen3_moe")
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
  sharded, plain = load_pretrained(tiny.path, mesh=mesh), load_pretrained(tiny.path)
  kernel = sharded.layers.mlp.experts.gate_proj[...]
  assert tuple(kernel.sharding.spec) == (None, "expert", "fsdp", "tensor")  # [L, E, D, F]
  assert kernel.addressable_shards[0].data.shape == (2, 4, 32, 16)
  for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_mesh_from_the_input_sharding_without_a_context_mesh():
  """jit over sharded arrays without `use_abstract_mesh`: the layer finds the mesh in its input's type and runs the
  expert-parallel shard_map all the same."""
  block = _block8(False)
  x = jax.random.normal(jax.random.key(0), (8, 5, 16)) * 2
  mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})
  graphdef, state = nnx.split(block)
  state = jax.device_put(state, logical_to_named_sharding(state, mesh))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert"))))
  fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st).forward(x)[0])
  assert "all-to-all" in fwd.lower(state, xs).compile().as_text()
  np.testing.assert_allclose(np.asarray(fwd(state, xs)), np.asarray(jax.jit(lambda st, x: nnx.merge(
      graphdef, st).forward(x)[0])(nnx.split(block)[1], x)), rtol=1e-5, atol=1e-5)
