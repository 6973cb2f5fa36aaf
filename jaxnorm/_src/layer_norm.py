"""Layer norm (Ba, Kiros & Hinton 2016) and RMS norm (Zhang & Sennrich 2019).

Both normalize each example over its own features, so they behave the same in
training and inference and suit batch size 1 and recurrent nets. Statistics
come from :func:`jaxnorm._src.standardize.standardize`; RMS norm is its uncentred
form (no mean is subtracted, the mean square replaces the variance).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_epsilon, check_floating, check_mask, check_out_dtype
from jaxnorm._src.per_example import place
from jaxnorm._src.standardize import standardize

Array = jax.Array


def check_broadcast_param(fn: str, name: str, param: Any, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """Returns ``param``; raises unless it broadcasts against x from the right without changing its shape."""
    if param is None:
        return None
    check_floating(fn, name=name, x=param)
    shape = tuple(jnp.shape(param))
    ok = len(shape) <= len(x_shape) and all(
        s in (1, d) for s, d in zip(reversed(shape), reversed(x_shape))
    )
    if not ok:
        reduced = tuple(x_shape[a] for a in axes)
        raise ValueError(
            f"{fn}: `{name}` of shape {shape} does not broadcast against `x` of shape "
            f"{tuple(x_shape)} from the right; use ({x_shape[-1]},) (flax) or {reduced} "
            f"(the reduced axes, as PyTorch's LayerNorm does)."
        )
    return param


def _prepare(
    fn: str, x: Any, axis: Any, mask: Any, params: dict[str, Any], feature_axes: Any,
) -> tuple[Array, tuple[int, ...], Array | None, dict[str, Any]]:
    x = jnp.asarray(check_floating(fn, x))
    axes = canonical_axes(fn, "axis", axis, x.shape)
    if feature_axes is None:
        for name, value in params.items():
            check_broadcast_param(fn, name, value, x.shape, axes)
    else:
        # flax's `feature_axes`: parameters span these axes of x (e.g. C at
        # axis 1 of NCHW) and are placed on them, not broadcast from the right.
        # Per-example parameters (x's rank, e.g. (N, C, 1, 1)) are taken as they are.
        kept = canonical_axes(fn, "feature_axes", feature_axes, x.shape)
        for name, value in params.items():
            params[name] = place(fn, name, value, x.shape, kept)
    return x, axes, check_mask(fn, mask, x.shape), params


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    feature_axes: int | tuple[int, ...] | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """Layer normalization: each example standardized over the ``axis`` axes.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with mean and biased
    variance over ``axis`` (per example, per position for the other axes).

    Args:
      x: e.g. (N, C), (B, T, C) or (N, H, W, C); floating.
      scale, bias: optional, broadcasting against x from the right: (C,) as flax
        makes them, the reduced shape as PyTorch's LayerNorm does, or per example,
        e.g. (B, 1, C) for adaLN (``layer_norm(x) * (1 + scale) + shift``).
      axis: reduced axis or axes.
      epsilon: added to the variance.
      mask: bool, broadcasts to x; True marks values that count (e.g. valid
        features); masked values reach neither statistics nor gradients.
        A mask of lower rank than x must fit it one way only (else give it x's rank).
        A statistic without any valid value (an all-False mask along the reduced
        axes, e.g. a padded example) has mean 0 and variance 0: its positions get
        ``x / sqrt(epsilon)`` times scale plus bias (flax gives NaN); keep them out of the loss.
      feature_axes: axes of x that scale and bias span, as flax's field: they then
        have shape ``x.shape[feature_axes]`` and are placed on those axes (e.g.
        ``feature_axes=1`` with (C,) parameters on NCHW). Default None: broadcast
        from the right.
      axis_name, axis_index_groups: also reduce over devices along this named
        axis (model-parallel features), as flax's fields.
      dtype: output dtype; default x's dtype.

    Returns:
      Array of x's shape and dtype (statistics in at least float32).

    Raises:
      ValueError: bad axes, parameter shapes or mask, or non-floating input.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> y = jn.layer_norm(jnp.array([[1., 2., 3.]]), epsilon=0.0)
      >>> [round(v, 4) for v in y[0].tolist()]
      [-1.2247, 0.0, 1.2247]
    """
    check_epsilon("layer_norm", epsilon)
    x, axes, mask, p = _prepare("layer_norm", x, axis, mask, {"scale": scale, "bias": bias}, feature_axes)
    check_out_dtype("layer_norm", dtype)
    y, _ = standardize(
        x, axes, epsilon=epsilon, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
        scale=p["scale"], bias=p["bias"], dtype=x.dtype if dtype is None else dtype,
    )
    return y


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-6,
    mask: Array | None = None,
    feature_axes: int | tuple[int, ...] | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> Array:
    """RMS normalization: ``y = x / sqrt(mean(x**2) + eps) * scale`` over ``axis``.

    Zhang & Sennrich 2019: layer norm without re-centring; flax's ``RMSNorm``.

    Args:
      x: e.g. (B, T, C); floating.
      scale: optional, broadcasting against x from the right, e.g. (C,).
      axis: reduced axis or axes.
      epsilon: added to the mean square.
      mask: bool, broadcasts to x; True marks values that count. As in
        :func:`layer_norm`: a lower-rank mask must fit x one way only; a row
        without any valid value has mean square 0, so it gets ``x / sqrt(epsilon) * scale``.
      feature_axes: axes of x that scale spans, as flax's field: it then
        has shape ``x.shape[feature_axes]`` and is placed on those axes (e.g.
        ``feature_axes=1`` with (C,) parameters on NCHW). Default None: broadcast
        from the right.
      axis_name, axis_index_groups: also reduce over devices along this named
        axis (model-parallel features), as flax's fields.
      dtype: output dtype; default x's dtype.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: bad axes, scale shape or mask, or non-floating input.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> y = jn.rms_norm(jnp.array([[3., 4.]]), epsilon=0.0)
      >>> [round(v, 4) for v in y[0].tolist()]
      [0.8485, 1.1314]
    """
    check_epsilon("rms_norm", epsilon)
    x, axes, mask, p = _prepare("rms_norm", x, axis, mask, {"scale": scale}, feature_axes)
    check_out_dtype("rms_norm", dtype)
    y, _ = standardize(
        x, axes, epsilon=epsilon, mask=mask, center=False,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        scale=p["scale"], dtype=x.dtype if dtype is None else dtype,
    )
    return y
