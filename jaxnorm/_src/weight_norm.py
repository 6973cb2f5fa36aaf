"""Weight normalization and weight standardization: reparameterized kernels.

Both map a layer's kernel to a new kernel before the layer uses it; neither
has state. Axes follow flax's kernels: ``feature_axes`` are the output
features (the last axis of a Dense ``(in, out)`` or Conv ``(..., in, out)``
kernel) and every other axis is the fan-in that is reduced.

- :func:`weight_norm` (Salimans & Kingma 2016): ``w = g * v / ||v||`` with the
  norm over the fan-in, written as flax's ``_l2_normalize`` writes it,
  ``v * rsqrt(sum(v**2) + epsilon)``, so that float32 results are bit-equal
  to ``flax.linen.WeightNorm``'s.
- :func:`weight_standardize` (Qiao et al. 2019, "Micro-Batch Training with
  Batch-Channel Normalization and Weight Standardization"): each output
  feature's weights get zero mean and unit (biased) variance over the fan-in,
  ``(w - mean) / sqrt(var + epsilon)``, the form of BiT's StdConv. Its
  statistics come from :func:`jaxnorm._src.stats.compute_moments` and the map
  is :func:`jaxnorm.normalize`: the same shifted float32 statistics every
  activation norm uses, and no custom VJP, so forward mode works too.

Arithmetic runs in at least float32 (flax's WeightNorm reduces a bfloat16
kernel in bfloat16); the result has the kernel's dtype unless ``dtype`` says
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import checks
from jaxnorm._src.moments import accumulation_dtype, compute_moments
from jaxnorm._src.normalize import normalize

Array = jax.Array


def feature_and_reduced_axes(
    fn: str, feature_axes: int | Sequence[int] | None, shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(feature_axes, reduced_axes)`` of a kernel, both sorted and non-negative.

    ``None`` (flax's ``feature_axes=None``) and ``()`` mean no feature axes: one
    norm over the whole kernel.
    """
    ndim = len(shape)
    if feature_axes is None:
        raw: tuple[Any, ...] = ()
    elif isinstance(feature_axes, (int, np.integer)) and not isinstance(feature_axes, bool):
        raw = (feature_axes,)
    else:
        try:
            raw = tuple(feature_axes)
        except TypeError:
            raw = (feature_axes,)
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise ValueError(
                f"{fn}: `feature_axes` must be an int, a tuple of ints or None, got "
                f"{feature_axes!r}; e.g. `feature_axes=-1` for flax's Dense/Conv kernels."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `feature_axes`={feature_axes!r} is out of range for `kernel` of shape "
                f"{tuple(shape)} ({ndim} axes); use axes in [{-ndim}, {ndim - 1}], e.g. "
                f"`feature_axes=-1` (the output features of flax's Dense (in, out) and Conv "
                f"(..., in, out) kernels)."
            )
    feat = tuple(sorted({int(a) % ndim for a in raw}))
    if len(feat) != len(raw):
        raise ValueError(
            f"{fn}: `feature_axes`={feature_axes!r} names an axis more than once for `kernel` "
            f"of shape {tuple(shape)}; list each axis once."
        )
    return feat, tuple(a for a in range(ndim) if a not in feat)


def scale_shape(kernel_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    """flax's shape of a weight-norm ``scale``: the kernel's sizes on its (non-negative) feature axes.

    Example:
      >>> scale_shape((3, 3, 2, 8), (3,))
      (8,)
    """
    return tuple(kernel_shape[a] for a in feature_axes)


def _scale_shape(fn: str, scale: Any, shape: tuple[int, ...], feat: tuple[int, ...], feature_axes: Any) -> tuple:
    """The broadcast shape of ``scale``: flax's (features...) or the kernel's rank with 1 on the fan-in."""
    keep = tuple(shape[a] if a in feat else 1 for a in range(len(shape)))
    compact = scale_shape(shape, feat)
    got = tuple(np.shape(scale))
    if got not in (compact, keep):
        raise ValueError(
            f"{fn}: `scale` has shape {got}, but `kernel` of shape {tuple(shape)} with "
            f"`feature_axes`={feature_axes!r} has features of shape {compact}; pass a "
            f"{compact} array (flax's layout) or one of shape {keep}."
        )
    checks.check_floating(fn, scale, "scale")
    return keep


def weight_norm(
    kernel: Array,
    scale: Array | None = None,
    *,
    feature_axes: int | Sequence[int] | None = -1,
    epsilon: float = 1e-12,
    dtype: Any = None,
) -> Array:
    """Weight normalization: ``scale * kernel / sqrt(sum(kernel**2) + epsilon)``.

    The sum runs over every axis not in ``feature_axes`` (the fan-in), so each
    output feature's weight vector gets unit L2 norm times its ``scale`` (``g``
    in Salimans & Kingma 2016, "Weight Normalization: A Simple
    Reparameterization to Accelerate Training of Deep Neural Networks").

    Shapes: ``kernel`` (in, C) for Dense or (..., in, C) for Conv (flax's
    layouts; PyTorch's (C, in, ...) is ``feature_axes=0``); ``scale`` (C,) (the
    feature axes' sizes, flax's parameter) or the kernel's rank with 1 on the
    fan-in (PyTorch's ``original0``, e.g. (C, 1, 1, 1)).

    Args:
      kernel: floating array of rank >= 1.
      scale: optional gain per feature; None is a gain of 1.
      feature_axes: the kept axes (int or tuple); None or () normalizes the
        whole kernel by one norm (flax's ``feature_axes=None``).
      epsilon: added to the sum of squares.
      dtype: dtype of the result; default the kernel's.

    Returns:
      The normalized kernel, of the kernel's shape.

    Raises:
      ValueError: non-floating input, ``feature_axes`` out of range or
        repeated, a ``scale`` of the wrong shape, a bad ``epsilon``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, jaxnorm as jn
      >>> w = jn.weight_norm(jnp.array([[3., 0.], [4., 2.]]), jnp.array([2., 1.]))
      >>> np.round(np.asarray(w, np.float64), 4).tolist()
      [[1.2, 0.0], [1.6, 1.0]]
    """
    fn = "weight_norm"
    checks.check_floating(fn, kernel, "kernel")
    checks.check_epsilon(fn, epsilon)
    checks.check_out_dtype(fn, dtype)
    kernel = jnp.asarray(kernel)
    feat, red = feature_and_reduced_axes(fn, feature_axes, kernel.shape)
    keep = None if scale is None else _scale_shape(fn, scale, kernel.shape, feat, feature_axes)
    w = kernel.astype(accumulation_dtype(kernel.dtype))
    # flax's _l2_normalize, operation for operation: float32 results are bit-equal.
    out = w * lax.rsqrt(jnp.sum(w * w, axis=red, keepdims=True) + epsilon)
    if scale is not None:
        out = out * jnp.reshape(jnp.asarray(scale), keep)
    return out.astype(kernel.dtype if dtype is None else dtype)


def weight_standardize(
    kernel: Array,
    *,
    feature_axes: int | Sequence[int] = -1,
    epsilon: float = 1e-5,
    dtype: Any = None,
) -> Array:
    """Weight standardization: each output feature's weights to zero mean, unit variance.

    ``(kernel - mean) / sqrt(var + epsilon)`` with the mean and the biased
    variance over the fan-in (every axis not in ``feature_axes``), per Qiao et
    al. 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight
    Standardization", in the form of BiT's StdConv (Kolesnikov et al. 2020).
    With group norm after the convolution it trains at batch sizes where batch
    norm fails (see the guide "Weight normalizations").

    Shapes: ``kernel`` (in, C) for Dense or (..., in, C) for Conv (flax's
    layouts; ``feature_axes=0`` for PyTorch's (C, in, ...)).

    Args:
      kernel: floating array with at least one fan-in axis.
      feature_axes: the kept axes (int or tuple), the output features.
      epsilon: added to the variance (1e-5; BiT's PyTorch code uses 1e-10,
        big_vision 1e-8).
      dtype: dtype of the result; default the kernel's.

    Returns:
      The standardized kernel, of the kernel's shape.

    Raises:
      ValueError: non-floating input, ``feature_axes`` out of range or
        repeated, no axis left to standardize over, a bad ``epsilon``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> w = jn.weight_standardize(jnp.array([[1., 2.], [3., 6.]]), epsilon=0.0)
      >>> w.tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
    """
    fn = "weight_standardize"
    checks.check_floating(fn, kernel, "kernel")
    checks.check_epsilon(fn, epsilon)
    checks.check_out_dtype(fn, dtype)
    kernel = jnp.asarray(kernel)
    feat, red = feature_and_reduced_axes(fn, feature_axes, kernel.shape)
    if not red:
        raise ValueError(
            f"{fn}: `feature_axes`={feature_axes!r} keeps every axis of `kernel` (shape "
            f"{tuple(kernel.shape)}), leaving no fan-in to standardize over (the result would "
            f"be all zeros); pass the output-feature axes only, e.g. `feature_axes=-1`, and "
            f"do not standardize biases or other vectors."
        )
    m = compute_moments(kernel, red)
    return normalize(kernel, m.mean, m.var, epsilon=epsilon, dtype=dtype)
