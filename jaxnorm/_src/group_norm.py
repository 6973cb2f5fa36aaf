"""Group norm (Wu & He 2018) and instance norm (Ulyanov et al. 2016).

Axis 0 is the batch axis. The channel axis is split into ``num_groups`` groups
of ``group_size`` consecutive channels; each example is standardized per group
over the group's channels and the reduced axes (by default every axis but the
batch axis). ``num_groups=1`` is layer norm over (..., C); ``group_size=1`` is
instance norm. The split is a reshape, so the statistics come from the same
:func:`jaxnorm._src.normalize.standardize` as every other norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src import errors
from jaxnorm._src.normalize import affine, standardize

Array = jax.Array


def _groups(fn: str, x_shape: tuple[int, ...], channel: int, num_groups: Any, group_size: Any) -> int:
    channels = x_shape[channel]
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{fn}: pass exactly one of `num_groups` and `group_size`, got "
            f"num_groups={num_groups!r}, group_size={group_size!r}; e.g. `num_groups=32` "
            f"or `group_size=16` for the {channels} channels of `x` (shape {x_shape})."
        )
    name, value = ("num_groups", num_groups) if num_groups is not None else ("group_size", group_size)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or channels % value:
        other = "`group_size=`" if name == "num_groups" else "`num_groups=`"
        raise ValueError(
            f"{fn}: `{name}`={value!r} must divide the {channels} channels of `x` (shape "
            f"{x_shape}); pass a divisor of {channels} or {other}."
        )
    return num_groups if num_groups is not None else channels // group_size


def _group_norm(
    fn: str,
    x: Any,
    scale: Any,
    bias: Any,
    *,
    num_groups: Any,
    group_size: Any,
    channel_axis: int,
    reduction_axes: Any,
    epsilon: float,
    mask: Any,
) -> Array:
    errors.check_floating(fn, x)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{fn}: `x` must have a batch axis and a channel axis, got shape {x.shape}; "
            f"add a batch axis, e.g. `x[None]`."
        )
    (channel,) = errors.canonical_axes(fn, "channel_axis", channel_axis, x.shape)
    if channel == 0:
        raise ValueError(
            f"{fn}: `channel_axis`={channel_axis!r} is the batch axis 0 of `x` (shape "
            f"{x.shape}); the channel axis must be another one, e.g. -1 (NHWC) or 1 (NCHW)."
        )
    if reduction_axes is None:
        axes = tuple(range(1, x.ndim))
    else:
        axes = errors.canonical_axes(fn, "reduction_axes", reduction_axes, x.shape)
        if channel not in axes:
            raise ValueError(
                f"{fn}: `reduction_axes`={reduction_axes!r} must include the channel axis "
                f"{channel} of `x` (shape {x.shape}), since groups span channels; add it, "
                f"e.g. `reduction_axes={tuple(sorted(set(axes) | {channel}))}`."
            )
    groups = _groups(fn, x.shape, channel, num_groups, group_size)
    channels = x.shape[channel]
    for name, value in (("scale", scale), ("bias", bias)):
        errors.check_param_shape(fn, name, value, [(channels,)], x.shape)
    mask = errors.check_mask(fn, mask, x.shape)

    # (..., C, ...) -> (..., G, C // G, ...): reduce the within-group axis too.
    split = x.shape[:channel] + (groups, channels // groups) + x.shape[channel + 1:]
    grouped_axes = tuple(a if a < channel else a + 1 for a in axes if a != channel) + (channel + 1,)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape).reshape(split)
    x_hat, _ = standardize(x.reshape(split), tuple(sorted(grouped_axes)), epsilon=epsilon, mask=mask)
    param_shape = tuple(channels if a == channel else 1 for a in range(x.ndim))
    as_param = lambda p: None if p is None else jnp.reshape(p, param_shape)  # noqa: E731
    return affine(x_hat.reshape(x.shape), as_param(scale), as_param(bias), x.dtype)


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
) -> Array:
    """Group normalization (Wu & He 2018).

    Shapes: x is (N, ..., C) (``channel_axis=-1``) or (N, C, ...)
    (``channel_axis=1``). Per example and group of C/G channels, standardize over
    the group's channels and ``reduction_axes``; then ``* scale + bias`` per channel.

    Args:
      x: floating array with batch axis 0.
      scale, bias: optional (C,).
      num_groups: G, must divide C. Exactly one of num_groups and group_size.
      group_size: C/G, must divide C.
      channel_axis: the channel axis.
      reduction_axes: axes reduced within a group (must include the channel
        axis); default all but axis 0. ``(-1,)`` on (B, T, C) normalizes each
        time step on its own, as flax's field does.
      epsilon: added to the variance.
      mask: bool, broadcasts to x; True marks values that count.

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
    )


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    channel_axis: int = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
) -> Array:
    """Instance normalization (Ulyanov et al. 2016): group norm with one channel per group.

    Each example and channel is standardized over the spatial axes.

    Args:
      x: (N, ..., C) or (N, C, ...) with ``channel_axis=1``; floating.
      scale, bias: optional (C,).
      channel_axis: the channel axis.
      epsilon: added to the variance.
      mask: bool, broadcasts to x; True marks values that count.

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
    )
