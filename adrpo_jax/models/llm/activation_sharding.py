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

Without an abstract mesh set by the caller (a plain ``jax.jit(value_and_grad(token_logprobs))`` over sharded
arrays), :func:`constrain_batch` reads the mesh from the array itself: under ``jit`` every value computed from
mesh-sharded inputs carries that mesh in its type (``jax.typeof(x).sharding.mesh``). Without it, GSPMD resolves
the embedding table's ``fsdp`` sharding against the batch's in favour of the table and every device computes every
row (measured: fsdp=8 held 1.8x the per-device memory of data=8 for the log-prob gradient).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# The mesh axes a batch is sharded over (same as adrpo_jax.train.sharding.BATCH_AXES; not imported from there
# to keep the model free of the trainer's modules).
BATCH_AXES = ("data", "fsdp", "expert")  # "expert": the optional MoE axis also shards the batch outside MoE layers


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("adrpo_target_platform", default=None)


def target_platform() -> str:
  """The platform the current trace compiles for: the one set by :func:`compiling_for` (the plan mode lowering
  for a TPU topology from a CPU host), else ``jax.default_backend()``. Kernel choices (``attention_impl='auto'``,
  ``moe_impl='auto'``) read it, so a plan compiles what the target would run."""
  return (_TARGET_PLATFORM.get() or jax.default_backend()).lower()


@contextlib.contextmanager
def compiling_for(platform: str | None):
  """Traces inside this block choose kernels for ``platform`` ('tpu', 'gpu', 'cpu'; None: the default backend).

  >>> with compiling_for("tpu"):
  ...   target_platform()
  'tpu'
  """
  token = _TARGET_PLATFORM.set(platform.lower() if platform else None)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def current_mesh(x: jax.Array | None = None):
  """The abstract mesh set by the caller (``jax.sharding.use_abstract_mesh`` / ``jax.set_mesh``), else the mesh in
  the type of ``x`` (a traced value computed from mesh-sharded arrays), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    return mesh
  if x is None:
    return None
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  found = getattr(sharding, "mesh", None)
  if found is None:
    return None
  mesh = getattr(found, "abstract_mesh", found)  # a concrete Mesh (eager arrays) -> its abstract mesh
  return None if mesh.empty else mesh


def batch_axes(batch_size: int, x: jax.Array | None = None) -> tuple[str, ...]:
  """The ``Auto`` batch axes of size > 1 of the current abstract mesh (or of ``x``'s mesh, see
  :func:`current_mesh`), if they divide ``batch_size``; else ()."""
  mesh = current_mesh(x)
  if mesh is None:
    return ()
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  axes = tuple(a for a in BATCH_AXES if a in types and types[a] == AxisType.Auto and mesh.shape[a] > 1)
  if not axes or batch_size % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def rows_per_device(batch_size: int, x: jax.Array | None = None) -> int:
  """``batch_size`` divided by the sizes of its :func:`batch_axes` (the rows one device holds)."""
  mesh = current_mesh(x)
  axes = batch_axes(batch_size, x)
  return batch_size // math.prod(mesh.shape[a] for a in axes) if axes else batch_size


def constrain_embedding_lookup(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(table, tokens)`` for ``jnp.take(table, tokens, axis=0)`` with a batch-sharded result on a mesh: the ids
  pinned to the batch sharding and the [V, D] table gathered over its embedding dimension (``P('tensor' or
  None, None)``: the vocabulary keeps its tensor sharding, the ``fsdp`` shards of D are all-gathered, the same
  per-layer FSDP gather as any weight). Without it, on a data x fsdp x tensor mesh GSPMD computes the lookup with
  the table's sharding ([B, T, D/fsdp] of the *global* batch on every device) and then replicates it to reach the
  batch sharding. Unchanged without a mesh or when the batch does not divide over the batch axes."""
  axes = batch_axes(tokens.shape[0], tokens) if tokens.ndim else ()
  if not axes:
    return table, tokens
  mesh = current_mesh(tokens)
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  vocab = ("tensor" if types.get("tensor") == AxisType.Auto and mesh.shape["tensor"] > 1
           and table.shape[0] % mesh.shape["tensor"] == 0 else None)
  table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, P(vocab, None)))
  return table, constrain_batch(tokens)


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` with its leading axis sharded over the mesh's batch axes (other axes left to GSPMD); see module doc.
  Costs nothing without a mesh (returns ``x`` itself)."""
  axes = batch_axes(x.shape[0], x) if x.ndim else ()
  if not axes:
    return x
  spec = P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(current_mesh(x), spec))
