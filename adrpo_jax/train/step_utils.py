r"""Pure helpers used inside jitted train steps: guarded optimizer updates, gradient accumulation, repeated
updates, batch sharding hints, metric reductions and the checks of the steps' static options.

The conventions of the steps (:mod:`adrpo_jax.rl.step`, :mod:`adrpo_jax.flow.step`): everything is a pure function
of arrays plus static, hashable options, built for ``jax.jit`` over the functional NNX split ``(graphdef, params,
frozen)``: ``params`` is the trainable state (the ``nnx.Param`` filter by default; a LoRA setup swaps the filter),
``frozen`` the rest of the model state. The model forward runs under GSPMD (parameters and batches carry
``NamedSharding``\ s; :func:`constrain_batch`, :func:`mesh_context`); the loss runs inside ``jax.shard_map`` over
the batch axes through :func:`adrpo_jax.train.batch_sharded_loss`, with the loss library's distributed contract
(local sums, global normalizers, global metrics).

>>> import jax, jax.numpy as jnp, optax
>>> tx = optax.sgd(0.1)
>>> params = {"w": jnp.ones(3)}
>>> opt_state = tx.init(params)
>>> new_params, _, info = apply_updates_if_finite(tx, {"w": jnp.array([1.0, jnp.nan, 0.0])}, opt_state, params)
>>> bool(info["skipped"]), new_params["w"].tolist()
(True, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from adrpo_jax.train.sharding import BATCH_AXES

__all__ = ["apply_updates_if_finite", "tree_is_finite", "global_norm", "accumulate_gradients", "masked_mean_std",
           "masked_min_max", "reduce_update_metrics", "mix_params", "split_micro_batches", "select_tree",
           "repeat_updates", "mesh_context", "constrain_batch", "check_options", "options_from_section"]

PyTree = Any


def mix_params(ref_params: PyTree, params: PyTree, alpha: float) -> PyTree:
    """Reference refresh ``ref = alpha * policy + (1 - alpha) * ref`` (``alpha = 1``: a copy of the policy; TRL's
    ``ref_model_mixup_alpha`` / ``ref_model_sync_steps``), in ``ref``'s dtypes, mixed in float32. Pure; the result
    never aliases ``params`` (safe to jit with ``ref_params`` donated while ``params`` lives on).

    >>> mix_params({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.25)["w"].tolist()
    [0.25, 0.25]
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"`alpha` must be in (0, 1], got {alpha!r}")
    if alpha == 1.0:
        return jax.tree.map(lambda r, p: jnp.array(p, dtype=r.dtype, copy=True), ref_params, params)
    return jax.tree.map(lambda r, p: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
                                      ).astype(r.dtype), ref_params, params)


def global_norm(tree: PyTree) -> jax.Array:
    """sqrt(sum of squares) of every floating leaf, accumulated in float32 (NaN/Inf propagate)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.abs(x).astype(jnp.float32))) for x in leaves))


def tree_is_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every element of every floating leaf is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_updates_if_finite(tx: optax.GradientTransformation, grads: PyTree, opt_state: optax.OptState,
                            params: PyTree, *, loss: jax.Array | None = None,
                            ) -> tuple[PyTree, optax.OptState, dict[str, jax.Array]]:
    """Applies ``tx`` to ``params`` unless the loss or any gradient is non-finite.

    Jit-friendly (no Python control flow on values): the update is always computed and then selected with
    ``jnp.where``, so when the step is skipped the returned ``params`` and ``opt_state`` are bit-identical to
    the inputs (the optimizer's step count and the learning-rate schedule do not advance either).

    Args:
      tx: the optimizer (``optim.make_optimizer``).
      grads: gradients, same tree as ``params``.
      opt_state: ``tx``'s state.
      params: current parameters (any pytree, e.g. an ``nnx.State`` of ``nnx.Param``).
      loss: optional loss (any shape); a non-finite value also skips the update.

    Returns:
      ``(params, opt_state, info)``; ``info`` holds scalars ``skipped`` (bool), ``grad_norm`` (global norm
      of ``grads`` before clipping, float32) and ``update_norm`` (global norm of the applied update; 0 when
      skipped).
    """
    grad_norm = global_norm(grads)
    finite = tree_is_finite(grads)
    if loss is not None:
        finite = jnp.logical_and(finite, jnp.all(jnp.isfinite(jnp.asarray(loss))))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    params_out = select_tree(finite, new_params, params)
    opt_state_out = select_tree(finite, new_opt_state, opt_state)
    update_norm = jnp.where(finite, global_norm(updates), jnp.zeros((), jnp.float32))
    info = {"skipped": jnp.logical_not(finite), "grad_norm": grad_norm, "update_norm": update_norm}
    return params_out, opt_state_out, info


def select_tree(flag: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``jnp.where(flag, new, old)`` leaf by leaf (a scalar bool ``flag`` picks a whole tree inside a jit)."""
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def repeat_updates(update: Callable[..., tuple], params: PyTree, opt_state: optax.OptState, xs: PyTree | None
                   ) -> tuple[PyTree, optax.OptState, dict[str, jax.Array], list]:
    """Optimizer updates in sequence: ``update(params, opt_state, x) -> (params, opt_state, metrics, *extra)``.

    ``xs`` None: one update, ``update(params, opt_state, None)``, called directly (no scan); its ``extra`` outputs
    (e.g. gradients) are returned. Else one update per entry of ``xs``'s leading axis in a ``jax.lax.scan``, and
    ``extra`` is one None per extra output (not kept across updates). Returns ``(params, opt_state, metrics stacked
    [U], extra)`` (:func:`reduce_update_metrics` reduces the stack).
    """
    if xs is None:
        params, opt_state, metrics, *extra = update(params, opt_state, None)
        return params, opt_state, jax.tree.map(lambda x: x[None], metrics), extra
    num_extra: list[int] = []

    def body(carry, x):
        p, o, m, *rest = update(*carry, x)
        num_extra[:] = [len(rest)]
        return (p, o), m

    (params, opt_state), stacked = jax.lax.scan(body, (params, opt_state), xs)
    return params, opt_state, stacked, [None] * num_extra[0]


def mesh_context(mesh: Mesh | None):
    """While tracing: ``mesh`` as the abstract mesh, so that models reading it pin their activations to the batch
    sharding (:mod:`adrpo_jax.models.llm.activation_sharding`; without it, on an ``fsdp`` mesh GSPMD follows the
    FSDP-sharded weights and runs every row on every device); nothing without a mesh."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Every leaf constrained to the batch sharding (leading axis over ``BATCH_AXES``) under ``mesh`` (arrays made
    inside a step, e.g. noise or a gathered minibatch: GSPMD would otherwise replicate them); as is without."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def check_options(opts: Any, *, choices: Mapping[str, Sequence[Any]], ints: Mapping[str, int]) -> None:
    """Checks fields of a step's options: ``choices`` maps a field to its allowed values, ``ints`` to the least
    int it may hold (bools refused); raises ``ValueError`` naming the field, its value and what it must be."""
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise ValueError(f"{name}={getattr(opts, name)!r} must be one of {tuple(allowed)}")
    for name, least in ints.items():
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r} must be an int >= {least}")


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def options_from_section(cls: type, section: Any, given: dict[str, Any], *, optional: tuple[str, ...] = ()) -> Any:
    """``cls(**given, **rest)``: each other field of the options dataclass ``cls`` is the config ``section``'s key
    of the same name, cast to the field's annotated type (int, float, bool, str); a key named in ``optional`` that
    the section lacks gives the field's default (any other missing key raises)."""
    rest = {f.name: _CASTS[str(f.type)](section.get(f.name, f.default) if f.name in optional
                                        else getattr(section, f.name)) for f in dataclasses.fields(cls)
            if f.name not in given}
    return cls(**given, **rest)


def split_micro_batches(batch: PyTree, num_micro_batches: int) -> PyTree:
    """Reshapes every leaf ``[B, ...]`` to ``[num_micro_batches, B // num_micro_batches, ...]``.

    Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...`` (k = ``num_micro_batches``): a batch sharded on its
    leading axis then keeps every micro-batch spread over all devices (a contiguous split would put each
    micro-batch on a subset of the devices). Raises ``ValueError`` if ``B`` is not divisible.

    >>> split_micro_batches({"x": np.arange(6)}, 2)["x"].tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, (int, np.integer)) or \
            num_micro_batches < 1:
        raise ValueError(f"`num_micro_batches` must be a positive int, got {num_micro_batches!r}.")
    k = int(num_micro_batches)

    def one(x):
        x = jnp.asarray(x) if not isinstance(x, (np.ndarray, jax.Array)) else x
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(f"Batch leaf of shape {tuple(x.shape)} cannot be split into `num_micro_batches`={k} "
                             "micro-batches along its leading axis.")
        moved = x.reshape((x.shape[0] // k, k) + tuple(x.shape[1:]))
        return jnp.swapaxes(moved, 0, 1) if isinstance(x, jax.Array) else np.swapaxes(moved, 0, 1)

    return jax.tree.map(one, batch)


def accumulate_gradients(loss_and_grad_fn: Callable[[PyTree, PyTree], tuple[Any, PyTree]], params: PyTree,
                         micro_batches: PyTree) -> tuple[Any, PyTree]:
    """Sums ``loss_and_grad_fn(params, micro_batch)`` over a leading micro-batch axis with ``jax.lax.scan``.

    A drop-in replacement for calling a ``jax.value_and_grad``-style function on the full batch:

    * ``loss_and_grad_fn(params, micro_batch) -> (value, grads)`` where ``value`` is the loss or
      ``(loss, aux)`` (``has_aux=True``), i.e. exactly what ``jax.value_and_grad(f, has_aux=...)`` returns;
    * ``micro_batches``: every leaf has shape ``[k, ...]`` (see :func:`split_micro_batches`);
    * returns ``(value_sum, grads_sum)``: every leaf of ``value`` and of the gradients summed over the k
      micro-batches (floating leaves accumulated in float32, cast back to their dtype at the end).

    The sum equals the full-batch gradient when the loss normalizes by the *global* batch normalizer (e.g.
    the total number of valid tokens of the whole batch, passed as ``normalizer=`` to the loss functions),
    not by each micro-batch's own count. Memory: one micro-batch's activations at a time.
    """
    leaves = jax.tree.leaves(micro_batches)
    if not leaves:
        raise ValueError("`micro_batches` has no arrays.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"Every leaf of `micro_batches` needs the same leading (micro-batch) axis; got leading "
                         f"sizes {sorted(sizes)}.")
    k = sizes.pop()
    if k < 1:
        raise ValueError("`micro_batches` has an empty micro-batch axis.")

    def to_acc(x):
        x = jnp.asarray(x)
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    first = jax.tree.map(lambda x: x[0], micro_batches)
    if k == 1:
        return loss_and_grad_fn(params, first)
    # Shapes/dtypes of one call, without tracing it twice into the program.
    out_shapes = jax.eval_shape(loss_and_grad_fn, params, first)
    carry0 = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        out_shapes)

    def body(carry, micro_batch):
        out = loss_and_grad_fn(params, micro_batch)
        return jax.tree.map(lambda a, b: a + to_acc(b), carry, out), None

    total, _ = jax.lax.scan(body, carry0, micro_batches)
    value_sum, grads_sum = jax.tree.map(lambda x, s: x.astype(s.dtype), total, out_shapes)
    return value_sum, grads_sum


def masked_mean_std(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and (population) std of ``x`` over the entries where ``mask`` is True; ``(0, 0)`` when none is.

    For logging: masked-out entries (NaN rewards, padding) never enter either statistic.

    >>> m, s = masked_mean_std(jnp.array([1.0, 3.0, jnp.nan]), jnp.array([True, True, False]))
    >>> float(m), float(s)
    (2.0, 1.0)
    """
    n = jnp.sum(mask.astype(jnp.float32))
    mean = jnp.where(n > 0, jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1.0), 0.0)
    var = jnp.where(n > 0, jnp.sum(jnp.where(mask, jnp.square(x - mean), 0.0)) / jnp.maximum(n, 1.0), 0.0)
    return mean, jnp.sqrt(var)


def masked_min_max(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Min and max of ``x`` over the entries where ``mask`` is True; ``(0, 0)`` when none is."""
    any_valid = jnp.any(mask)
    lo = jnp.where(any_valid, jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)
    hi = jnp.where(any_valid, jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)
    return lo, hi


def reduce_update_metrics(stacked: dict[str, jax.Array], *, weights: dict[str, jax.Array] | None = None,
                          sum_keys: tuple[str, ...] = ()) -> dict[str, jax.Array]:
    """Metrics of several optimizer updates (or micro-batches) stacked on axis 0 (``[U]`` each) -> one metric each.

    ``skipped`` (from :func:`apply_updates_if_finite`) becomes "any update skipped" plus the count
    ``skipped_updates``; ``sum_keys`` are summed; keys ending in ``_min`` / ``_max`` take the min / max over
    updates; everything else the mean (float32).

    ``weights`` maps a key to ``[U]`` non-negative weights, the number of items (tokens, sequences) its
    per-update value was computed over: that key's mean becomes ``sum(w v) / sum(w)``, and a ``_min`` / ``_max``
    key leaves out the updates with weight 0 (an update without any item reports 0 there, which is no minimum).
    When every weight is 0 the result is 0.

    >>> m = reduce_update_metrics({"skipped": jnp.array([False, True]), "loss": jnp.array([1.0, 3.0]),
    ...                            "ratio_max": jnp.array([1.5, 1.2])})
    >>> bool(m["skipped"]), float(m["skipped_updates"]), float(m["loss"]), float(m["ratio_max"])
    (True, 1.0, 2.0, 1.5)
    >>> n = jnp.array([0.0, 30.0])  # the first update had no loss token
    >>> m = reduce_update_metrics({"ratio_mean": jnp.array([0.0, 1.05]), "ratio_min": jnp.array([0.0, 0.9])},
    ...                           weights={"ratio_mean": n, "ratio_min": n})
    >>> round(float(m["ratio_mean"]), 4), round(float(m["ratio_min"]), 4)
    (1.05, 0.9)
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(stacked))
    if unknown:
        raise ValueError(f"`weights` names keys that are not metrics: {unknown}")
    out = {}
    for key, v in stacked.items():
        w = weights.get(key)
        if w is not None:
            w = jnp.asarray(w, jnp.float32)
        if key == "skipped":
            out[key] = jnp.any(v)
            out["skipped_updates"] = jnp.sum(v.astype(jnp.float32))
        elif key in sum_keys:
            out[key] = jnp.sum(v.astype(jnp.float32))
        elif key.endswith(("_min", "_max")):
            v = v.astype(jnp.float32)
            if w is None:
                out[key] = jnp.min(v) if key.endswith("_min") else jnp.max(v)
            else:
                lo, hi = masked_min_max(v, w > 0)
                out[key] = lo if key.endswith("_min") else hi
        elif w is not None:
            wsum = jnp.sum(w)
            out[key] = jnp.where(wsum > 0, jnp.sum(w * v.astype(jnp.float32)) / jnp.maximum(wsum, 1e-30), 0.0)
        else:
            out[key] = jnp.mean(v.astype(jnp.float32))
    return out
