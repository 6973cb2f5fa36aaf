"""``standardize``: the one op that turns ``x`` into ``x_hat`` (and ``x_hat * scale + bias``), with its derivative.

Every norm in jaxnorm (batch, layer, group, instance, RMS, batch renorm) calls
:func:`standardize`. Its derivative is the analytic one of Ioffe & Szegedy
2015, section 3: with ``inv = 1/sqrt(var + eps)`` and N values per statistic,

    dx = inv * (g - mask/N * (sum(g) + x_hat * sum(g * x_hat)))

(sums over the valid values of the reduced axes and, with ``axis_name``, over
devices), two reductions and one elementwise pass where autodiff of the
two-pass forward needs more. Cotangents of the returned mean and variance are
folded into the same pass, and the per-statistic sums go through a single
``psum`` across devices: with ``axis_name`` the forward pass has one collective
(the moments exchange of :mod:`jaxnorm._src.collectives`) and the backward
pass one. Under ``shard_map``'s replication typing (``check_vma=True``) the
cotangents of the replicated statistics arrive already summed over devices,
so they are left out of that ``psum``. Values excluded by ``mask`` do not
enter the statistics, so their own gradient is ``inv * g``; their outputs
still depend on the statistics, and those cotangents reach the valid values
exactly as autodiff of a masked mean would send them (a loss that ignores
padded outputs sends none). Masked positions with a zero cotangent are
skipped, so NaN held there cannot spread. The gradients of ``scale`` and
``bias`` are sums of ``g * x_hat`` and ``g``; where the parameters are
constant over reduced axes (batch norm: all of them, group norm: the spatial
ones) the same partial sums serve both them and the two per-statistic sums.

Structure: three plain functions and the mechanism that joins them.

- :func:`standardize_fwd` ``(static, x, mask, scale, bias, epsilon) -> (Outputs, Residuals)``;
- :func:`standardize_tangent` ``(static, Residuals, Tangents) -> tangents of (y, offset, var)``:
  forward mode, plain ``jax.numpy``;
- :func:`standardize_bwd` ``(static, Residuals, Outputs of cotangents) -> (dx, None, d_scale, d_bias, d_epsilon)``:
  the transpose of the tangent map, hand-fused;
- ``_standardize``, a ``jax.custom_jvp`` (``static``, the hashable
  :class:`Static`, is its non-differentiable argument) whose tangent is one
  :func:`jaxnorm._src.linear_primitive.linear_call`: ``jax.jvp`` and
  ``jax.linearize`` evaluate :func:`standardize_tangent`, and ``jax.grad``
  transposes it into :func:`standardize_bwd` (why a primitive: the
  :mod:`jaxnorm._src.linear_primitive` docstring). ``epsilon`` is an operand,
  not a static option: it may be traced and has a derivative.

Speed (measured on XLA:CPU, README "Speed"): ``x_hat`` is never stored. The
backward keeps x in its own dtype and every reduction, like the final
elementwise pass, rebuilds ``x_hat`` from its own handles to x and the
statistics (:func:`jaxnorm._src.lowering.copies`), so no array of x's size is
written except the result. Where ``inv`` and ``offset`` are constant over the
summed axes, the pass over the data forms ``g * (x - shift)`` only and applies
them to the small partial sums (about 5-10% of batch norm's backward). Where
each statistic is a contiguous row of x (layer and RMS norm, instance and
group norm in NCHW) and there is neither a mask nor ``axis_name``, the
backward lowered for XLA:CPU recomputes the statistics inside its passes
(:func:`row_backward`): three passes over the data for layer norm instead of
five; other platforms use :func:`saved_backward` (the choice is
:func:`jaxnorm._src.lowering.on_cpu_else`, per lowering platform).

Second derivatives: the backward and the tangent map are differentiable
``jax.numpy``, so every order of ``jacfwd``/``jacrev`` works (``jax.hessian``
is ``jacfwd`` of ``jacrev``); the ones that differentiate the tangent map
itself use forward mode of the plain formula.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src.axes import broadcast_axes, reduces_trailing, right_aligned_shape
from jaxnorm._src.collectives import match_replication, sum_across, varies_over, varying_axes
from jaxnorm._src.linear_primitive import linear_call
from jaxnorm._src.lowering import copies, expand_minor, on_cpu_else, sum_over
from jaxnorm._src.moments import Moments, accumulation_dtype, moments_and_copies

Array = jax.Array


class Static(NamedTuple):
    """The hashable options of :func:`standardize` (``nondiff_argnums`` of the custom derivative)."""

    axes: tuple[int, ...]
    center: bool  # False: RMS norm (no mean subtracted, var is the mean square)
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None  # axis_index_groups
    dtype: Any  # of y
    rows: bool  # every statistic a contiguous row, no mask, one device: row_backward applies on CPU


class Outputs(NamedTuple):
    """What the forward returns (and the structure of the cotangents the backward receives)."""

    y: Array
    shift: Array
    offset: Array
    var: Array
    count: Array


class Residuals(NamedTuple):
    """What the forward saves for the backward: x in its own dtype and the small statistics."""

    x: Array
    mask: Array | None
    scale: Array | None
    bias: Array | None
    shift: Array
    offset: Array
    inv: Array  # 1 / sqrt(var + epsilon)
    count: Array
    epsilon: Array  # scalar, accumulation dtype (an operand: it may be traced, and it has a derivative)


class Sums(NamedTuple):
    """The backward's reductions over the reduced axes (kept as 1), before the cross-device sum."""

    g_x_hat: Array  # sum(g * scale * x_hat)
    g: Array | None  # sum(g * scale); None for RMS norm
    d_scale: Array | None  # the cotangent of scale, scale's shape
    d_bias: Array | None  # the cotangent of bias, bias's shape


class FinalTerms(NamedTuple):
    """The final elementwise pass's own handles: ``dx = inv * g + b * x_hat + c``."""

    g: Array  # g * scale, accumulation dtype
    x_hat: Array
    inv: Array
    b: Array
    c: Array | None
    mask: Array | None


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
      epsilon: added to the variance; a scalar, which may be traced (a
        schedule, a ``vmap`` sweep) and is differentiated like the data.
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
    groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    static = Static(
        tuple(axes), bool(center), axis_name, groups, jnp.dtype(acc if dtype is None else dtype),
        mask is None and axis_name is None and reduces_trailing(axes, x.ndim),
    )
    out = _standardize(static, x, mask, scale, bias, jnp.asarray(epsilon, acc))
    return out.y, Moments(out.shift, out.offset, out.var, out.count)


def inverse_std(var: Array, epsilon: Any) -> Array:
    """``1 / sqrt(var + epsilon)``: the one place every norm turns a variance into its scale."""
    return lax.rsqrt(var + epsilon)


def affine(x_hat: Array, scale: Array | None, bias: Array | None, dtype: Any) -> Array:
    """``x_hat * scale + bias`` (each optional, broadcasting), cast to ``dtype``."""
    y = x_hat
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


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
    shape = right_aligned_shape(p.shape, ndim)
    return all(shape[a] == 1 for a in axes)


def _sum_to(v: Array, p: Array) -> Array:
    """Sums ``v`` (already summed over some axes, kept as 1) to ``p``'s shape and dtype."""
    axes = tuple(a for a in broadcast_axes(p.shape, v.ndim) if v.shape[a] != 1)
    if axes:
        v = sum_over(v, axes)
    return jnp.reshape(v, p.shape).astype(p.dtype)


# --- the forward rule --------------------------------------------------------


def standardize_fwd(
    static: Static, x: Array, mask: Array | None, scale: Array | None, bias: Array | None, epsilon: Array
) -> tuple[Outputs, Residuals]:
    """Forward rule: ``(Outputs, Residuals)``.

    The moments of x over ``static.axes`` (shifted, masked, merged across
    devices; :func:`jaxnorm._src.moments.moments_and_copies`), then
    ``y = ((x - shift) - offset) * inv * scale + bias`` from a handle of x of
    its own. x is saved in its own dtype (half the bytes of a float32 x_hat
    for bf16) and x_hat is recomputed in the backward: cheaper than storing it.
    """
    axes = static.axes
    m, ((xi, _),) = moments_and_copies(
        x, axes, mask=mask, center=static.center, axis_name=static.axis_name,
        axis_index_groups=static.groups, extra=1,
    )
    inv = inverse_std(m.var, epsilon)
    ((sh, off, iv),) = copies(1, *(expand_minor(a, x.shape, axes) for a in (m.shift, m.offset, inv)))
    if not static.center:
        sh = off = None
    y = affine(_center(xi, sh, off, iv.dtype) * iv, scale, bias, static.dtype)
    return Outputs(y, m.shift, m.offset, m.var, m.count), Residuals(
        x, mask, scale, bias, m.shift, m.offset, inv, m.count, epsilon
    )


# --- the backward rule -------------------------------------------------------


def standardize_bwd(static: Static, res: Residuals, ct: Outputs):
    """Backward rule: ``(dx, None, d_scale, d_bias, d_epsilon)`` from the cotangents ``ct`` of :class:`Outputs`.

    ``dx = a * g * scale + b * x_hat + c`` per statistic, with
    ``a = inv``, ``b = -(inv * sum(g * scale * x_hat) - 2 * g_var / inv) / N``
    and ``c = -(inv * sum(g * scale) - g_mean) / N`` (the paper's section 3 plus
    the cotangents of the returned mean and variance), and
    ``d_epsilon = -1/2 * sum(inv**2 * sum(g * scale * x_hat))`` (``x_hat``
    scales as ``inv``; the statistics do not depend on epsilon). Contiguous
    rows lower to :func:`row_backward` on CPU (see the module docstring),
    everything else to :func:`saved_backward`.
    """
    # Only the cotangents of y, offset and var matter (shift carries no
    # gradient, count is an integer); the others stay out of the branches.
    ct = ct._replace(shift=None, count=None)
    if static.rows and not varying_axes(res.x):
        dx, d_scale, d_bias, d_eps = on_cpu_else(
            functools.partial(row_backward, static), functools.partial(saved_backward, static), res, ct
        )
    else:
        dx, d_scale, d_bias, d_eps = saved_backward(static, res, ct)
    # A replicated scale, bias or epsilon (by shard_map's type system) gets its
    # cotangent summed over the devices, as autodiff of the broadcast would.
    d_scale, d_bias = match_replication(d_scale, res.scale), match_replication(d_bias, res.bias)
    d_eps = match_replication(d_eps.astype(res.epsilon.dtype), res.epsilon)
    return match_replication(dx.astype(res.x.dtype), res.x), None, d_scale, d_bias, d_eps


def _epsilon_cotangent(sums: Sums, inv: Array) -> Array:
    """``-1/2 * sum(inv**2 * sum(g * scale * x_hat))``: this device's share of epsilon's cotangent (a scalar)."""
    return -0.5 * jnp.sum(inv * inv * sums.g_x_hat)


def _combine(static: Static, sums: Sums, inv: Array, count: Array, ct: Outputs, x: Array, final: Callable) -> Array:
    """dx from the per-statistic sums: one cross-device ``psum`` of them, then the final pass."""
    center = static.center
    data = [sums.g_x_hat] + ([sums.g] if center else [])
    # Cotangents of the returned statistics belong to every device's copy of the
    # same global value, so they are summed across devices with the data sums,
    # except where shard_map's type system has summed them already: there the
    # statistics are typed as replicated, and the transpose of the implicit
    # broadcast that fed them to each device's loss was itself a psum.
    stat_cts = [ct.var] + ([ct.offset] if center else [])
    axis_name = static.axis_name
    presummed = axis_name is not None and varies_over(x, axis_name) and not any(
        varies_over(c, axis_name) for c in stat_cts
    )
    if axis_name is None:
        total = data + stat_cts
    else:
        summed = data if presummed else data + stat_cts
        shape = jnp.broadcast_shapes(*(s.shape for s in data + stat_cts))
        total = list(sum_across(jnp.stack([jnp.broadcast_to(s, shape) for s in summed]), axis_name, static.groups))
        if presummed:
            total += [jnp.broadcast_to(c, shape) for c in stat_cts]
    if center:
        sum_g_x_hat, sum_g, g_var, g_mean = total
    else:
        (sum_g_x_hat, g_var), sum_g, g_mean = total, None, None
    scale_n = 1.0 / jnp.maximum(count, 1)
    b = -scale_n * (inv * sum_g_x_hat - 2.0 * g_var / inv)
    c = None if not center else -scale_n * (inv * sum_g - g_mean)
    t = final(b, c)
    dx = t.inv * t.g + t.b * t.x_hat
    if t.c is not None:
        dx = dx + t.c
    if t.mask is not None:
        # Masked values do not enter the statistics: their own derivative is inv * g.
        dx = jnp.where(t.mask, dx, t.inv * t.g)
    return dx


class _Handles(NamedTuple):
    """One set of handles (from :func:`jaxnorm._src.lowering.copies`) that a pass over the data builds from."""

    g: Array
    x: Array
    mask: Array | None
    scale: Array | None
    shift: Array
    offset: Array
    inv: Array


def saved_backward(static: Static, res: Residuals, ct: Outputs) -> tuple[Array, Array | None, Array | None, Array]:
    """The backward from the saved statistics: ``(dx, d_scale, d_bias, d_epsilon)`` (any mask, any devices).

    Every reduction over the data and the final elementwise pass rebuild
    ``g * scale`` and ``x_hat`` from x and g on their own handles.
    """
    axes, center = static.axes, static.center
    x, g, mask, scale, bias = res.x, ct.y, res.mask, res.scale, res.bias
    shift, offset, inv = res.shift, res.offset, res.inv
    acc = inv.dtype
    stats = (expand_minor(a, x.shape, axes) for a in (shift, offset, inv))
    # Five sets: at most four reductions over the data and the final pass.
    handle_sets = iter([_Handles(*s) for s in copies(5, g, x, mask, scale, *stats)])

    def shifted(with_scale: bool) -> tuple[Array, Array, Array | None, Array, Array]:
        """A fresh set's ``(g [* scale], x - shift, keep, offset, inv)``; ``keep`` None without a mask."""
        h = next(handle_sets)
        gi = h.g.astype(acc)
        if with_scale and h.scale is not None:
            gi = gi * h.scale
        d = _center(h.x, h.shift if center else None, None, acc)  # no zero shift for RMS norm
        # Outputs at masked positions depend on the statistics too, so their
        # cotangents belong in the sums (the exact derivative, as autodiff of
        # a masked mean gives); positions with a zero cotangent are left out
        # so that NaN or inf held there cannot turn 0 * x_hat into NaN.
        keep = None if h.mask is None else h.mask | (gi != 0)
        return gi, d, keep, h.offset, h.inv

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
        sums = Sums(s_gx, s_g if center else None, d_scale, d_bias)
    else:
        sums = Sums(
            sum_gx(True, axes),
            sum_g(True, axes) if center else None,
            None if scale is None else _sum_to(sum_gx(False, broadcast_axes(scale.shape, x.ndim)), scale),
            None if bias is None else _sum_to(sum_g(False, broadcast_axes(bias.shape, x.ndim)), bias),
        )

    def final(b: Array, c: Array | None) -> FinalTerms:
        gi, x_hat = terms(True)
        small = (None if a is None else expand_minor(a, x.shape, axes) for a in (inv, b, c))
        ((iv, b, c, mi),) = copies(1, *small, mask)
        return FinalTerms(gi, x_hat, iv, b, c, mi)

    dx = _combine(static, sums, inv, res.count, ct, x, final)
    return dx, sums.d_scale, sums.d_bias, _epsilon_cotangent(sums, inv)


def row_backward(static: Static, res: Residuals, ct: Outputs) -> tuple[Array, Array | None, Array | None, Array]:
    """The backward when each statistic is a contiguous row of x (no mask, one device), for XLA:CPU.

    There XLA:CPU fuses a row's reductions with the elementwise work that
    consumes them into one pass over the data (the forward of layer norm
    reads x once), but only if nothing computed from the data leaves that
    pass. So the saved statistics are not used: the pass that forms dx
    recomputes them from x with :func:`jaxnorm._src.moments.moments_and_copies`
    (one read of x and g and one write of dx), and so does the one pass over
    x and g for ``d_scale``; ``d_bias`` sums g alone: three passes instead of
    five (layer norm's (8192, 1024) float32 training step, README "Speed").
    Same results as :func:`saved_backward`.
    """
    axes, center, epsilon = static.axes, static.center, res.epsilon
    x, g, scale, bias = res.x, ct.y, res.scale, res.bias
    acc = accumulation_dtype(x.dtype)
    (ga, xa, sca), (gb, xb, _), (gc, _, _) = copies(3, g, x, scale)

    def x_hat_of(xi: Array) -> tuple[Array, Array]:
        m, _ = moments_and_copies(xi, axes, center=center, separate=False)
        inv = inverse_std(m.var, epsilon)
        shift, offset = (m.shift, m.offset) if center else (None, None)
        return _center(xi, shift, offset, acc) * inv, inv

    x_hat, inv = x_hat_of(xa)
    gi = ga.astype(acc) if scale is None else ga.astype(acc) * sca
    d_scale = d_bias = None
    if scale is not None:
        x_hat_b, _ = x_hat_of(xb)
        d_scale = _sum_to(sum_over(gb.astype(acc) * x_hat_b, broadcast_axes(scale.shape, x.ndim)), scale)
    if bias is not None:
        d_bias = _sum_to(sum_over(gc.astype(acc), broadcast_axes(bias.shape, x.ndim)), bias)
    sums = Sums(sum_over(gi * x_hat, axes), sum_over(gi, axes) if center else None, d_scale, d_bias)

    def final(b: Array, c: Array | None) -> FinalTerms:
        return FinalTerms(gi, x_hat, inv, b, c, None)

    dx = _combine(static, sums, inv, res.count, ct, x, final)
    return dx, d_scale, d_bias, _epsilon_cotangent(sums, inv)


# --- the tangent rule (forward mode) -----------------------------------------


class Tangents(NamedTuple):
    """The operands the tangent map is linear in: the tangents of x, scale, bias and epsilon."""

    x: Array
    scale: Array | None
    bias: Array | None
    epsilon: Array


def standardize_tangent(static: Static, res: Residuals, t: Tangents) -> tuple[Array, Array, Array]:
    """Forward mode of :func:`standardize`: the tangents of ``(y, offset, var)``.

    With ``m(v)`` the (masked, cross-device) mean over the reduced axes,
    ``t_mean = m(tx)``, ``t_var = 2 / inv * m(x_hat * tx)`` (the mean of
    ``x - mean`` is zero; RMS norm: ``t_mean = 0``) and

        t_x_hat = inv * (tx - t_mean - x_hat * m(x_hat * tx)) - x_hat * inv**2 * t_eps / 2
        t_y = t_x_hat * scale + x_hat * t_scale + t_bias.

    Plain ``jax.numpy``: it is what ``jax.jvp`` evaluates and what second
    derivatives differentiate; reverse mode uses its transpose,
    :func:`standardize_bwd`, instead.
    """
    axes, center = static.axes, static.center
    inv, count, mask = res.inv, res.count, res.mask
    acc = inv.dtype
    x_hat = _center(res.x, res.shift if center else None, res.offset if center else None, acc) * inv
    tx = t.x.astype(acc)
    denom = jnp.maximum(count, 1)

    def mean_of(*terms: Array) -> list[Array]:
        """Masked means over the reduced axes (and devices: one psum for all)."""
        sums = [jnp.sum(_kept(v, mask), axes, keepdims=True) for v in terms]
        if static.axis_name is not None:
            sums = list(sum_across(jnp.stack(sums), static.axis_name, static.groups))
        return [s / denom for s in sums]

    if center:
        t_mean, t_msq = mean_of(tx, x_hat * tx)
    else:
        (t_msq,), t_mean = mean_of(x_hat * tx), None
    t_var = 2.0 * t_msq / inv
    centered = tx if t_mean is None else tx - t_mean
    t_x_hat = inv * (centered - x_hat * t_msq) - 0.5 * (inv * inv * t.epsilon) * x_hat
    t_y = t_x_hat if res.scale is None else t_x_hat * res.scale
    if t.scale is not None:
        t_y = t_y + x_hat * t.scale
    if t.bias is not None:
        t_y = t_y + t.bias
    t_offset = jnp.zeros_like(res.offset) if t_mean is None else t_mean
    return t_y.astype(static.dtype), t_offset.astype(res.offset.dtype), t_var.astype(inv.dtype)


class TangentRule(NamedTuple):
    """:func:`standardize_tangent` and its transpose :func:`standardize_bwd`, as a :func:`linear_call` rule."""

    static: Static
    residuals: Any  # the treedef of Residuals (None fields drop out)
    tangents: Any  # the treedef of Tangents
    out_avals: tuple[Any, ...]  # the types of y, offset, var

    @property
    def n_residuals(self) -> int:
        return self.residuals.num_leaves

    def apply(self, residuals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[Array, ...]:
        res, t = self.residuals.unflatten(residuals), self.tangents.unflatten(tangents)
        return standardize_tangent(self.static, res, t)

    def transpose(self, residuals: tuple[Array, ...], cts: tuple[Array, ...]) -> tuple[Array, ...]:
        res = self.residuals.unflatten(residuals)
        ct_y, ct_offset, ct_var = cts
        dx, _, d_scale, d_bias, d_eps = standardize_bwd(
            self.static, res, Outputs(ct_y, None, ct_offset, ct_var, None)
        )
        return tuple(self.tangents.flatten_up_to(Tangents(dx, d_scale, d_bias, d_eps)))


# --- the derivative mechanism ---------------------------------------------------
# ``_standardize`` is a custom_jvp whose tangent is one linear primitive
# (:mod:`jaxnorm._src.linear_primitive`): forward mode evaluates
# :func:`standardize_tangent`, reverse mode transposes it into the fused
# :func:`standardize_bwd`.


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _standardize(
    static: Static, x: Array, mask: Array | None, scale: Array | None, bias: Array | None, epsilon: Array
) -> Outputs:
    return standardize_fwd(static, x, mask, scale, bias, epsilon)[0]


@_standardize.defjvp
def _standardize_jvp(static: Static, primals: tuple, tangents: tuple) -> tuple[Outputs, Outputs]:
    out, res = standardize_fwd(static, *primals)
    tx, _, t_scale, t_bias, t_eps = tangents
    t = Tangents(tx, t_scale, t_bias, t_eps)
    res_leaves, res_tree = jax.tree.flatten(res)
    t_leaves, t_tree = jax.tree.flatten(t)
    avals = tuple(jax.typeof(v).to_tangent_aval() for v in (out.y, out.offset, out.var))
    t_y, t_offset, t_var = linear_call(TangentRule(static, res_tree, t_tree, avals), res_leaves, t_leaves)
    return out, Outputs(t_y, jnp.zeros_like(out.shift), t_offset, t_var, jnp.zeros_like(out.count))
