"""``normalize`` (given statistics) and ``standardize`` (own statistics, fused backward).

:func:`standardize` is the one place where every norm in jaxnorm (batch, layer,
group, instance, RMS, batch renorm) turns ``x`` into ``x_hat``. Its backward is
the analytic one of Ioffe & Szegedy 2015, section 3, written as a
``jax.custom_vjp``: with ``inv = 1/sqrt(var + eps)`` and N values per statistic,

    dx = inv * (g - mask/N * (sum(g) + x_hat * sum(g * x_hat)))

(sums over the valid values of the reduced axes and, with ``axis_name``, over
devices), which needs two reductions and one elementwise pass where autodiff of
the two-pass forward needs more. Cotangents of the returned mean and variance
are folded into the same pass, and the four per-statistic sums go through a
single ``psum`` across devices: with ``axis_name`` the forward pass has one
collective (the moments exchange of :mod:`stats`) and the backward pass one.
Under ``shard_map``'s replication typing (``check_vma=True``) the cotangents
of the replicated statistics arrive already summed over devices, so they are
left out of that ``psum``. Values excluded by ``mask`` do not enter the
statistics, so their own gradient is ``inv * g``; their outputs still depend
on the statistics, and those cotangents reach the valid values exactly as
autodiff of a masked mean would send them (a loss that ignores padded outputs
sends none). Masked positions with a zero cotangent are skipped, so NaN held
there cannot spread.

Second derivatives: the backward is made of differentiable ``jax.numpy`` ops, so
reverse-over-reverse (``jax.grad`` of ``jax.grad``, ``jax.hessian`` via
``jacrev``) works. Forward mode (``jax.jvp``, ``jacfwd``) of a ``custom_vjp`` is
refused by JAX with its own error.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import errors
from jaxnorm._src.stats import Moments, accumulation_dtype, compute_moments, sum_across, varies_over

Array = jax.Array


def standardize(
    x: Array,
    axes: Sequence[int],
    *,
    epsilon: float,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> tuple[Array, Moments]:
    """``x_hat = (x - mean) / sqrt(var + epsilon)`` with statistics over ``axes``.

    Args:
      x: (...) floating array.
      axes: non-negative reduced axes.
      epsilon: added to the variance.
      mask: optional bool array broadcasting to ``x``; True marks values that count.
      center: False for RMS norm: no mean is subtracted and ``var`` is the mean square.
      axis_name, axis_index_groups: reduce across devices as well.

    Returns:
      ``(x_hat, moments)``: ``x_hat`` of x's shape in the accumulation dtype
      (float32 for half-precision inputs); :class:`Moments` with ``axes`` kept as 1.
    """
    static = (tuple(axes), float(epsilon), bool(center), axis_name, _hashable(axis_index_groups))
    x_hat, shift, offset, var, count = _standardize(static, x, mask)
    return x_hat, Moments(shift, offset, var, count)


def _hashable(groups: Any) -> Any:
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _standardize(static, x, mask):
    return _standardize_fwd(static, x, mask)[0]


def _standardize_fwd(static, x, mask):
    axes, epsilon, center, axis_name, groups = static
    m = compute_moments(x, axes, mask=mask, center=center, axis_name=axis_name, axis_index_groups=groups)
    inv = lax.rsqrt(m.var + epsilon)
    x_hat = _center(x, m) * inv
    out = (x_hat, m.shift, m.offset, m.var, m.count)
    return out, (x, mask, m.shift, m.offset, inv, m.count)


def _center(x: Array, m: Moments) -> Array:
    xf = x.astype(m.var.dtype)
    # Two subtractions: x - shift is exact near the mean, offset is small.
    return (xf - m.shift) - m.offset


def _standardize_bwd(static, residuals, cotangents):
    axes, _, center, axis_name, groups = static
    x, mask, shift, offset, inv, count = residuals
    g, _, g_offset, g_var, _ = cotangents
    x_hat = _center(x, Moments(shift, offset, inv, count)) * inv
    # Outputs at masked positions depend on the statistics too, so their
    # cotangents belong in the sums (the exact derivative, as autodiff of a
    # masked mean gives); positions with a zero cotangent are left out so that
    # NaN or inf held there cannot turn 0 * x_hat into NaN.
    if mask is None:
        gx = g * x_hat
    else:
        gx = jnp.where(mask | (g != 0), g * x_hat, 0)
    sums = [jnp.sum(gx, axes, keepdims=True)]
    if center:
        sums.append(jnp.sum(g, axes, keepdims=True))
    # Cotangents of the returned statistics belong to every device's copy of the
    # same global value, so they are summed across devices with the data sums,
    # except where shard_map's type system has summed them already: there the
    # statistics are typed as replicated, and the transpose of the implicit
    # broadcast that fed them to each device's loss was itself a psum.
    stat_cts = [g_var] + ([g_offset] if center else [])
    presummed = axis_name is not None and varies_over(x, axis_name) and not any(
        varies_over(c, axis_name) for c in stat_cts
    )
    if not presummed:
        sums += stat_cts
    shape = jnp.broadcast_shapes(*(s.shape for s in sums + stat_cts))
    total = sum_across(jnp.stack([jnp.broadcast_to(s, shape) for s in sums]), axis_name, groups)
    if presummed:
        total = jnp.concatenate([total, jnp.stack([jnp.broadcast_to(c, shape) for c in stat_cts])])
    sum_gx, g_var = total[0], total[2 if center else 1]
    scale = 1.0 / jnp.maximum(count, 1)
    correction = x_hat * (inv * sum_gx - 2.0 * g_var / inv)
    if center:
        sum_g, g_mean = total[1], total[3]
        correction = correction + (inv * sum_g - g_mean)
    dx = inv * g - scale * correction
    if mask is not None:
        dx = jnp.where(mask, dx, inv * g)
    return dx.astype(x.dtype), None


_standardize.defvjp(_standardize_fwd, _standardize_bwd)


def affine(x_hat: Array, scale: Array | None, bias: Array | None, dtype: Any) -> Array:
    """``x_hat * scale + bias`` (each optional, broadcasting), cast to ``dtype``."""
    y = x_hat
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


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
    errors.check_floating(fn, x)
    x = jnp.asarray(x)
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("bias", bias)):
        if value is None:
            continue
        errors.check_floating(fn, value, name)
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
    mul = lax.rsqrt(jnp.asarray(var, acc) + epsilon)
    if scale is not None:
        mul = mul * jnp.asarray(scale, acc)
    y = (x.astype(acc) - jnp.asarray(mean, acc)) * mul
    if bias is not None:
        y = y + jnp.asarray(bias, acc)
    return y.astype(x.dtype if dtype is None else dtype)
