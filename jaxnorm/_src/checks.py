"""Generic argument validators and the one message format they share.

Every check runs at trace time on static values and raises a ``ValueError``
whose message names the function, the argument (in backticks), the rule, the
value received and the fix::

    group_norm: `num_groups`=3 must divide the 32 channels of `x` (shape
    (2, 4, 4, 32)); pass a divisor of 32 or `group_size=`.

Naming: ``check_*`` returns what it validated (converted where that is the
point, e.g. :func:`check_mask` returns an array, :func:`check_static_bool` a
Python bool); ``raise_*`` always raises. Only validators that serve several
modules live here; a check with one caller sits beside that caller (e.g.
``group_norm.check_groups``, ``batch_norm.check_ghost_batch_size``,
``folding.check_feature_axis``, ``torch.check_momentum``). Axis validation
lives in :mod:`jaxnorm._src.axes` (``canonical_axes``).

Formerly ``jaxnorm/_src/errors.py`` (dissolved); its generic names are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(fn: str, x: Any, name: str = "x") -> Any:
    """Returns ``x`` unchanged; raises unless it has a real floating dtype (float16/bfloat16/float32/float64)."""
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        # Casting to a real dtype would drop the imaginary part silently, so
        # the usual fix ("cast it") is wrong advice here.
        raise ValueError(
            f"{fn}: `{name}` has dtype {dtype} (shape {np.shape(x)}): complex inputs are unsupported (flax's "
            f"layers normalize by |x|^2; jaxnorm refuses them, see 'Where jaxnorm differs from flax' in the "
            f"Flax guide); normalize the real and imaginary parts as real features, e.g. "
            f"`jnp.concatenate([{name}.real, {name}.imag], axis=-1)`."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{fn}: `{name}` must have a real floating dtype, got {dtype} (shape "
            f"{np.shape(x)}); cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    return x


def check_static_bool(fn: str, name: str, value: Any) -> bool:
    """Returns ``value`` as a Python bool; raises for traced arrays and other types."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{fn}: `{name}` must be a static Python bool, got a traced value "
            f"({value.aval}); it selects different computations, so mark it "
            f"static, e.g. `jax.jit(step, static_argnames='{name}')`, or close "
            f"over it with functools.partial."
        )
    raise ValueError(
        f"{fn}: `{name}` must be a Python bool, got {value!r} of type "
        f"{type(value).__name__}; pass `{name}=True` or `{name}=False`."
    )



def check_mask(fn: str, mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """Checks that ``mask`` is boolean and fits ``shape`` in exactly one way; returns it as an array.

    A mask of x's rank broadcasts as NumPy says. One of lower rank is read
    NumPy's way too (aligned to the right), but only when that is the one
    placement of its axes that fits x: a (3,) mask on a (3, 3) batch could mean
    one flag per example or one per feature, so it is refused rather than
    silently read as a feature mask; (N, 1) says "per example" unambiguously.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"{fn}: `mask` must be boolean (True marks the values that count), got "
            f"dtype {mask.dtype}; pass e.g. `mask=lengths_mask.astype(bool)`."
        )
    try:
        out = jnp.broadcast_shapes(mask.shape, shape)
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"{fn}: `mask` of shape {mask.shape} does not broadcast to `x` of shape "
            f"{tuple(shape)}; give it x's rank with 1 on the axes it does not vary "
            f"over, e.g. {_example_mask_shape(shape)} for per-example masking."
        )
    readings = _mask_readings(mask.shape, tuple(shape))
    if len(readings) > 1:
        raise ValueError(
            f"{fn}: `mask` of shape {mask.shape} has fewer axes than `x` (shape {tuple(shape)}) and fits it "
            f"in {len(readings)} ways ({' or '.join(map(str, readings))}); give it x's rank to say which, "
            f"e.g. `mask.reshape({readings[-1]})` (NumPy's reading) or `mask.reshape({readings[0]})`."
        )
    return mask


def _mask_readings(mask_shape: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The distinct x-rank shapes a lower-rank mask becomes when its axes sit at each offset that fits."""
    extra = len(shape) - len(mask_shape)
    out: list[tuple[int, ...]] = []
    for offset in range(extra + 1):
        padded = (1,) * offset + tuple(mask_shape) + (1,) * (extra - offset)
        if all(m in (1, d) for m, d in zip(padded, shape, strict=True)) and padded not in out:
            out.append(padded)
    return out


def _example_mask_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:1]) + (1,) * (len(shape) - 1)


def check_param_shape(
    fn: str, name: str, param: Any, allowed: Sequence[tuple[int, ...]], x_shape: tuple[int, ...]
) -> Any:
    """Returns ``param`` (None passes); raises unless it is floating with one of the ``allowed`` shapes."""
    if param is None:
        return None
    shape = tuple(np.shape(param))
    if shape not in tuple(tuple(a) for a in allowed):
        options = " or ".join(str(tuple(a)) for a in allowed)
        raise ValueError(
            f"{fn}: `{name}` has shape {shape}, but `x` of shape {tuple(x_shape)} needs "
            f"{options}; create it as e.g. `jnp.ones({tuple(allowed[0])})`."
        )
    return check_floating(fn, param, name)



def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """Returns ``value``; raises unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{fn}: `{name}`={value!r} is not one of {', '.join(repr(c) for c in choices)}; "
            f"pass e.g. `{name}={choices[0]!r}`."
        )
    return value


def check_epsilon(fn: str, epsilon: Any) -> Any:
    """Returns ``epsilon``; raises unless it is a finite number >= 0 (a traced one must be a real scalar).

    A negative epsilon turns a constant feature's ``sqrt(var + eps)`` into NaN.
    A traced epsilon (a schedule, a ``vmap`` sweep, a gradient with respect
    to it) has no value at trace time, so only its type is checked.
    """
    if isinstance(epsilon, jax.core.Tracer):
        real = jnp.issubdtype(epsilon.dtype, jnp.floating) or jnp.issubdtype(epsilon.dtype, jnp.integer)
        if epsilon.ndim != 0 or not real:
            raise ValueError(
                f"{fn}: `epsilon` must be a real scalar, got a traced {epsilon.aval}; "
                "pass one value (vmap over a sweep of them)."
            )
        return epsilon
    try:
        value = np.asarray(epsilon, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if isinstance(epsilon, (bool, np.bool_)) or (value is not None and value.dtype == bool):
        value = None
    if value is None or value.ndim != 0 or not np.isfinite(value) or value < 0:
        raise ValueError(
            f"{fn}: `epsilon` must be a finite number >= 0, got {epsilon!r}; pass e.g. `epsilon=1e-5`."
        )
    return epsilon


def check_at_least(fn: str, name: str, value: Any, minimum: float, fix: str) -> Any:
    """Returns ``value``; raises for a static number below ``minimum`` (traced values pass unchecked)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if not np.all(np.asarray(value) >= minimum):
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value!r}; {fix}.")
    return value


def check_limit(fn: str, name: str, value: Any, minimum: float, fix: str) -> Any:
    """Returns the scalar ``value``; raises unless it is a real number >= ``minimum`` (inf allowed, NaN not).

    Traced values (a schedule inside a compiled step) pass, once their shape is
    checked: their value is unknown at trace time.
    """
    if isinstance(value, jax.core.Tracer):
        if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.number):
            raise ValueError(f"{fn}: `{name}` must be a real scalar, got a traced {value.aval}; {fix}.")
        return value
    try:
        number = np.asarray(value)
        ok = number.ndim == 0 and number.dtype.kind in "iuf" and not isinstance(value, (bool, np.bool_))
        ok = ok and bool(number >= minimum)  # False for NaN
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `{name}` must be >= {minimum}, got {value!r} (a real scalar, not a bool; inf is allowed); {fix}."
        )
    return value


def check_floating_dtype(fn: str, dtype: Any, *, requirement: str, fix: str) -> Any:
    """Returns ``dtype``; raises unless it names a real floating dtype (integer, bool, complex, unknown: refused)."""
    try:
        shown = jnp.dtype(dtype)
        ok = jnp.issubdtype(shown, jnp.floating)
    except TypeError:
        shown, ok = repr(dtype), False
    if not ok:
        raise ValueError(f"{fn}: `dtype`={shown} must be {requirement}; {fix}.")
    return dtype


def check_out_dtype(fn: str, dtype: Any) -> Any:
    """``dtype`` of a norm's output: None (x's dtype) or a real floating dtype."""
    if dtype is None:
        return None
    return check_floating_dtype(
        fn, dtype, requirement="a floating dtype (normalized values are real, not integers)",
        fix="pass e.g. `dtype=jnp.float32` or None for x's dtype",
    )


def check_after(fn: str, name: str, value: Any, earlier_name: str, earlier: Any) -> Any:
    """Returns the static step ``value``; raises unless it comes after ``earlier``."""
    if not value > earlier:
        raise ValueError(
            f"{fn}: `{name}`={value!r} must come after `{earlier_name}`={earlier!r}; it is "
            f"the step at which the final limit is reached, e.g. `{name}={earlier + 1000}`."
        )
    return value




def check_axis_index_groups(fn: str, groups: Any, axis_name: Any) -> tuple[tuple[int, ...], ...] | None:
    """Groups must split the indices of ``axis_name`` into disjoint, non-empty lists; None passes.

    Call it where ``axis_name`` is bound (inside shard_map, pmap or vmap): the
    size of the axis is read from there.
    """
    if groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            f"{fn}: `axis_index_groups`={groups!r} was given without `axis_name`; the groups "
            f"are groups of indices along a named axis, so pass `axis_name=` as well (or drop "
            f"`axis_index_groups`)."
        )
    size = jax.lax.axis_size(axis_name)
    try:
        out = tuple(tuple(int(i) for i in g) for g in groups)
    except TypeError:
        out = None
    flat = sorted(i for g in (out or ()) for i in g)
    if out is None or any(len(g) == 0 for g in out) or flat != list(range(size)):
        raise ValueError(
            f"{fn}: `axis_index_groups`={groups!r} must split the {size} indices of "
            f"`axis_name`={axis_name!r} into disjoint non-empty groups that together hold "
            f"each of 0..{size - 1} once; e.g. [[0, 1], [2, 3]] for 4 devices in pairs."
        )
    return out


def check_collection(fn: str, variables: Any, name: str) -> Any:
    """Returns ``variables``; raises unless they hold the collection ``name`` (flax linen's layout)."""
    if name not in variables:
        raise ValueError(
            f"{fn}: `variables` has no {name!r} collection (it has {sorted(variables)}); "
            f"pass the variables `model.init` returned."
        )
    return variables
