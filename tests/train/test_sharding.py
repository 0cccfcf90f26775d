"""Mesh construction, logical-axis rules, sharded init and host <-> global batch helpers (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from adrpo_jax.train import sharding
from adrpo_jax.train.config import ConfigError


class Annotated(nnx.Module):
    """embed=8 x mlp=6 kernel, a norm scale and an un-annotated param."""

    def __init__(self, rngs: nnx.Rngs, embed: int = 8):
        with nnx.use_eager_sharding(False):
            init = nnx.initializers.normal(1.0)
            self.proj = nnx.Linear(embed, 6, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                                   bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)))
            self.scale = nnx.Param(jnp.ones((embed,)), out_sharding=("norm",))
            self.plain = nnx.Param(jnp.zeros((3,)))


@pytest.fixture(scope="module")
def mesh222():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_make_mesh_fill_and_errors():
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape)["fsdp"] == 8
    with pytest.raises(ConfigError, match=r"`mesh`: mesh.data=3 \* mesh.fsdp=1 \* mesh.tensor=1 = 3 must equal the "
                                          r"number of devices \(8\)"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match=r"Cannot fill `mesh.data`.*device count 8"):
        sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
    with pytest.raises(ConfigError, match=r"`mesh.tensor` must be a positive int"):
        sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 0})


def test_partition_spec_rules(mesh222):
    spec = sharding.logical_to_partition_spec
    assert spec(("embed", "mlp"), (8, 6), mesh222) == P("fsdp", "tensor")
    assert spec(("vocab", "embed"), (10, 4), mesh222) == P("tensor", "fsdp")
    assert spec(("heads", "head_dim"), (4, 5), mesh222) == P("tensor")
    assert spec(("norm",), (8,), mesh222) == P()
    assert spec(None, (8,), mesh222) == P()
    # not divisible -> replicated on that dim only
    assert spec(("embed", "mlp"), (3, 6), mesh222) == P(None, "tensor")
    assert spec(("embed", "mlp"), (8, 5), mesh222) == P("fsdp")
    # the same mesh axis is never used twice in one spec
    assert spec(("mlp", "heads"), (4, 4), mesh222) == P("tensor")
    with pytest.raises(ValueError, match=r"`w` uses logical axis name 'bogus'"):
        spec(("bogus",), (4,), mesh222, name="w")
    with pytest.raises(ValueError, match=r"`w` has logical axis names \('embed',\) \(rank 1\) but shape \(4, 4\)"):
        spec(("embed",), (4, 4), mesh222, name="w")
    # custom rules: first rule wins, tuples of mesh axes allowed
    assert spec(("embed",), (8,), mesh222, rules=[("embed", ("data", "fsdp"))]) == P(("data", "fsdp"))


def test_logical_to_named_sharding_of_nnx_state(mesh222):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Annotated(nnx.Rngs(0))))
    shardings = sharding.logical_to_named_sharding(state, mesh222)
    assert shardings["proj"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert shardings["proj"]["bias"].get_value().spec == P("tensor")
    assert shardings["scale"].get_value().spec == P()
    assert shardings["plain"].get_value().spec == P()
    # a state whose 'embed' dim (3) is not divisible by fsdp=2 falls back to replication
    _, state3 = nnx.split(nnx.eval_shape(lambda: Annotated(nnx.Rngs(0), embed=3)))
    assert sharding.logical_to_named_sharding(state3, mesh222)["proj"]["kernel"].get_value().spec == P(None, "tensor")


def test_create_sharded_model_matches_unsharded_build(mesh222):
    model = sharding.create_sharded_model(lambda: Annotated(nnx.Rngs(3)), mesh222)
    kernel = model.proj.kernel[...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 3)}
    with nnx.use_eager_sharding(False):
        reference = Annotated(nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference.proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(model.scale[...]), np.ones(8))


def test_plan_and_create_sharded_train_state(mesh222):
    tx = optax.adam(1e-3)

    def init():
        params = nnx.state(Annotated(nnx.Rngs(0)), nnx.Param)
        return {"params": params, "opt_state": tx.init(params)}

    abstract = sharding.plan_sharded(init, mesh222)
    leaf = abstract["params"]["proj"]["kernel"].get_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P("fsdp", "tensor")
    state = sharding.create_sharded(init, abstract)
    # optimizer moments inherit the parameters' logical names
    assert state["opt_state"][0].mu["proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert state["opt_state"][0].count.sharding.spec == P()
    moved = sharding.shard_like(jax.device_get(state), sharding.shardings_of(abstract))
    assert moved["params"]["proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")


def test_batch_helpers_single_process(mesh222):
    assert sharding.data_parallel_size(mesh222) == 4
    assert sharding.batch_sharding(mesh222).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(mesh222, 3).spec == P(("data", "fsdp"), None, None)
    assert sharding.process_batch_slice(8, mesh222) == slice(0, 8)
    with pytest.raises(ValueError, match=r"`global_batch_size`=6 must be a positive multiple of the data-parallel "
                                         r"size 4"):
        sharding.process_batch_slice(6, mesh222)
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "m": np.arange(8) % 2 == 0}
    glob = sharding.host_local_to_global(batch, mesh222)
    assert glob["x"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in glob["x"].addressable_shards} == {(2, 3)}
    back = sharding.global_to_host_local(glob)
    np.testing.assert_array_equal(back["x"], batch["x"])
    np.testing.assert_array_equal(back["m"], batch["m"])
    with pytest.raises(ValueError, match=r"`s` is a scalar"):
        sharding.host_local_to_global({"s": np.float32(1.0)}, mesh222)
