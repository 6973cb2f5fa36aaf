"""Argument checks shared by every public function, and their messages.

Every check runs at trace time on static shapes and raises a ``ValueError``
whose message names the function, the argument (in backticks), the rule, the
values received and a fix, e.g.::

    group_norm: `num_groups`=3 must divide the 32 channels of `x` (shape
    (2, 4, 4, 32)); pass a divisor of 32 or `group_size=`.

Keeping them here means one wording per rule, whichever function trips it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(fn: str, x: Any, name: str = "x") -> None:
    """Raises unless ``x`` has a real floating dtype (float16/bfloat16/float32/float64)."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{fn}: `{name}` must have a real floating dtype, got {dtype} (shape "
            f"{np.shape(x)}); cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


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


def canonical_axes(fn: str, name: str, axes: int | Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Turns an int or a sequence of ints into sorted non-negative axes of ``shape``.

    Raises for axes out of range, repeated axes (also after wrapping negatives)
    and non-integers.
    """
    ndim = len(shape)
    raw = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    for a in raw:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise ValueError(
                f"{fn}: `{name}` must be an int or a tuple of ints, got {axes!r}; "
                f"e.g. `{name}=-1`."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `{name}`={axes!r} is out of range for `x` of shape {shape} "
                f"({ndim} axes); use axes in [{-ndim}, {ndim - 1}]."
            )
    wrapped = tuple(int(a) % ndim for a in raw)
    if len(set(wrapped)) != len(wrapped):
        raise ValueError(
            f"{fn}: `{name}`={axes!r} names an axis more than once for `x` of shape "
            f"{shape} (as non-negative axes: {wrapped}); list each axis once."
        )
    return tuple(sorted(wrapped))


def check_mask(fn: str, mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """Checks that ``mask`` is boolean and broadcasts to ``shape``; returns it as an array."""
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
    return mask


def _example_mask_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:1]) + (1,) * (len(shape) - 1)


def check_param_shape(fn: str, name: str, param: Any, allowed: Sequence[tuple[int, ...]], x_shape: tuple[int, ...]) -> None:
    """Raises unless ``param`` is None or has one of the ``allowed`` shapes."""
    if param is None:
        return
    shape = tuple(np.shape(param))
    if shape not in tuple(tuple(a) for a in allowed):
        options = " or ".join(str(tuple(a)) for a in allowed)
        raise ValueError(
            f"{fn}: `{name}` has shape {shape}, but `x` of shape {tuple(x_shape)} needs "
            f"{options}; create it as e.g. `jnp.ones({tuple(allowed[0])})`."
        )
    check_floating(fn, param, name)


def check_stats_shape(fn: str, stats: Any, feature_shape: tuple[int, ...], x_shape: tuple[int, ...], axis: Any) -> None:
    """Raises unless running mean and var have the feature shape kept by ``axis``."""
    for field in ("mean", "var"):
        got = tuple(np.shape(getattr(stats, field)))
        if got != tuple(feature_shape):
            raise ValueError(
                f"{fn}: `stats.{field}` has shape {got}, but `x` of shape {tuple(x_shape)} "
                f"with `axis`={axis!r} keeps features of shape {tuple(feature_shape)}; "
                f"create the state with `jn.init_batch_stats({tuple(feature_shape)})` "
                f"or pass the `axis` the state was made for."
            )


def check_enough_values(fn: str, per_feature: int, x_shape: tuple[int, ...], axis: Any) -> None:
    """Training batch norm with one value per feature would return only the bias."""
    if per_feature < 2:
        raise ValueError(
            f"{fn}: training needs more than one value per feature to estimate a "
            f"variance, but `x` of shape {tuple(x_shape)} with `axis`={axis!r} has "
            f"{per_feature}; use a batch of at least 2, evaluate with "
            f"`training=False`, or use layer_norm/group_norm for batch size 1."
        )


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """Raises unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{fn}: `{name}`={value!r} is not one of {', '.join(repr(c) for c in choices)}; "
            f"pass e.g. `{name}={choices[0]!r}`."
        )
    return value


def check_epsilon(fn: str, epsilon: Any) -> None:
    """Raises unless ``epsilon`` is a finite number >= 0 (traced values pass unchecked).

    A negative epsilon turns a constant feature's ``sqrt(var + eps)`` into NaN.
    """
    if isinstance(epsilon, jax.core.Tracer):
        return
    try:
        value = np.asarray(epsilon, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if value is None or value.ndim != 0 or not np.isfinite(value) or value < 0:
        raise ValueError(
            f"{fn}: `epsilon` must be a finite number >= 0, got {epsilon!r}; pass e.g. `epsilon=1e-5`."
        )


def merge_call_option(fn: str, name: str, field: Any, call: Any, *, example: str, call_example: str) -> Any:
    """Returns the one of ``field`` (constructor) and ``call`` (call time) that is set.

    Flax's ``merge_param`` rule: an option given in both places, or in neither,
    is an error; the message shows both ways of passing it.
    """
    if field is not None and call is not None:
        raise ValueError(
            f"{fn}: `{name}` was passed both to the constructor ({field!r}) and at call "
            f"time ({call!r}); pass it once, either as `{example}` or as `{call_example}`."
        )
    if field is None and call is None:
        raise ValueError(
            f"{fn}: `{name}` was passed neither to the constructor nor at call time; "
            f"pass it once, either as `{example}` or as `{call_example}`."
        )
    return field if field is not None else call


def check_at_least(fn: str, name: str, value: Any, minimum: float, fix: str) -> None:
    """Raises for a static number below ``minimum`` (traced values pass unchecked)."""
    if isinstance(value, jax.core.Tracer):
        return
    if not np.all(np.asarray(value) >= minimum):
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value!r}; {fix}.")


def check_ghost_batch_size(
    fn: str,
    ghost_batch_size: Any,
    x_shape: tuple[int, ...] | None = None,
    feature_axes: tuple[int, ...] = (),
    per_example: int = 1,
    axis_name: Any = None,
) -> int | None:
    """Checks ``ghost_batch_size`` (always its type; with ``x_shape``, also against ``x``).

    Ghost batches split axis 0 into consecutive groups of ``ghost_batch_size``
    examples, so axis 0 must be a reduced (batch) axis, the size must divide it,
    and each group must hold two or more values per feature.
    """
    k = ghost_batch_size
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"{fn}: `ghost_batch_size` must be a positive Python int or None, got {k!r}; "
            f"pass e.g. `ghost_batch_size=16`."
        )
    k = int(k)
    if x_shape is None:
        return k
    if axis_name is not None:
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} cannot be combined with `axis_name`={axis_name!r}: "
            f"ghost batches are local to one device by definition; drop `axis_name` (each "
            f"device then normalizes its own ghost batches) or drop `ghost_batch_size`."
        )
    if 0 in feature_axes:
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} splits axis 0 of `x` (shape {tuple(x_shape)}) "
            f"into ghost batches, but axis 0 is a feature axis here; put the batch first "
            f"or leave `ghost_batch_size=None`."
        )
    n = x_shape[0]
    if n % k:
        divisors = ", ".join(str(d) for d in range(2, n + 1) if n % d == 0)
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} must divide the batch of {n} examples (axis 0 "
            f"of `x`, shape {tuple(x_shape)}); pass a divisor of {n} ({divisors}) or pad "
            f"the batch to a multiple of {k}."
        )
    if k * per_example < 2:
        raise ValueError(
            f"{fn}: ghost batches of `ghost_batch_size`={k} example(s) of `x` (shape "
            f"{tuple(x_shape)}) give {k * per_example} value per feature, too few to "
            f"estimate a variance; use `ghost_batch_size` >= 2."
        )
    return k


def check_after(fn: str, name: str, value: Any, earlier_name: str, earlier: Any) -> None:
    """Raises unless the static step ``value`` comes after ``earlier``."""
    if not value > earlier:
        raise ValueError(
            f"{fn}: `{name}`={value!r} must come after `{earlier_name}`={earlier!r}; it is "
            f"the step at which the final limit is reached, e.g. `{name}={earlier + 1000}`."
        )


def check_not_jitted(fn: str, name: str, f: Any) -> None:
    """A function read at trace time under a switch must not be one that jax.jit already caches."""
    if hasattr(f, "lower") and hasattr(f, "trace"):
        raise ValueError(
            f"{fn}: `{name}` is already wrapped in jax.jit; pass the plain Python function "
            f"(recalibrate compiles it itself, with the recalibration switch on; a function "
            f"jitted elsewhere may reuse a trace made without it)."
        )


def check_recalibration(fn: str, *, layers: int | None = None, batches: int | None = None, folded: int | None = None, hint: str = "") -> None:
    """PreciseBN needs batch-norm statistics, batches, and at least one layer that folded one."""
    if layers == 0:
        raise ValueError(
            f"{fn}: found no jaxnorm batch-norm statistics (jn.BatchStats or "
            f"{{'mean', 'var', 'count'}} dicts) to recalibrate; the model needs at "
            f"least one jaxnorm BatchNorm or BatchRenorm layer."
        )
    if batches == 0:
        raise ValueError(f"{fn}: `batches` is empty; pass an iterable of model inputs (e.g. 100 training batches).")
    if folded == 0:
        raise ValueError(
            f"{fn}: no jaxnorm batch-norm layer folded a batch, so no statistics were "
            f"recalibrated; {hint}, and check that the batches hold finite values."
        )


def check_collection(fn: str, variables: Any, name: str) -> None:
    """Raises unless the flax variables hold collection ``name``."""
    if name not in variables:
        raise ValueError(
            f"{fn}: `variables` has no {name!r} collection (it has {sorted(variables)}); "
            f"pass the variables `model.init` returned."
        )


def check_fold_stats(fn: str, stats: Any) -> None:
    """Raises unless ``stats`` has ``mean`` and ``var`` (a BatchStats or a mapping)."""
    if isinstance(stats, Mapping):
        if "mean" in stats and "var" in stats:
            return
    elif hasattr(stats, "mean") and hasattr(stats, "var"):
        return
    raise ValueError(
        f"{fn}: `stats` must be a jn.BatchStats or a mapping with 'mean' and 'var', got "
        f"{type(stats).__name__}; pass the batch norm's running statistics, e.g. "
        f"`variables['batch_stats']['BatchNorm_0']`."
    )


def check_fold_feature_axis(fn: str, feature_axis: Any, kernel_shape: tuple[int, ...]) -> int:
    """Returns ``feature_axis`` as a non-negative axis of the kernel; raises when it is not one."""
    ndim = len(kernel_shape)
    if ndim == 0:
        raise ValueError(
            f"{fn}: `kernel` must have at least one axis (the output features), got a "
            f"scalar; pass the layer's kernel, e.g. (in, out) for Dense or (H, W, in, out) for Conv."
        )
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, (int, np.integer)) or not -ndim <= feature_axis < ndim:
        raise ValueError(
            f"{fn}: `feature_axis`={feature_axis!r} is not an axis of `kernel` (shape "
            f"{tuple(kernel_shape)}); pass an int in [{-ndim}, {ndim - 1}]: -1 for flax's "
            f"Dense (in, out) and Conv (H, W, in, out), 0 for PyTorch's (out, in, ...)."
        )
    return int(feature_axis) % ndim


def check_fold_vector(fn: str, name: str, value: Any, features: int, kernel_shape: tuple[int, ...], feature_axis: Any) -> None:
    """Raises unless ``value`` is None or a floating vector of the layer's ``features`` outputs."""
    if value is None:
        return
    shape = tuple(np.shape(value))
    if shape != (features,):
        raise ValueError(
            f"{fn}: `{name}` has shape {shape}, but `kernel` (shape {tuple(kernel_shape)}) has "
            f"{features} output features along `feature_axis`={feature_axis!r}; pass a "
            f"({features},) array, or the `feature_axis` of the kernel's output features."
        )
    check_floating(fn, value, name)


def check_fold_pair(fn: str, item: tuple[Any, ...]) -> None:
    """One entry of ``pairs``: (layer_path, bn_path) or (layer_path, bn_path, epsilon)."""
    if len(item) not in (2, 3):
        raise ValueError(
            f"{fn}: each entry of `pairs` must be (layer_path, bn_path) or (layer_path, "
            f"bn_path, epsilon), got {item!r}; e.g. `[('Conv_0', 'BatchNorm_0')]` or "
            f"`{{'Conv_0': 'BatchNorm_0'}}`."
        )


def check_fold_pairs_unique(fn: str, pairs: Sequence[tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    """A layer takes one batch norm and a batch norm follows one layer."""
    for idx, role in ((0, "layer"), (1, "batch norm")):
        seen = [p[idx] for p in pairs]
        twice = sorted({"/".join(p) for p in seen if seen.count(p) > 1})
        if twice:
            raise ValueError(
                f"{fn}: `pairs` names the {role} {', '.join(twice)} more than once; each "
                f"Dense/Conv folds the one batch norm its output goes into."
            )


def check_fold_paths(fn: str, layer_path: tuple[str, ...], layer: Any, bn_path: tuple[str, ...], bn_stats: Any) -> None:
    """The layer must hold a ``kernel`` in ``params`` and the batch norm ``mean``/``var`` in ``batch_stats``."""
    if layer is None or "kernel" not in layer:
        raise ValueError(
            f"{fn}: `pairs` names the layer {'/'.join(layer_path)!r}, but `variables['params']` "
            f"has no Dense/Conv `kernel` there; give the path of the layer's module, e.g. "
            f"'Block_0/Conv_0' (see `jaxnorm.linen.batch_norm_pairs`)."
        )
    if bn_stats is None or "mean" not in bn_stats or "var" not in bn_stats:
        raise ValueError(
            f"{fn}: `pairs` names the batch norm {'/'.join(bn_path)!r}, but "
            f"`variables['batch_stats']` has no 'mean' and 'var' there; give the path of "
            f"the BatchNorm module, e.g. 'Block_0/BatchNorm_0'."
        )


def check_batch_norm_follows_layer(fn: str, bn_path: str, reason: str) -> None:
    """A batch norm that cannot be folded into the layer before it."""
    raise ValueError(
        f"{fn}: cannot fold the batch norm {bn_path!r}: {reason}. Folding supports a "
        f"Dense/Conv whose output goes straight into a BatchNorm over the last axis; keep "
        f"this batch norm in the folded model, or pass `strict=False` to fold only the "
        f"supported pairs."
    )


def check_torch_layer_found(fn: str, prefix: str, wanted: Sequence[str], n_keys: int, layers: Sequence[str]) -> None:
    """No entry of the layer under ``prefix`` in a PyTorch state dict."""
    hint = f" (layers that have them: {', '.join(repr(x) for x in layers[:6])})" if layers else ""
    example = layers[0] if layers else "bn1"
    raise ValueError(
        f"{fn}: `state_dict` ({n_keys} keys) has none of {', '.join(wanted)} under "
        f"`prefix`={prefix!r}{hint}; pass the layer's name as `prefix=`, e.g. `prefix={example!r}`."
    )


def check_no_running_stats(fn: str, prefix: str) -> None:
    """A per-example norm (PyTorch InstanceNorm with track_running_stats=True) with running statistics."""
    raise ValueError(
        f"{fn}: the layer under `prefix`={prefix!r} keeps running statistics "
        f"(track_running_stats=True), which a per-example norm does not use; in eval mode "
        f"such a layer is batch norm over its channels: convert it with "
        f"`batch_norm_from_torch` and use `jn.batch_norm(..., axis=1)`."
    )


def check_torch_momentum(fn: str, momentum: Any) -> None:
    """A batch-norm momentum in [0, 1]; None (PyTorch's cumulative average) has no counterpart."""
    if momentum is None:
        raise ValueError(
            f"{fn}: `momentum`=None is PyTorch's cumulative average, which has no "
            f"momentum; pass `average='cumulative'` to jn.batch_norm instead."
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{fn}: `momentum`={momentum!r} must be a number in [0, 1], e.g. `momentum=0.1`.")


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
