"""``normalize``: the inference-time affine map with given statistics (Ioffe & Szegedy 2015, Algorithm 2).

The map every evaluation path uses (batch norm's ``training=False``, folding
into the layer before it). Statistics computed from ``x`` itself go through
:mod:`jaxnorm._src.standardize` instead, which has the fused derivative.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src.checks import check_epsilon, check_floating, check_out_dtype
from jaxnorm._src.moments import accumulation_dtype
from jaxnorm._src.standardize import inverse_std

Array = jax.Array


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float,
    dtype: Any = None,
) -> Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` with given statistics.

    The inference-time map of Ioffe & Szegedy 2015 (Algorithm 2): a fixed affine
    transform per feature. All of ``mean``, ``var``, ``scale`` and ``bias``
    broadcast against ``x`` (numpy rules). Arithmetic runs in at least float32;
    the result has x's dtype. ``x - mean`` is formed first so large offsets
    cancel exactly before scaling.

    Args:
      x: (...) floating array, e.g. (N, ..., C).
      mean, var: statistics broadcasting to ``x``, e.g. (C,) for channels-last.
      scale, bias: optional, broadcasting to ``x``.
      epsilon: added to ``var``.
      dtype: dtype of the result; default x's dtype (flax's ``dtype`` field).

    Returns:
      Array of x's shape and dtype (or ``dtype``).

    Raises:
      ValueError: non-floating inputs, or arguments that do not broadcast to ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> jn.normalize(jnp.array([1., 3.]), 2.0, 1.0, epsilon=0.0).tolist()
      [-1.0, 1.0]
    """
    fn = "normalize"
    x = jnp.asarray(check_floating(fn, x))
    check_epsilon(fn, epsilon)
    check_out_dtype(fn, dtype)
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("bias", bias)):
        if value is None:
            continue
        check_floating(fn, value, name)
        try:
            ok = jnp.broadcast_shapes(jnp.shape(value), x.shape) == x.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{fn}: `{name}` of shape {jnp.shape(value)} does not broadcast to `x` of "
                f"shape {x.shape}; reshape it to x's rank with 1 on the reduced axes."
            )
    acc = accumulation_dtype(x.dtype)
    mul = inverse_std(jnp.asarray(var, acc), epsilon)
    if scale is not None:
        mul = mul * jnp.asarray(scale, acc)
    y = (x.astype(acc) - jnp.asarray(mean, acc)) * mul
    if bias is not None:
        y = y + jnp.asarray(bias, acc)
    return y.astype(x.dtype if dtype is None else dtype)
