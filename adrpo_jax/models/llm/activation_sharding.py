"""Batch-sharding hints for activations, read from the abstract mesh (``jax.sharding.get_abstract_mesh()``).

Without a hint GSPMD may resolve a conflict between a parameter's sharding and the batch's for the parameter:
with the embedding table sharded ``('vocab', 'embed') -> ('tensor', 'fsdp')`` and the batch over
``('data', 'fsdp')``, it all-gathers the token ids to the global batch and runs every layer on every row on
every device. :func:`constrain_batch` pins the leading (batch) axis of an activation to the mesh's batch axes;
it does nothing when no mesh is set (the callers set one with ``jax.sharding.use_abstract_mesh`` while
tracing: :mod:`adrpo_jax.rl.step`, :func:`adrpo_jax.models.llm.sampler.make_generate_fn` with a ``mesh``),
when the mesh has no batch axis of size > 1, when the batch does not divide, or for axes that are not ``Auto``
(inside ``shard_map`` or with explicit sharding). The model applies it after the embedding and at every layer
boundary (the layer scan's carry, or between the layers of the list layout).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axes a batch is sharded over (same as adrpo_jax.train.sharding.BATCH_AXES; not imported from there
# to keep the model free of the trainer's modules).
BATCH_AXES = ("data", "fsdp")


def batch_axes(batch_size: int) -> tuple[str, ...]:
  """The ``Auto`` batch axes of size > 1 of the current abstract mesh, if they divide ``batch_size``; else ()."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes = tuple(a for a in BATCH_AXES if a in types and types[a] == AxisType.Auto and mesh.shape[a] > 1)
  if not axes or batch_size % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` with its leading axis sharded over the mesh's batch axes (other axes left to GSPMD); see module doc.
  Costs nothing without a mesh (returns ``x`` itself)."""
  axes = batch_axes(x.shape[0]) if x.ndim else ()
  if not axes:
    return x
  spec = P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(jax.sharding.get_abstract_mesh(), spec))
