"""Device mesh, logical-axis sharding rules and host <-> global batch helpers.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')`` (``config.mesh``), and an ``'expert'`` axis
between ``fsdp`` and ``tensor`` when ``config.mesh`` names one (``mesh.expert``, default 1: expert parallelism of
mixture-of-experts layers, whose expert kernels carry the logical axis ``'expert'``; outside those layers the
expert axis shards the batch like ``data``). Model parameters carry
*logical* axis names as metadata (``nnx.with_partitioning(init, ('embed', 'mlp'))`` or
``nnx.Param(value, sharding_names=(...))``); :data:`DEFAULT_LOGICAL_RULES` maps them to mesh axes:

==========================================  ===========
logical name                                mesh axis
==========================================  ===========
``'embed'``                                 ``'fsdp'``
``'mlp'``, ``'heads'``, ``'kv_heads'``,     ``'tensor'``
``'vocab'``
``'expert'``                                ``'expert'`` (replicated on a mesh without it)
``'head_dim'``, ``'layers'``, ``'conv_in'``, replicated
``'conv_out'``, ``'norm'``, ``None``
==========================================  ===========

A dimension whose size is not divisible by its mesh-axis size, or whose mesh axis is already used by an
earlier dimension of the same parameter, is replicated instead (logged at INFO). Batches are sharded on their
leading axis over ``('data', 'fsdp')`` (and ``'expert'`` when the mesh has it) and replicated over ``'tensor'``.

Typical use in a trainer (functional NNX style)::

    mesh = make_mesh(config.mesh)
    def init_state():                       # runs only under jit / eval_shape, never eagerly
        model = Model(model_cfg, rngs=nnx.Rngs(config.seed))
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": tx.init(params)}
    abstract_state = plan_sharded(init_state, mesh)      # ShapeDtypeStructs with .sharding; no allocation
    state = create_sharded(init_state, abstract_state)   # params born sharded (jit out_shardings)

Multi-process: every process calls the same functions; a process feeds only its own rows of the global batch
(:func:`process_batch_slice`, :func:`host_local_to_global`) and reads back only its own rows
(:func:`global_to_host_local`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adrpo_jax.train.config import ConfigError

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "EXPERT_AXIS",
    "DEFAULT_LOGICAL_RULES",
    "mesh_batch_axes",
    "LogicalRules",
    "make_mesh",
    "make_rollout_mesh",
    "rollout_device_count",
    "logical_to_partition_spec",
    "logical_to_named_sharding",
    "plan_sharded",
    "shardings_of",
    "create_sharded",
    "create_sharded_model",
    "shard_like",
    "batch_sharding",
    "replicated_sharding",
    "data_parallel_size",
    "process_batch_slice",
    "host_local_to_global",
    "global_to_host_local",
]

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
EXPERT_AXIS = "expert"  # optional mesh axis (config.mesh.expert), between fsdp and tensor

MeshAxes = str | tuple[str, ...] | None
LogicalRules = Sequence[tuple[str, MeshAxes]]

DEFAULT_LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", EXPERT_AXIS),
    ("head_dim", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
)


# ----------------------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------------------


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types (``('data', 'fsdp', 'expert', 'tensor')``
    when ``mesh_config`` has an ``expert`` entry).

    Args:
      mesh_config: ``config.mesh`` (or any mapping) with integer ``data``, ``fsdp``, ``tensor`` and optionally
        ``expert``; at most one of them may be -1, meaning "all remaining devices".
      devices: defaults to ``jax.devices()`` (all global devices).

    Raises:
      ConfigError: naming ``mesh.*`` and the device count when the product does not equal the device count.

    >>> mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    >>> dict(mesh.shape)
    {'data': 2, 'fsdp': 2, 'tensor': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    devices = devices[rollout_device_count(mesh_config, len(devices)):]  # mesh.rollout_devices: the rest trains
    n = len(devices)
    sizes = {}
    try:
        has_expert = EXPERT_AXIS in mesh_config
    except TypeError:
        has_expert = False
    axes = MESH_AXES[:2] + (EXPERT_AXIS,) + MESH_AXES[2:] if has_expert else MESH_AXES
    for axis in axes:
        try:
            value = mesh_config[axis]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"`mesh.{axis}` is missing from the mesh config {mesh_config!r}.",
                              key=f"mesh.{axis}") from None
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"`mesh.{axis}` must be a positive int or -1 (fill), got {value!r}.",
                              key=f"mesh.{axis}", value=value)
        sizes[axis] = value
    fills = [a for a, s in sizes.items() if s == -1]
    if len(fills) > 1:
        raise ConfigError(f"At most one mesh axis may be -1, got {['mesh.' + a for a in fills]}.",
                          key=f"mesh.{fills[1]}", value=-1)
    desc = " * ".join(f"mesh.{a}={s}" for a, s in sizes.items())
    if fills:
        rest = math.prod(s for s in sizes.values() if s != -1)
        if n % rest:
            raise ConfigError(f"Cannot fill `mesh.{fills[0]}`: {desc} — the other axes' product {rest} does not "
                              f"divide the device count {n}.", key=f"mesh.{fills[0]}", value=-1)
        sizes[fills[0]] = n // rest
    elif math.prod(sizes.values()) != n:
        raise ConfigError(f"`mesh`: {desc} = {math.prod(sizes.values())} must equal the number of devices ({n}); "
                          "set one axis to -1 to fill.", key="mesh", value=dict(sizes))
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    mesh = jax.make_mesh(tuple(sizes[a] for a in axes), axes, axis_types=axis_types, devices=devices)
    return _processes_contiguous(mesh)


def rollout_device_count(mesh_config: Any, device_count: int) -> int:
    """``mesh.rollout_devices`` (0 when absent): how many of the first devices form the rollout mesh of a
    disaggregated asynchronous run (:func:`make_rollout_mesh`); :func:`make_mesh` builds the training mesh of the
    others.

    Raises:
      ConfigError: naming ``mesh.rollout_devices`` when it is not an int >= 0, leaves no device to train on, or
        is used with several processes (the rollout and training meshes must each feed their rows from one host).
    """
    try:
        value = mesh_config.get("rollout_devices", 0)
    except AttributeError:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"`mesh.rollout_devices` must be an int >= 0 (0 = one mesh), got {value!r}.",
                          key="mesh.rollout_devices", value=value)
    value = int(value)
    if value and value >= device_count:
        raise ConfigError(f"`mesh.rollout_devices`={value} must be smaller than the device count {device_count}: "
                          "the other devices form the training mesh.", key="mesh.rollout_devices", value=value)
    if value and jax.process_count() > 1:
        raise ConfigError(f"`mesh.rollout_devices`={value}: disaggregated rollout / training meshes need a single "
                          f"process (this run has {jax.process_count()}); use 0.", key="mesh.rollout_devices",
                          value=value)
    return value


def make_rollout_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """The rollout mesh of a disaggregated asynchronous run: the first ``mesh.rollout_devices`` devices as a
    ``('data', 'fsdp', 'tensor')`` mesh of shape ``(N // mesh.rollout_tensor, 1, mesh.rollout_tensor)`` (the sampler
    is data parallel, with its parameters replicated or tensor-sharded: no ``fsdp`` gathers in the decode loop; an
    ``'expert'`` axis of size 1 before ``tensor`` when ``mesh_config`` names one, as :func:`make_mesh`); None when
    ``mesh.rollout_devices`` is 0 (one mesh for everything).

    >>> mesh = make_rollout_mesh({"data": -1, "fsdp": 1, "tensor": 1, "rollout_devices": 2})
    >>> dict(mesh.shape), [d.id for d in mesh.devices.flat]
    ({'data': 2, 'fsdp': 1, 'tensor': 1}, [0, 1])
    """
    devices = list(jax.devices() if devices is None else devices)
    n = rollout_device_count(mesh_config, len(devices))
    if not n:
        return None
    tensor = mesh_config.get("rollout_tensor", 1)
    if isinstance(tensor, bool) or not isinstance(tensor, (int, np.integer)) or tensor < 1 or n % tensor:
        raise ConfigError(f"`mesh.rollout_tensor`={tensor!r} must be a positive int dividing "
                          f"`mesh.rollout_devices`={n}.", key="mesh.rollout_tensor", value=tensor)
    try:  # the training mesh's axis names (an 'expert' axis of size 1 when the config names one: MoE layers
        has_expert = EXPERT_AXIS in mesh_config  # look their rules up on the mesh they run on)
    except TypeError:
        has_expert = False
    axes = MESH_AXES[:2] + (EXPERT_AXIS,) + MESH_AXES[2:] if has_expert else MESH_AXES
    shape = (n // int(tensor), 1, 1, int(tensor)) if has_expert else (n // int(tensor), 1, int(tensor))
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes), devices=devices[:n])


def _processes_contiguous(mesh: Mesh) -> Mesh:
    """``mesh`` with its batch positions reordered so that each process's devices are adjacent on the batch axes
    (stable: the ICI order is kept within a process), so that every process feeds one contiguous block of rows
    (:func:`process_batch_slice`). ``jax.make_mesh`` orders a multi-host slice's chips for the torus, which can
    interleave the hosts: on a v5p-8 (two hosts) the fsdp axis runs hosts 0, 1, 0, 1, ... Unchanged for one process,
    when the order is already contiguous, or when a batch position's devices (the tensor axis) span processes."""
    arr = np.asarray(mesh.devices)
    if len({d.process_index for d in arr.flat}) <= 1:
        return mesh
    n_batch = math.prod(mesh.shape[a] for a in mesh.axis_names if a != "tensor")  # tensor is the last axis
    groups = arr.reshape(n_batch, -1)
    procs = [{d.process_index for d in g} for g in groups]
    if any(len(p) > 1 for p in procs):
        return mesh
    order = sorted(range(n_batch), key=lambda i: (next(iter(procs[i])), i))
    if order == list(range(n_batch)):
        return mesh
    return Mesh(groups[order].reshape(arr.shape), mesh.axis_names, axis_types=mesh.axis_types)


# ----------------------------------------------------------------------------------------------------------
# Logical rules -> shardings
# ----------------------------------------------------------------------------------------------------------


def _rules_dict(rules: LogicalRules | Mapping[str, MeshAxes]) -> dict[str, tuple[str, ...]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for name, axes in items:
        if name in out:  # first rule wins (MaxText / flax convention)
            continue
        out[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return out


def logical_to_partition_spec(logical_names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                              rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_LOGICAL_RULES, *,
                              name: str = "<array>") -> P:
    """Maps one array's logical axis names to a PartitionSpec on ``mesh``.

    Size-1 mesh axes are dropped; a dimension not divisible by its mesh-axis size, or whose mesh axis an
    earlier dimension already uses, is replicated (logged). Unknown logical names raise ``ValueError``.

    >>> mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    >>> logical_to_partition_spec(("embed", "mlp"), (8, 6), mesh)
    P('fsdp', 'tensor')
    >>> logical_to_partition_spec(("embed", "mlp"), (3, 6), mesh)   # 3 % 2 != 0 -> replicated
    P(None, 'tensor')
    """
    if logical_names is None:
        return P()
    logical_names = tuple(logical_names)
    if len(logical_names) != len(shape):
        raise ValueError(f"Parameter `{name}` has logical axis names {logical_names} (rank {len(logical_names)}) "
                         f"but shape {tuple(shape)} (rank {len(shape)}).")
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, (logical, size) in enumerate(zip(logical_names, shape)):
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ValueError(f"Parameter `{name}` uses logical axis name {logical!r} which has no sharding rule; "
                             f"known names: {sorted(table)} (pass extra `rules` to add one).")
        axes = tuple(a for a in table[logical] if mesh.shape.get(a, 1) > 1)
        for a in table[logical]:
            if a not in mesh.shape and a != EXPERT_AXIS:  # a mesh without the optional expert axis: replicated
                raise ValueError(f"Sharding rule {logical!r} -> {a!r}: mesh has no axis {a!r} "
                                 f"(axes {tuple(mesh.axis_names)}).")
        if not axes:
            spec.append(None)
            continue
        if used & set(axes):
            log.info("Parameter %s dim %d (%r): mesh axes %s already used by an earlier dim; replicated.", name,
                     dim, logical, axes)
            spec.append(None)
            continue
        mesh_size = math.prod(mesh.shape[a] for a in axes)
        if size % mesh_size:
            log.info("Parameter %s dim %d (%r) of size %d is not divisible by mesh axes %s (size %d); replicated.",
                     name, dim, logical, size, axes, mesh_size)
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _variable_logical_names(v: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = v.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    if names is None:
        return None
    if isinstance(names, P):
        names = tuple(names)
    return tuple(names)


def logical_to_named_sharding(abstract_state: Any, mesh: Mesh,
                              rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_LOGICAL_RULES) -> Any:
    """Maps every array of an (abstract) state to a ``NamedSharding`` from its logical axis names.

    ``abstract_state`` is any pytree: ``nnx.Variable`` leaves (from ``nnx.state``/``nnx.split``/
    ``nnx.eval_shape``, including the optimizer state that optax builds over them, which keeps the
    Variables' metadata) use their ``out_sharding`` names; other array-like leaves (``jax.Array``,
    ``ShapeDtypeStruct``, numpy) without names are replicated. The result has the same structure (each
    Variable's value replaced by its NamedSharding), so it can be passed as ``out_shardings``/``in_shardings``
    to ``jax.jit`` or to :func:`shard_like`.
    """
    def one(path, leaf):
        if _is_variable(leaf):
            value = leaf.get_raw_value() if hasattr(leaf, "get_raw_value") else leaf.value
            shape = getattr(value, "shape", None)
            if shape is None:
                return leaf.replace(value=NamedSharding(mesh, P()))
            spec = logical_to_partition_spec(_variable_logical_names(leaf), shape, mesh, rules,
                                             name=_path_str(path))
            return leaf.replace(value=NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_variable)


def shardings_of(tree: Any) -> Any:
    """Tree of the ``.sharding`` of every leaf (arrays or ShapeDtypeStructs with a sharding)."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(f"Leaf {x!r} has no sharding; build the abstract tree with `plan_sharded`.")
        return sharding
    return jax.tree.map(one, tree)


def plan_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args: Any,
                 rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_LOGICAL_RULES) -> Any:
    """Shapes and shardings of ``init_fn(*args)`` without allocating anything (``jax.eval_shape``).

    Returns the output tree with every array replaced by a ``jax.ShapeDtypeStruct`` carrying its
    ``NamedSharding`` (from the logical axis names): the restore target of ``Checkpointer.restore_latest``
    and, through :func:`shardings_of`, the ``out_shardings`` of :func:`create_sharded`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_named_sharding(abstract, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create_sharded(init_fn: Callable[..., Any], abstract_state: Any, *args: Any) -> Any:
    """Runs ``init_fn(*args)`` under ``jax.jit(out_shardings=...)`` so every array is born sharded.

    ``abstract_state`` comes from :func:`plan_sharded` (same function). No full copy ever exists on one
    device or on the host.
    """
    return jax.jit(init_fn, out_shardings=shardings_of(abstract_state))(*args)


def create_sharded_model(factory: Callable[[], nnx.Module], mesh: Mesh,
                         rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_LOGICAL_RULES) -> nnx.Module:
    """Builds ``factory()`` with every variable born sharded according to its logical axis names.

    Plans with ``nnx.eval_shape``, computes the shardings, materializes the state inside
    ``jax.jit(out_shardings=...)`` and merges it back into a module.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    shardings = logical_to_named_sharding(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(factory())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_like(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` of ``tree`` onto ``shardings`` (same structure, or a prefix of it).

    Host values must be identical on every process (multi-process ``device_put`` semantics).
    """
    try:
        return jax.device_put(tree, shardings)
    except ValueError as err:
        if "tree" in str(err).lower() or "structure" in str(err).lower():
            raise ValueError(f"`tree` and `shardings` have different structures: {err}") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def mesh_batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes ``mesh`` shards a batch over: ``('data', 'fsdp')``, plus ``'expert'`` when the mesh has it."""
    return BATCH_AXES + ((EXPERT_AXIS,) if EXPERT_AXIS in mesh.shape else ())


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Leading (batch) axis sharded over ``('data', 'fsdp')`` (and ``'expert'`` if the mesh has it), other axes
    replicated.

    ``ndim`` only pads the PartitionSpec with ``None`` to that rank (e.g. for ``shard_map`` in_specs).
    """
    rest = () if ndim is None else (None,) * (ndim - 1)
    return NamedSharding(mesh, P(mesh_batch_axes(mesh), *rest))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: ``mesh.shape['data'] * mesh.shape['fsdp']`` (times ``mesh.shape['expert']``)."""
    return int(math.prod(mesh.shape[a] for a in mesh_batch_axes(mesh)))


def process_batch_slice(global_batch_size: int, mesh: Mesh, process_index: int | None = None) -> slice:
    """Rows ``[start, stop)`` of the global batch that ``process_index`` (default: this process) feeds.

    These are exactly the rows held by the process's devices under :func:`batch_sharding`. Raises
    ``ValueError`` if ``global_batch_size`` is not divisible by the data-parallel size, or if the process's
    rows are not contiguous (a mesh whose device order interleaves processes on the batch axes).

    >>> mesh = make_mesh({"data": 4, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:8])
    >>> process_batch_slice(16, mesh)       # single process: all rows
    slice(0, 16, None)
    """
    dp = data_parallel_size(mesh)
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, (int, np.integer)) or \
            global_batch_size <= 0 or global_batch_size % dp:
        raise ValueError(f"`global_batch_size`={global_batch_size!r} must be a positive multiple of the "
                         f"data-parallel size {dp} (mesh.data * mesh.fsdp).")
    pid = jax.process_index() if process_index is None else process_index
    index_map = batch_sharding(mesh).devices_indices_map((int(global_batch_size),))
    rows: set[int] = set()
    device: Any  # jax's stubs leave Device unresolved
    for device, index in index_map.items():
        if device.process_index == pid:
            start, stop, _ = index[0].indices(int(global_batch_size))
            rows.update(range(start, stop))
    if not rows:
        raise ValueError(f"Process {pid} holds no devices of the mesh.")
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(f"The batch rows of process {pid} are not contiguous under this mesh; order the devices "
                         "so that each process's devices are adjacent on the ('data', 'fsdp') axes.")
    return slice(start, stop)


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's rows (numpy, leading axis) into global arrays sharded by :func:`batch_sharding`.

    Every process passes its own :func:`process_batch_slice` rows; with a single process this is a sharded
    ``device_put`` of the whole batch. Uses ``jax.make_array_from_process_local_data``.
    """
    def one(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(f"Batch leaf `{_path_str(path)}` is a scalar; every leaf needs a leading batch axis.")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(one, batch)


def global_to_host_local(array: Any) -> Any:
    """This process's rows of global array(s) as numpy, in global row order (a tree is mapped leaf-wise).

    Rows replicated on several local devices (e.g. over ``'tensor'``) appear once. Only the leading axis may
    be sharded across processes; with a single process this is ``np.asarray``.
    """
    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        pieces: dict[tuple[int, int], Any] = {}
        for shard in x.addressable_shards:
            idx = shard.index
            for d, sl in enumerate(idx[1:], start=1):
                start, stop, _ = sl.indices(x.shape[d])
                if (start, stop) != (0, x.shape[d]):
                    raise ValueError(f"global_to_host_local: axis {d} of an array with shape {x.shape} is sharded "
                                     f"({x.sharding}); only the leading axis may be split across processes.")
            start, stop, _ = idx[0].indices(x.shape[0]) if x.ndim else (0, 1, 1)
            pieces.setdefault((start, stop), shard.data)
        ordered = [np.asarray(pieces[k]) for k in sorted(pieces)]
        return np.concatenate(ordered, axis=0) if x.ndim else ordered[0]

    return jax.tree.map(one, array)
