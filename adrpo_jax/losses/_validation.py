"""Static (trace-time) argument checks shared by the loss functions.

Every check looks only at shapes, dtypes and Python values, so it runs once while tracing and costs nothing
at run time. Each failure raises :class:`ValueError` naming the offending argument and showing the bad
value, shape or dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_array",
    "check_same_shape",
    "check_shape",
    "check_rank",
    "check_floating",
    "check_mask",
    "check_integer",
    "check_option",
    "check_scalar",
    "check_axis_name",
    "to_float",
    "check_real",
    "check_static_int",
]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_array(x: Any, name: str) -> jax.Array:
    """Returns ``x`` as a jax array; raises if it is ``None`` or not array-like."""
    if x is None:
        raise ValueError(f"`{name}` must be an array, got None.")
    if isinstance(x, (str, bytes, dict)):
        raise ValueError(f"`{name}` must be an array, got {type(x).__name__}.")
    try:
        return jnp.asarray(x)
    except TypeError as err:
        raise ValueError(f"`{name}` must be an array, got {type(x).__name__}: {err}") from None


def check_rank(x: jax.Array, rank: int | Collection[int] | None, name: str, *, min_rank: int | None = None) -> None:
    """Raises unless ``x.ndim`` equals ``rank`` (or is in it), or is at least ``min_rank`` (then ``rank`` is unused:
    pass None)."""
    ndim = jnp.ndim(x)
    if min_rank is not None:
        if ndim < min_rank:
            raise ValueError(f"`{name}` must have rank >= {min_rank}, got shape {_shape(x)}.")
        return
    if rank is None:
        raise TypeError("check_rank needs `rank` or `min_rank`")
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if ndim not in ranks:
        want = ranks[0] if len(ranks) == 1 else " or ".join(map(str, ranks))
        raise ValueError(f"`{name}` must have rank {want}, got shape {_shape(x)} (rank {ndim}).")


def check_shape(x: jax.Array, shape: Sequence[int], name: str, *, expected_from: str | None = None) -> None:
    """Raises unless ``x.shape == shape``."""
    if _shape(x) != tuple(shape):
        src = f" (the shape of `{expected_from}`)" if expected_from else ""
        raise ValueError(f"`{name}` must have shape {tuple(shape)}{src}, got {_shape(x)}.")


def check_same_shape(x: jax.Array, name: str, ref: jax.Array, ref_name: str) -> None:
    """Raises unless ``x`` has the same shape as ``ref``."""
    check_shape(x, _shape(ref), name, expected_from=ref_name)


def check_floating(x: jax.Array, name: str) -> None:
    """Raises unless ``x`` has a floating dtype (float16/bfloat16/float32/float64)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"`{name}` must have a floating dtype, got {jnp.result_type(x)}.")


def check_integer(x: jax.Array, name: str) -> None:
    """Raises unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"`{name}` must have an integer dtype, got {jnp.result_type(x)}.")


def check_mask(mask: Any, shape: Sequence[int], name: str = "mask", *, expected_from: str | None = None
               ) -> jax.Array | None:
    """Validates an optional mask and returns it as a bool array (``None`` stays ``None``).

    Accepted dtypes: bool, or integer/floating 0/1 values (non-zero means valid), e.g. TRL's int
    ``completion_mask``.
    """
    if mask is None:
        return None
    mask = check_array(mask, name)
    check_shape(mask, shape, name, expected_from=expected_from)
    dtype = jnp.result_type(mask)
    if dtype == jnp.bool_:
        return mask
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating):
        return mask != 0
    raise ValueError(f"`{name}` must have a bool, integer or floating dtype, got {dtype}.")


def check_option(value: Any, options: Collection[Any], name: str) -> None:
    """Raises unless ``value`` is one of ``options``."""
    if value not in options:
        raise ValueError(f"`{name}` must be one of {sorted(map(repr, options))}, got {value!r}.")


def check_scalar(value: Any, name: str, *, positive: bool = False, nonnegative: bool = False,
                 greater_than: float | None = None, allow_none: bool = False, allow_traced: bool = True,
                 integer: bool = False) -> None:
    """Checks a scalar hyper-parameter.

    Python numbers (and concrete 0-d arrays) are range-checked. Traced 0-d arrays (e.g. a scheduled ``beta``
    under ``jit``) pass when ``allow_traced``; their shape must still be ``()``.
    """
    if value is None:
        if allow_none:
            return
        raise ValueError(f"`{name}` must be a number, got None.")
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got bool {value!r}.")
    if isinstance(value, numbers.Number):
        if not isinstance(value, numbers.Real):
            raise ValueError(f"`{name}` must be a real number, got {value!r}.")
        if integer and not isinstance(value, numbers.Integral):
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        v = float(value)
    else:
        try:
            arr = jnp.asarray(value)
        except TypeError:
            raise ValueError(f"`{name}` must be a scalar number, got {type(value).__name__}.") from None
        if arr.shape != ():
            raise ValueError(f"`{name}` must be a scalar, got shape {arr.shape}.")
        if integer and not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"`{name}` must be an integer, got dtype {arr.dtype}.")
        if isinstance(arr, jax.core.Tracer):
            if not allow_traced:
                raise ValueError(f"`{name}` must be a static Python number, got a traced array.")
            return
        v = float(arr)
    if not np.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if positive and not v > 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")
    if nonnegative and not v >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    if greater_than is not None and not v > greater_than:
        raise ValueError(f"`{name}` must be > {greater_than}, got {value!r}.")


def check_axis_name(axis_name: Any, name: str = "axis_name") -> None:
    """An axis name is None, a hashable name (usually a str) or a tuple of such names."""
    if axis_name is None:
        return
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names:
        raise ValueError(f"`{name}` must be a name or a non-empty tuple of names, got {axis_name!r}.")
    for n in names:
        if n is None or isinstance(n, (list, dict, set)):
            raise ValueError(f"`{name}` must be a name or a tuple of names, got {axis_name!r}.")


def to_float(x: jax.Array) -> jax.Array:
    """Upcasts to at least float32 (bfloat16/float16 -> float32; float64 stays float64)."""
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    return jnp.asarray(x, dtype)


def check_real(x: Any, name: str) -> jax.Array:
    """Returns ``x`` as an array of a real dtype (bool/integer/floating), raising otherwise."""
    x = check_array(x, name)
    dtype = jnp.result_type(x)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"`{name}` must have a real (bool, integer or floating) dtype, got {dtype}.")
    return x


def check_static_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """A static Python integer >= ``minimum`` (shapes depend on it)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"`{name}` must be a Python int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
    return int(value)
