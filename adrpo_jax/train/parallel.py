"""Per-device loss computation over the batch axes of the mesh (``jax.shard_map``).

The trainers run the model under ``jax.jit`` with ``NamedSharding`` annotations (GSPMD handles FSDP and
tensor parallelism of the parameters) and evaluate the *loss* of :mod:`adrpo_jax.losses` inside a
``jax.shard_map`` over the batch axes ``('data', 'fsdp')``, with ``axis_name`` set. That is the loss library's
distributed contract in action: each device aggregates its own rows, only normalizers (token / sequence counts)
cross devices, the returned loss share is ``psum``-ed into the global loss, and every statistic in ``metrics``
is already global.

Why this is gradient-exact: inside ``shard_map`` with ``check_vma=True`` the transpose of ``psum`` is a
broadcast, so differentiating ``psum(share)`` hands each device the cotangent of its own share, and the
gradients w.r.t. the (GSPMD-sharded) inputs are exactly those of the single-device loss. Nothing ever
``pmean``-s a gradient. ``tests/train/test_parallel.py`` checks values and gradients against one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from adrpo_jax.train.sharding import BATCH_AXES

__all__ = ["batch_sharded_loss"]

PyTree = Any


def batch_sharded_loss(loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]], mesh: Mesh, *,
                       batch_axes: tuple[str, ...] = BATCH_AXES) -> Callable[..., tuple[jax.Array, dict]]:
    """Wraps ``loss_fn(batch, axis_name=...) -> (loss_share, metrics)`` into a batch-parallel ``shard_map``.

    Args:
      loss_fn: takes one pytree ``batch`` whose every leaf has the global batch as its leading axis, and the
        keyword ``axis_name``; returns this device's share of the loss (``psum`` over ``axis_name`` = global
        loss) and a dict of *global* scalar metrics — the contract of every reduced loss in
        :mod:`adrpo_jax.losses`. Constants it needs (hyper-parameters) are closed over; arrays that are not
        batched must not be closed over (pass them in ``batch`` with a leading axis, or keep them outside).
      mesh: the training mesh; axes not in ``batch_axes`` (e.g. ``'tensor'``) see replicated rows.
      batch_axes: mesh axes the leading batch axis is split over.

    Returns:
      ``fn(batch) -> (loss, metrics)`` with the global loss (differentiable) and global metrics, equal to
      ``loss_fn(batch, axis_name=None)`` on one device. The leading batch size must be divisible by the
      product of the ``batch_axes`` sizes (checked, naming the leaf).
    """
    axes = tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch_axes {axes} name axes {unknown} that the mesh {mesh.axis_names} does not have")
    n_shards = 1
    for a in axes:
        n_shards *= mesh.shape[a]
    axis_name = axes if len(axes) > 1 else axes[0]

    def body(batch):
        share, metrics = loss_fn(batch, axis_name=axis_name)
        return jax.lax.psum(share, axis_name), metrics

    def wrapped(batch: PyTree):
        leaves = jax.tree_util.tree_leaves_with_path(batch)
        if not leaves:
            raise ValueError("batch_sharded_loss: `batch` has no array leaves")
        for path, leaf in leaves:
            shape: tuple[int, ...] = tuple(getattr(leaf, "shape", ()))
            if len(shape) == 0 or shape[0] % n_shards:
                raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has shape {tuple(shape)}: its leading "
                                 f"(batch) axis must be divisible by {n_shards} = product of mesh axes {axes}")
        in_specs = jax.tree.map(lambda x: P(axes, *([None] * (x.ndim - 1))), batch)
        return jax.shard_map(body, mesh=mesh, in_specs=(in_specs,), out_specs=(P(), P()))(batch)

    return wrapped
