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
import jax.numpy as jnp
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


def _active(mesh, axis: str) -> bool:
  """``axis`` is an ``Auto`` axis of size > 1 of ``mesh``."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return types.get(axis) == AxisType.Auto and mesh.shape[axis] > 1


def constrain_embedding_lookup(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(table, tokens)`` for ``jnp.take(table, tokens, axis=0)`` with a batch-sharded result on a mesh: the ids
  pinned to the batch sharding and the [V, D] table gathered over its embedding dimension (``P('tensor' or
  None, None)``: the vocabulary keeps its tensor sharding, the ``fsdp`` shards of D are all-gathered). The fallback
  of :func:`embedding_lookup` when the table's D does not divide over ``fsdp``. Unchanged without a mesh or when
  the batch does not divide over the batch axes."""
  axes = batch_axes(tokens.shape[0], tokens) if tokens.ndim else ()
  if not axes:
    return table, tokens
  mesh = current_mesh(tokens)
  vocab = "tensor" if _active(mesh, "tensor") and table.shape[0] % mesh.shape["tensor"] == 0 else None
  table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, P(vocab, None)))
  return table, constrain_batch(tokens)


def embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """``jnp.take(table, tokens, axis=0)`` ([V, D] table, int ids [B, ...] -> [B, ..., D]), batch-sharded on a mesh.

  On an ``fsdp`` mesh the lookup runs on the table's own shards: the ids are gathered over ``fsdp`` (int32, small),
  every device looks up its D / fsdp columns for those rows, and the result is resharded to the batch sharding
  (an all-to-all of [B, T, D / fsdp]). The table is never gathered, so its gradient is a scatter-add into the
  local [V, D / fsdp] shard: gathering the table instead (:func:`constrain_embedding_lookup`) holds a whole
  [V, D] copy and a whole float32 [V, D] gradient per device (Qwen3-8B: 1.2 + 2.3 GiB per chip), where this holds
  [B, T, D] / fsdp. Without a mesh (or when the batch does not divide) it is plain ``jnp.take``; without an
  ``fsdp`` axis, when D does not divide over it, or when a device holds more ids than the table has rows (B T /
  devices >= V: tiny vocabularies), the table is gathered as in :func:`constrain_embedding_lookup`.

  >>> import jax.numpy as jnp
  >>> embedding_lookup(jnp.eye(4), jnp.array([[1, 3]])).tolist()
  [[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]]
  """
  axes = batch_axes(tokens.shape[0], tokens) if tokens.ndim else ()
  mesh = current_mesh(tokens) if axes else None
  if (mesh is None or "fsdp" not in axes or table.shape[1] % mesh.shape["fsdp"]
      or tokens.size // math.prod(mesh.shape[a] for a in axes) >= table.shape[0]):
    # (the last: more ids per device than vocabulary rows, where gathering the table holds less)
    table, tokens = constrain_embedding_lookup(table, tokens)
    return jnp.take(table, tokens, axis=0)
  rows = tuple(a for a in axes if a != "fsdp") or None  # the other batch axes keep their rows
  vocab = "tensor" if _active(mesh, "tensor") and table.shape[0] % mesh.shape["tensor"] == 0 else None
  rest = [None] * (tokens.ndim - 1)
  ids = jax.lax.with_sharding_constraint(tokens, NamedSharding(mesh, P(rows, *rest)))
  table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, P(vocab, "fsdp")))
  x = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0), NamedSharding(mesh, P(rows, *rest, "fsdp")))
  return constrain_batch(x)


def vocab_parallel_axes(batch_size: int, positions: int, vocab_size: int, x: jax.Array | None = None
                        ) -> tuple[str, ...] | None:
  """The mesh axes to shard the vocabulary of a [D, V] output projection over while computing logits, or None.

  On an ``fsdp`` mesh the projection is stored [D / fsdp, V / tensor]; gathering it (FSDP's usual per-weight
  all-gather) holds a whole [D, V] copy per device and produces a whole float32 [D, V] gradient (Qwen3-8B: 1.2 +
  2.3 GiB per chip). Sharding V over ``('tensor', 'fsdp')`` instead (an all-to-all of the weight) and gathering the
  hidden states over ``fsdp`` gives every device the logits of all the ``fsdp`` group's rows for its V / fsdp
  vocabulary slice: the same logits bytes per device, the log-softmax reduced across the slices (scalars per row),
  and the gradient of the weight stays a [D, V / (tensor fsdp)] shard. ``positions``: the hidden states' positions
  per row (the chunk width). None (the batch-sharded form) without a mesh, without an active ``fsdp`` batch axis,
  when V does not divide, or when the gathered hidden states would outweigh the weight (rows of the ``fsdp`` group
  x positions >= V: tiny vocabularies)."""
  axes = batch_axes(batch_size, x)
  if "fsdp" not in axes:
    return None
  mesh = current_mesh(x)
  vocab = (("tensor",) if _active(mesh, "tensor") else ()) + ("fsdp",)
  gathered_rows = batch_size // math.prod(mesh.shape[a] for a in axes if a != "fsdp")
  if vocab_size % math.prod(mesh.shape[a] for a in vocab) or gathered_rows * positions >= vocab_size:
    return None
  return vocab


def constrain_vocab_parallel(hidden: jax.Array, weight: jax.Array, vocab: tuple[str, ...]
                             ) -> tuple[jax.Array, jax.Array]:
  """(hidden [B, ..., D], weight [D, V]) constrained for the vocabulary-parallel projection of
  :func:`vocab_parallel_axes`: the hidden rows over the batch axes other than ``fsdp`` (gathered over ``fsdp``),
  the weight's V over ``vocab``."""
  mesh = current_mesh(hidden)
  rows = tuple(a for a in batch_axes(hidden.shape[0], hidden) if a != "fsdp") or None
  hidden = jax.lax.with_sharding_constraint(hidden, NamedSharding(mesh, P(rows, *([None] * (hidden.ndim - 1)))))
  weight = jax.lax.with_sharding_constraint(weight, NamedSharding(mesh, P(None, vocab)))
  return hidden, weight


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` with its leading axis sharded over the mesh's batch axes (other axes left to GSPMD); see module doc.
  Costs nothing without a mesh (returns ``x`` itself)."""
  axes = batch_axes(x.shape[0], x) if x.ndim else ()
  if not axes:
    return x
  spec = P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(current_mesh(x), spec))
