"""Layer stacking shared by the decoder (`StackedDecoderLayers`) and the DiT (`StackedDiTBlocks`).

A stacked module has the attributes of one layer, every variable with a leading ``[L]`` axis whose logical name is
``'layers'`` (left unsharded by the sharding rules), and is run by one ``jax.lax.scan``. These helpers build it from
L freshly drawn layers and give back a detached copy of layer ``i``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["iter_variables", "stack_variables", "unstacked_copy"]


def iter_variables(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  """(path, Variable) of every variable of `module` (the live objects), in graph order."""
  return [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)]


def stack_variables(stack: nnx.Module, others: list[nnx.Module]) -> None:
  """Replaces every variable of `stack` (layer 0) in place by the stack of it and the same variable of each of
  `others` (layers 1..L-1) on a new leading axis, whose logical sharding name is 'layers'."""
  other_vars = [dict(iter_variables(o)) for o in others]
  for path, var in iter_variables(stack):
    value = var.get_value()
    var.set_value(jnp.stack([value] + [o[path].get_value() for o in other_vars]))
    names = var.get_metadata().get("out_sharding")
    var.set_metadata("out_sharding", ("layers",) + (tuple(names) if names else (None,) * value.ndim))


def unstacked_copy(stack: nnx.Module, i, length: int, cls: type, what: str = "layer") -> nnx.Module:
  """Layer `i` of a stacked module of `length` layers as a detached `cls` instance (writes do not reach the
  stack); negative `i` counts from the end. Raises TypeError / IndexError naming the bad index."""
  if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
    raise TypeError(f"{what} index must be an int, got {i!r}")
  if not -length <= i < length:
    raise IndexError(f"{what} index {i} out of range for {length} {what}s")
  graphdef, state = nnx.split(stack)
  layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[int(i) % length], state))
  object.__setattr__(layer, "__class__", cls)
  for _, var in iter_variables(layer):
    names = var.get_metadata().get("out_sharding")
    if names and names[0] == "layers":
      var.set_metadata("out_sharding", tuple(names[1:]))
  return layer
