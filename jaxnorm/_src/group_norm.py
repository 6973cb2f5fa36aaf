"""Group norm (Wu & He 2018) and instance norm (Ulyanov et al. 2016).

Axis 0 is the batch axis. The channel axis is split into ``num_groups`` groups
of ``group_size`` consecutive channels; each example is standardized per group
over the group's channels and the reduced axes (by default every axis but the
batch axis). ``num_groups=1`` is layer norm over (..., C); ``group_size=1`` is
instance norm. The split is a reshape, so the statistics come from the same
:func:`jaxnorm._src.standardize.standardize` as every other norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_epsilon, check_floating, check_mask, check_out_dtype
from jaxnorm._src.per_example import place
from jaxnorm._src.standardize import standardize

Array = jax.Array


def check_groups(fn: str, channels: int, num_groups: Any, group_size: Any, x_shape: Any = None) -> tuple[int, int]:
    """``(G, C // G)``; raises unless exactly one of num_groups/group_size divides C."""
    shape = f"(..., {channels})" if x_shape is None else str(tuple(x_shape))
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{fn}: pass exactly one of `num_groups` and `group_size`, got "
            f"num_groups={num_groups!r}, group_size={group_size!r}; e.g. `num_groups=32` "
            f"or `group_size=16` for the {channels} channels of `x` (shape {shape})."
        )
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(
            f"{fn}: `{name}` must be a positive int (NumPy integers are fine), got {value!r} of type "
            f"{type(value).__name__}; pass e.g. `{name}={_some_divisor(channels)}` for the {channels} "
            f"channels of `x` (shape {shape})."
        )
    if channels % value:
        other = "`group_size=`" if name == "num_groups" else "`num_groups=`"
        raise ValueError(
            f"{fn}: `{name}`={value!r} must divide the {channels} channels of `x` (shape "
            f"{shape}); pass a divisor of {channels} or {other}."
        )
    value = int(value)  # NumPy integers are integers
    groups = value if name == "num_groups" else channels // value
    return groups, channels // groups


def _some_divisor(channels: int) -> int:
    return next((d for d in (32, 16, 8, 4, 2) if channels % d == 0), 1)


def _group_norm(
    fn: str,
    x: Any,
    scale: Any,
    bias: Any,
    *,
    num_groups: Any,
    group_size: Any,
    channel_axis: Any,
    reduction_axes: Any,
    epsilon: float,
    mask: Any,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    x = jnp.asarray(check_floating(fn, x))
    check_epsilon(fn, epsilon)
    check_out_dtype(fn, dtype)
    if x.ndim < 2:
        raise ValueError(
            f"{fn}: `x` must have a batch axis and a channel axis, got shape {x.shape}; "
            f"add a batch axis, e.g. `x[None]`."
        )
    channel_axes = canonical_axes(fn, "channel_axis", channel_axis, x.shape)
    if 0 in channel_axes:
        raise ValueError(
            f"{fn}: `channel_axis`={channel_axis!r} {'is' if len(channel_axes) == 1 else 'includes'} "
            f"the batch axis 0 of `x` (shape "
            f"{x.shape}); the channel axis must be another one, e.g. -1 (NHWC) or 1 (NCHW)."
        )
    if reduction_axes is None:
        axes = tuple(range(1, x.ndim))
    else:
        axes = canonical_axes(fn, "reduction_axes", reduction_axes, x.shape)
        if not set(channel_axes) <= set(axes):
            raise ValueError(
                f"{fn}: `reduction_axes`={reduction_axes!r} must include the channel axis "
                f"{channel_axes[0]} of `x` (shape {x.shape}), since groups span channels; add it, "
                f"e.g. `reduction_axes={tuple(sorted(set(axes) | set(channel_axes)))}`."
            )
    # (C,) on the channel axis, or per example (x's rank, e.g. (N, 1, 1, C)): see per_example
    scale, bias = (place(fn, n, p, x.shape, channel_axes) for n, p in (("scale", scale), ("bias", bias)))
    mask = check_mask(fn, mask, x.shape)
    if len(channel_axes) == 1:
        (channel,) = channel_axes
        groups, size = check_groups(fn, x.shape[channel], num_groups, group_size, x.shape)
        # (..., C, ...) -> (..., G, C // G, ...): reduce the within-group axis too.
        split = x.shape[:channel] + (groups, size) + x.shape[channel + 1:]
        grouped_axes = tuple(a if a < channel else a + 1 for a in axes if a != channel) + (channel + 1,)
    else:
        if num_groups is not None or group_size != 1:
            raise ValueError(
                f"{fn}: `channel_axis`={channel_axis!r} must be a single axis to split into "
                f"groups (x has shape {x.shape}); pass one axis, e.g. `channel_axis=-1`."
            )
        # Several channel axes (flax InstanceNorm's tuple `feature_axes`): one
        # group per channel, so no split; each is standardized over the rest.
        split = x.shape
        grouped_axes = tuple(a for a in axes if a not in channel_axes)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape).reshape(split)
    def as_param(p: Array | None) -> Array | None:
        """A placed parameter (x's rank) on the split layout: C at the channel axis becomes (G, C // G)."""
        if p is None or len(channel_axes) > 1:
            return p
        c = channel_axes[0]
        return jnp.reshape(p, p.shape[:c] + (split[c:c + 2] if p.shape[c] > 1 else (1, 1)) + p.shape[c + 1:])
    y, _ = standardize(
        x.reshape(split), tuple(sorted(grouped_axes)), epsilon=epsilon, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        scale=as_param(scale), bias=as_param(bias), dtype=x.dtype if dtype is None else dtype,
    )
    return y.reshape(x.shape)


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = None,
    group_size: int | None = None,
    channel_axis: int = -1,
    reduction_axes: int | tuple[int, ...] | None = None,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Group normalization (Wu & He 2018).

    Shapes: x is (N, ..., C) (``channel_axis=-1``) or (N, C, ...)
    (``channel_axis=1``). Per example and group of C/G channels, standardize over
    the group's channels and ``reduction_axes``; then ``* scale + bias`` per channel.

    Args:
      x: floating array with batch axis 0.
      scale, bias: optional (C,), or per example: x's rank with each size 1 or
        x's, e.g. (N, 1, 1, C) on NHWC, (N, C, 1, 1) on NCHW.
      num_groups: G, must divide C. Exactly one of num_groups and group_size.
      group_size: C/G, must divide C.
      channel_axis: the channel axis.
      reduction_axes: axes reduced within a group (must include the channel
        axis); default all but axis 0. ``(-1,)`` on (B, T, C) normalizes each
        time step on its own, as flax's field does.
      epsilon: added to the variance.
      mask: bool, broadcasts to x; True marks values that count.
        A mask of lower rank than x must fit it one way only (else give it x's rank).
        A statistic without any valid value (an all-False mask along the reduced
        axes, e.g. a padded example) has mean 0 and variance 0: its positions get
        ``x / sqrt(epsilon)`` times scale plus bias (flax gives NaN); keep them out of the loss.
      axis_name, axis_index_groups: also reduce over devices along this named
        axis, as flax's fields.
      dtype: output dtype; default x's dtype.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: neither or both of num_groups/group_size, a non-divisor,
        reduction_axes without the channel axis, bad shapes, mask or dtype.

    Example:
      >>> import jax, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
      >>> jn.group_norm(x, num_groups=8).shape
      (2, 4, 4, 32)
    """
    return _group_norm(
        "group_norm", x, scale, bias, num_groups=num_groups, group_size=group_size,
        channel_axis=channel_axis, reduction_axes=reduction_axes, epsilon=epsilon, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
    )


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    channel_axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Instance normalization (Ulyanov et al. 2016): group norm with one channel per group.

    Each example and channel is standardized over the spatial axes.

    Args:
      x: (N, ..., C) or (N, C, ...) with ``channel_axis=1``; floating.
      scale, bias: optional (C,), or ``x.shape[channel_axis]`` for several axes,
        or per example: x's rank with each size 1 or x's, e.g. (N, 1, 1, C) (AdaIN-style).
      channel_axis: the channel axis, or a tuple of axes that are all kept
        (flax InstanceNorm's ``feature_axes``); every other non-batch axis is reduced.
      epsilon: added to the variance.
      mask: bool, broadcasts to x; True marks values that count.
        A mask of lower rank than x must fit it one way only (else give it x's rank).
        A statistic without any valid value (an all-False mask along the reduced
        axes, e.g. a padded example) has mean 0 and variance 0: its positions get
        ``x / sqrt(epsilon)`` times scale plus bias (flax gives NaN); keep them out of the loss.
      axis_name, axis_index_groups: also reduce over devices along this named
        axis, as flax's fields.
      dtype: output dtype; default x's dtype.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: bad shapes, mask or dtype.

    Example:
      >>> import jax, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> jn.instance_norm(x).shape
      (2, 8, 8, 3)
    """
    return _group_norm(
        "instance_norm", x, scale, bias, num_groups=None, group_size=1,
        channel_axis=channel_axis, reduction_axes=None, epsilon=epsilon, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
    )
