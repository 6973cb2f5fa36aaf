"""``normalize`` (given statistics) and ``standardize`` (own statistics, fused backward).

:func:`standardize` is the one place where every norm in jaxnorm (batch, layer,
group, instance, RMS, batch renorm) turns ``x`` into ``x_hat`` and, fused into
the same op, ``y = x_hat * scale + bias``. Its backward is
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
there cannot spread. The gradients of ``scale`` and ``bias`` are sums of
``g * x_hat`` and ``g``; where the parameters are constant over reduced axes
(batch norm: all of them, group norm: the spatial ones) the same partial sums
serve both them and the two per-statistic sums.

Speed (measured on XLA:CPU, see README "Speed"): ``x_hat`` is never stored.
The backward keeps x in its own dtype and every reduction, like the final
elementwise pass, rebuilds ``x_hat`` from its own handles to x and the
statistics (:func:`jaxnorm._src.stats.copies`), so no array of x's size is
written except the result. Where ``inv`` and ``offset`` are constant over the
summed axes, the pass over the data forms ``g * (x - shift)`` only and applies
them to the small partial sums (about 5-10% of batch norm's backward).
Where each statistic is a contiguous row of x (layer and RMS norm, instance
and group norm in NCHW) and there is neither a mask nor ``axis_name``, XLA:CPU
fuses a row's reductions with the elementwise work that consumes them, so
the backward saves no statistics and recomputes them inside its passes
(:func:`_row_sums`): three passes over the data for layer norm instead of five.

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
from jaxnorm._src.stats import (
    Moments,
    accumulation_dtype,
    copies,
    expand_minor,
    match_replication,
    moments_and_copies,
    on_cpu,
    reduces_trailing,
    sum_across,
    sum_over,
    varies_over,
)

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
    scale: Array | None = None,
    bias: Array | None = None,
    dtype: Any = None,
) -> tuple[Array, Moments]:
    """``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with statistics over ``axes``.

    Args:
      x: (...) floating array.
      axes: non-negative reduced axes.
      epsilon: added to the variance.
      mask: optional bool array broadcasting to ``x``; True marks values that count.
      center: False for RMS norm: no mean is subtracted and ``var`` is the mean square.
      axis_name, axis_index_groups: reduce across devices as well.
      scale, bias: optional, each broadcasting against ``x`` without changing its shape.
      dtype: dtype of ``y``; default the accumulation dtype (float32 for
        half-precision inputs), which with neither scale nor bias gives ``x_hat``.

    Returns:
      ``(y, moments)``: ``y`` of x's shape; :class:`Moments` with ``axes`` kept as 1.
    """
    acc = accumulation_dtype(x.dtype)
    rows = on_cpu() and mask is None and axis_name is None and reduces_trailing(axes, x.ndim)
    static = (
        tuple(axes), float(epsilon), bool(center), axis_name, _hashable(axis_index_groups),
        jnp.dtype(acc if dtype is None else dtype), rows,
    )
    y, shift, offset, var, count = _standardize(static, x, mask, scale, bias)
    return y, Moments(shift, offset, var, count)


def _hashable(groups: Any) -> Any:
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _standardize(static, x, mask, scale, bias):
    return _standardize_fwd(static, x, mask, scale, bias)[0]


def _standardize_fwd(static, x, mask, scale, bias):
    axes, epsilon, center, axis_name, groups, dtype, rows = static
    m, ((xi, _),) = moments_and_copies(
        x, axes, mask=mask, center=center, axis_name=axis_name, axis_index_groups=groups, extra=1,
    )
    inv = inverse_std(m.var, epsilon)
    (sh, off, iv), = copies(1, *(expand_minor(a, x.shape, axes) for a in (m.shift, m.offset, inv)))
    if not center:
        sh = off = None
    y = affine(_center(xi, sh, off, iv.dtype) * iv, scale, bias, dtype)
    out = (y, m.shift, m.offset, m.var, m.count)
    # x is kept in its own dtype (half the bytes of a float32 x_hat for bf16)
    # and x_hat is recomputed in the backward: cheaper than storing it.
    # Statistics of contiguous rows are recomputed there too (see _row_sums).
    saved = (None, None, None) if rows else (m.shift, m.offset, inv)
    return out, (x, mask, scale, bias, *saved, m.count)


def inverse_std(var: Array, epsilon: float) -> Array:
    """``1 / sqrt(var + epsilon)``: the one place every norm turns a variance into its scale."""
    return lax.rsqrt(var + epsilon)


def _center(x: Array, shift: Array | None, offset: Array | None, dtype: Any) -> Array:
    """``(x - shift) - offset`` in ``dtype``; None (RMS norm) skips a subtraction.

    Two subtractions: ``x - shift`` is exact near the mean, ``offset`` is small.
    (XLA keeps a subtraction of zero, since ``-0.0 - 0.0`` is not ``-0.0``.)
    """
    xf = x.astype(dtype)
    if shift is not None:
        xf = xf - shift
    if offset is not None:
        xf = xf - offset
    return xf


def _kept(v: Array, keep: Array | None) -> Array:
    """``v`` where ``keep`` (None: everywhere), else 0."""
    return v if keep is None else jnp.where(keep, v, 0)


def _constant_over(p: Array | None, axes: Sequence[int], ndim: int) -> bool:
    """True when ``p`` (broadcasting from the right) has size 1 on every axis in ``axes``."""
    if p is None:
        return True
    shape = (1,) * (ndim - p.ndim) + tuple(p.shape)
    return all(shape[a] == 1 for a in axes)


def _broadcast_axes(p: Array, ndim: int) -> tuple[int, ...]:
    """Axes of an ``ndim``-d array along which ``p`` (broadcasting from the right) is constant."""
    shape = (1,) * (ndim - p.ndim) + tuple(p.shape)
    return tuple(a for a in range(ndim) if shape[a] == 1)


def _sum_to(v: Array, p: Array) -> Array:
    """Sums ``v`` (already summed over some axes, kept as 1) to ``p``'s shape and dtype."""
    axes = tuple(a for a in _broadcast_axes(p, v.ndim) if v.shape[a] != 1)
    if axes:
        v = sum_over(v, axes)
    return jnp.reshape(v, p.shape).astype(p.dtype)


def _standardize_bwd(static, residuals, cotangents):
    axes, epsilon, center, axis_name, groups, _, rows = static
    x, mask, scale, bias, shift, offset, inv, count = residuals
    g, _, g_offset, g_var, _ = cotangents

    if rows:
        inv, s_gx, s_g, d_scale, d_bias, final = _row_sums(x, g, scale, bias, axes, epsilon, center)
    else:
        s_gx, s_g, d_scale, d_bias, final = _sums(x, g, mask, scale, bias, shift, offset, inv, axes, center)
    sums = [s_gx] + ([s_g] if center else [])
    # Cotangents of the returned statistics belong to every device's copy of the
    # same global value, so they are summed across devices with the data sums,
    # except where shard_map's type system has summed them already: there the
    # statistics are typed as replicated, and the transpose of the implicit
    # broadcast that fed them to each device's loss was itself a psum.
    stat_cts = [g_var] + ([g_offset] if center else [])
    presummed = axis_name is not None and varies_over(x, axis_name) and not any(
        varies_over(ct, axis_name) for ct in stat_cts
    )
    if not presummed:
        sums += stat_cts
    if axis_name is None:
        total = sums
    else:
        shape = jnp.broadcast_shapes(*(s.shape for s in sums + stat_cts))
        total = list(sum_across(jnp.stack([jnp.broadcast_to(s, shape) for s in sums]), axis_name, groups))
        if presummed:
            total += [jnp.broadcast_to(ct, shape) for ct in stat_cts]
    sum_gx_all, g_var = total[0], total[2 if center else 1]
    # dx = a * g * scale + b * x_hat + c with per-statistic a, b, c.
    scale_n = 1.0 / jnp.maximum(count, 1)
    b = -scale_n * (inv * sum_gx_all - 2.0 * g_var / inv)
    c = None
    if center:
        sum_g_all, g_mean = total[1], total[3]
        c = -scale_n * (inv * sum_g_all - g_mean)
    gi, x_hat, iv, b, c, mi = final(b, c)
    dx = iv * gi + b * x_hat
    if c is not None:
        dx = dx + c
    if mask is not None:
        # Masked values do not enter the statistics: their own derivative is inv * g.
        dx = jnp.where(mi, dx, iv * gi)
    # A replicated scale or bias (by shard_map's type system) gets its
    # cotangent summed over the devices, as autodiff of the broadcast would.
    d_scale, d_bias = match_replication(d_scale, scale), match_replication(d_bias, bias)
    return match_replication(dx.astype(x.dtype), x), None, d_scale, d_bias


def _sums(x, g, mask, scale, bias, shift, offset, inv, axes, center):
    """The backward's reductions from the saved statistics.

    Returns ``(sum(g * scale * x_hat), sum(g * scale) or None, d_scale,
    d_bias, final)`` with the sums over ``axes`` kept as 1; ``final(b, c)``
    gives the final pass its own handles ``(g * scale, x_hat, inv, b, c, mask)``.
    """
    acc = inv.dtype
    # Every reduction over the data and the final elementwise pass rebuild
    # g * scale and x_hat from x and g on their own (see stats.copies).
    stats = (expand_minor(a, x.shape, axes) for a in (shift, offset, inv))
    sets = iter(copies(5, g, x, mask, scale, *stats))

    def shifted(with_scale: bool) -> tuple[Array, Array, Array | None, Array, Array]:
        """A set's ``(g [* scale], x - shift, keep, offset, inv)``; ``keep`` None without a mask."""
        gi, xi, mi, sc, sh, off, iv = next(sets)
        gi = gi.astype(acc)
        if with_scale and sc is not None:
            gi = gi * sc
        d = _center(xi, sh if center else None, None, acc)  # no zero shift for RMS norm
        # Outputs at masked positions depend on the statistics too, so their
        # cotangents belong in the sums (the exact derivative, as autodiff of
        # a masked mean gives); positions with a zero cotangent are left out
        # so that NaN or inf held there cannot turn 0 * x_hat into NaN.
        keep = None if mi is None else mi | (gi != 0)
        return gi, d, keep, off, iv

    def terms(with_scale: bool) -> tuple[Array, Array]:
        gi, d, keep, off, iv = shifted(with_scale)
        return gi, _kept(((d - off) if center else d) * iv, keep)

    def sum_g(with_scale: bool, over: Sequence[int]) -> Array:
        return sum_over(terms(with_scale)[0], over)

    def sum_gx(with_scale: bool, over: Sequence[int]) -> Array:
        gi, x_hat = terms(with_scale)
        return sum_over(gi * x_hat, over)

    # Over the reduced axes along which scale and bias are constant (all of
    # them for batch norm, the spatial ones for group norm) the sums of
    # g * scale and g * scale * x_hat are scale times those of g and
    # g * x_hat, and the parameter gradients are sums of the same two partial
    # sums: two reductions over the data serve all four (the paper's section 3).
    common = tuple(a for a in axes if _constant_over(scale, (a,), x.ndim) and _constant_over(bias, (a,), x.ndim))
    if common:
        # sum(g * x_hat) = inv * (sum(g * (x - shift)) - offset * sum(g)):
        # inv and offset are constant over these axes, so the pass over the
        # data subtracts the shift only (offset is small, so nothing cancels).
        gi, d, keep, _, _ = shifted(False)
        part_gd = sum_over(gi * _kept(d, keep), common)
        part_g = sum_g(False, common) if (center or bias is not None) else None
        part_gx = (part_gd - offset * part_g) * inv if center else part_gd * inv
        d_scale = None if scale is None else _sum_to(part_gx, scale)
        d_bias = None if bias is None else _sum_to(part_g, bias)
        rest = tuple(a for a in axes if a not in common)
        s_gx = part_gx if scale is None else part_gx * scale
        s_g = None if part_g is None else (part_g if scale is None else part_g * scale)
        if rest:
            s_gx = jnp.sum(s_gx, rest, keepdims=True)
            s_g = None if s_g is None else jnp.sum(s_g, rest, keepdims=True)
    else:
        s_gx = sum_gx(True, axes)
        s_g = sum_g(True, axes) if center else None
        d_scale = None if scale is None else _sum_to(sum_gx(False, _broadcast_axes(scale, x.ndim)), scale)
        d_bias = None if bias is None else _sum_to(sum_g(False, _broadcast_axes(bias, x.ndim)), bias)

    def final(b: Array, c: Array | None) -> tuple:
        gi, x_hat = terms(True)
        (iv, b, c, mi), = copies(1, *(None if a is None else expand_minor(a, x.shape, axes) for a in (inv, b, c)), mask)
        return gi, x_hat, iv, b, c, mi

    return s_gx, s_g, d_scale, d_bias, final


def _row_sums(x, g, scale, bias, axes, epsilon, center):
    """The backward's reductions when each statistic is a contiguous row of x (no mask, one device).

    There XLA:CPU fuses a row's reductions with the elementwise work that
    consumes them into one pass over the data (the forward of layer norm
    reads x once), but only if nothing computed from the data leaves that
    pass. So the statistics are not saved: the pass that forms dx recomputes
    them from x with :func:`jaxnorm._src.stats.moments_and_copies` (one read of
    x and g and one write of dx), and so does the one pass over x and g for
    ``d_scale``; ``d_bias`` sums g alone: three passes instead of five (layer
    norm's (8192, 1024) float32 training step, README "Speed"). Same outputs as
    :func:`_sums`, plus the recomputed ``inv``.
    """
    acc = accumulation_dtype(x.dtype)
    (ga, xa, sca), (gb, xb, _), (gc, _, _) = copies(3, g, x, scale)

    def x_hat_of(xi):
        m, _ = moments_and_copies(xi, axes, center=center, separate=False)
        inv = inverse_std(m.var, epsilon)
        shift, offset = (m.shift, m.offset) if center else (None, None)
        return _center(xi, shift, offset, acc) * inv, inv

    x_hat, inv = x_hat_of(xa)
    gi = ga.astype(acc) if scale is None else ga.astype(acc) * sca
    s_gx = sum_over(gi * x_hat, axes)
    s_g = sum_over(gi, axes) if center else None
    d_scale = d_bias = None
    if scale is not None:
        x_hat_b, _ = x_hat_of(xb)
        d_scale = _sum_to(sum_over(gb.astype(acc) * x_hat_b, _broadcast_axes(scale, x.ndim)), scale)
    if bias is not None:
        d_bias = _sum_to(sum_over(gc.astype(acc), _broadcast_axes(bias, x.ndim)), bias)

    def final(b: Array, c: Array | None) -> tuple:
        return gi, x_hat, inv, b, c, None

    return inv, s_gx, s_g, d_scale, d_bias, final


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
    errors.check_epsilon(fn, epsilon)
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
    mul = inverse_std(jnp.asarray(var, acc), epsilon)
    if scale is not None:
        mul = mul * jnp.asarray(scale, acc)
    y = (x.astype(acc) - jnp.asarray(mean, acc)) * mul
    if bias is not None:
        y = y + jnp.asarray(bias, acc)
    return y.astype(x.dtype if dtype is None else dtype)
