"""Adaptive instance normalization (Huang & Belongie 2017, "Arbitrary Style Transfer
in Real-time with Adaptive Instance Normalization").

AdaIN standardizes each example and channel of the content ``x`` over its
spatial axes and gives it the style's per-channel mean and standard deviation:

    AdaIN(x, s) = sigma(s) * (x - mu(x)) / sigma(x) + mu(s),
    sigma(v) = sqrt(var(v) + eps)

with biased variances over the spatial axes and ``eps`` inside each square root
(the paper's eq. 8; the reference Torch code adds eps to both variances). It is
instance norm with a per-example scale and bias, so it is exactly that: the
style's statistics come from :func:`jaxnorm._src.stats.compute_moments` and the
content goes through the same fused :func:`jaxnorm._src.normalize.standardize`
as :func:`jaxnorm.instance_norm`, with its analytic backward and its masks.
Gradients reach both the content and the style (the style's moments are plain
``jax.numpy``). Forward mode (``jax.jvp``) goes through the fused op, which
JAX refuses until that op gains a forward rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_epsilon, check_floating, check_mask
from jaxnorm._src.moments import accumulation_dtype, compute_moments
from jaxnorm._src.standardize import standardize

Array = jax.Array


def _channel_axis(fn: str, channel_axis: Any, shape: tuple[int, ...], name: str) -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise ValueError(
            f"{fn}: `channel_axis` must be a single int, got {channel_axis!r}; pass e.g. "
            f"`channel_axis=-1` (NHWC) or `channel_axis=1` (NCHW)."
        )
    (axis,) = canonical_axes(fn, "channel_axis", channel_axis, shape)
    if axis == 0:
        raise ValueError(
            f"{fn}: `channel_axis`={channel_axis!r} is the batch axis 0 of `{name}` (shape "
            f"{tuple(shape)}); the channel axis must be another one, e.g. -1 (NHWC) or 1 (NCHW)."
        )
    return axis


def adaptive_instance_norm(
    x: Array,
    style: Array,
    *,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Array | None = None,
) -> Array:
    """Adaptive instance norm: the content ``x`` with the channel statistics of ``style``.

    Shapes: N batch, C channels, ``...`` spatial axes. ``x`` is (N, ..., C)
    (``channel_axis=-1``) or (N, C, ...) (``channel_axis=1``); ``style`` has
    the same rank, layout and C, any spatial size (the style image may be
    larger or smaller than the content), and N examples or 1 (one style for
    the whole batch). Per example and channel, with biased variances over the
    spatial axes::

        y = sqrt(var(style) + eps) * (x - mean(x)) / sqrt(var(x) + eps) + mean(style)

    Args:
      x: content, (N, ..., C) floating, at least one spatial axis.
      style: (N or 1, ..., C) floating, at least one spatial axis.
      channel_axis: the channel axis (of both).
      epsilon: added to both variances inside the square roots; a static
        number (a static option of the fused op).
      mask: bool, broadcasts to ``x``; True marks content values that count in
        the content's statistics (masked values, NaN included, reach neither
        the statistics nor their gradients). A lower-rank mask must fit x one
        way only. A statistic without any valid value has mean 0 and variance
        0: its positions get ``x / sqrt(epsilon)`` times the style's std plus its mean.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: non-floating inputs, no spatial axis, a channel axis that is
        the batch axis or out of range, style and content that differ in
        rank, batch or channels, a bad mask or epsilon.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> content = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> style = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
      >>> y = jn.adaptive_instance_norm(content, style)
      >>> y.shape
      (2, 8, 8, 3)
      >>> m, s = style.mean((1, 2)), style.std((1, 2))
      >>> bool(jnp.allclose(y.mean((1, 2)), m, atol=1e-4)), bool(jnp.allclose(y.std((1, 2)), s, atol=1e-3))
      (True, True)
    """
    fn = "adaptive_instance_norm"
    check_floating(fn, x)
    check_floating(fn, style, "style")
    check_epsilon(fn, epsilon)
    x, style = jnp.asarray(x), jnp.asarray(style)
    if x.ndim < 3:
        raise ValueError(
            f"{fn}: `x` must have a batch axis, a channel axis and at least one spatial "
            f"axis, got shape {x.shape}; e.g. (N, H, W, C), or add a spatial axis with `x[:, None]`."
        )
    if style.ndim != x.ndim:
        raise ValueError(
            f"{fn}: `style` of shape {style.shape} must have the rank of `x` (shape {x.shape}), "
            f"the same layout with any spatial size; e.g. (N, H', W', C) for NHWC content."
        )
    axis = _channel_axis(fn, channel_axis, x.shape, "x")
    if style.shape[axis] != x.shape[axis] or style.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{fn}: `style` of shape {style.shape} must have the {x.shape[axis]} channels "
            f"(axis {axis}) of `x` (shape {x.shape}) and its batch of {x.shape[0]} or 1 "
            f"(one style for all); spatial sizes may differ."
        )
    mask = check_mask(fn, mask, x.shape)
    spatial = tuple(a for a in range(1, x.ndim) if a != axis)
    s = compute_moments(style, spatial)
    acc = accumulation_dtype(x.dtype)
    style_std = jnp.sqrt(s.var + epsilon)
    y, _ = standardize(
        x, spatial, epsilon=epsilon, mask=mask,
        scale=style_std.astype(acc), bias=s.mean.astype(acc), dtype=x.dtype,
    )
    return y
