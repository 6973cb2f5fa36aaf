"""Mean and variance over chosen axes: stable, masked, float32 accumulation.

Everything in jaxnorm that needs statistics gets them from :func:`compute_moments`
(or, fused with a later pass over the data, :func:`moments_and_copies`); no other
file reduces ``x`` for a mean or a variance. The cross-device merge is
:mod:`jaxnorm._src.collectives`; the XLA:CPU handles (``copies``, ``sum_over``,
``expand_minor``) are :mod:`jaxnorm._src.lowering`.
no other file reduces ``x`` for a mean or a variance.

Numerics. Statistics accumulate in ``promote_types(x.dtype, float32)``. The
variance is a *shifted* one: with ``shift`` a value close to the mean (its
gradient stopped), the data pass reduces ``d = x - shift`` to ``offset = mean(d)``
and ``mean(d**2)``, and ``var = mean(d**2) - offset**2`` (Chan, Golub & LeVeque
1983). Without a mask, ``shift`` is the first value of each statistic: one pass
over the data instead of two (on CPU a whole read of x, about 30% of group
norm's forward). Its rounding error relative to the variance is
``eps * (1 + z**2)`` where ``z`` is that value's distance from the mean in
standard deviations, and no value of n lies more than ``sqrt(n - 1)``
standard deviations from their mean (Samuelson's inequality), so even an
extreme first value costs at most ``n * eps``, the order of the float32 sum's
own error; typical data (``|z|`` of a few) keep nearly every digit. With a
mask the first value may be hidden (NaN allowed there), so ``shift`` is the
masked mean from one more pass, the classic corrected two-pass. The one-pass
``E[x^2] - E[x]^2`` (flax's default) cancels catastrophically at large offsets,
and a plain two-pass without ``offset`` leaves the mean's rounding error in
the variance (about 1% for mean 1e4, std 1e-2 in float32). The mean is kept as
``shift + offset`` so that :mod:`standardize` can subtract it in two exact steps.

Masks. ``mask`` (True = counts) broadcasts against ``x``; masked values are
replaced by zeros with ``jnp.where`` before any arithmetic, so NaN or inf there
reaches neither the statistics nor their gradients.

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_axis_index_groups, check_floating, check_mask
from jaxnorm._src.collectives import merge_across_devices, split_across_devices
from jaxnorm._src.lowering import copies, expand_minor, sum_over

Array = jax.Array


class Moments(NamedTuple):
    """Statistics of ``x`` over reduced axes, shaped like ``x`` with those axes kept as 1.

    ``mean == shift + offset``; ``shift`` carries no gradient. For uncentred
    moments (RMS norm) ``shift`` and ``offset`` are zero and ``var`` holds the mean
    square. ``count`` is the number of values (over all devices) behind each
    statistic, in the accumulation dtype; it broadcasts against ``var``.
    """

    shift: Array
    offset: Array
    var: Array
    count: Array

    @property
    def mean(self) -> Array:
        return self.shift + self.offset


def accumulation_dtype(dtype: Any) -> Any:
    """float32 for half-precision and float32 inputs, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def compute_moments(
    x: Array,
    axes: Sequence[int],
    *,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> Moments:
    """Shifted moments of ``x`` over ``axes`` (non-negative, sorted), kept as size 1.

    Args:
      x: (...) floating array.
      axes: axes to reduce.
      mask: optional bool array broadcasting to ``x.shape``; True marks values that count.
      center: if False, return the mean square in ``var`` (``shift == offset == 0``).
      axis_name: also reduce over this named (device or vmap) axis.
      axis_index_groups: groups of axis indices that reduce among themselves.

    Returns:
      :class:`Moments` with arrays of shape ``x.shape`` with ``axes`` set to 1.
    """
    return moments_and_copies(
        x, axes, mask=mask, center=center, axis_name=axis_name, axis_index_groups=axis_index_groups,
    )[0]


def moments_and_copies(
    x: Array,
    axes: Sequence[int],
    *,
    mask: Array | None = None,
    center: bool = True,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    extra: int = 0,
    separate: bool = True,
) -> tuple[Moments, list[tuple[Array | None, Array | None]]]:
    """:func:`compute_moments` plus ``extra`` more ``(x, mask)`` sets from the same :func:`copies`.

    A caller that reads x again (the normalized output) takes its handles from
    the same barrier, so that XLA cannot merge its elementwise work (e.g. the
    conversion of bfloat16 x to float32) with that of the reductions and
    materialize it. ``separate=False`` reads x itself everywhere, for a
    caller whose one fusion consumes the statistics (a row's reductions and
    its output, see ``standardize.row_backward``).
    """
    acc = accumulation_dtype(x.dtype)
    axes = tuple(axes)
    n = 1
    for a in axes:
        n *= x.shape[a]
    if mask is not None:
        count = jnp.sum(jnp.broadcast_to(mask, x.shape), axes, keepdims=True, dtype=acc)
    else:
        count = jnp.full((1,) * x.ndim, n, acc)
    denom = jnp.maximum(count, 1)

    def mean_of(v: Array) -> Array:
        return sum_over(v, axes) / denom

    def values(xi: Array, mi: Array | None, si: Array | None = None) -> Array:
        v = xi.astype(acc) if si is None else xi.astype(acc) - si
        return v if mi is None else jnp.where(mi, v, 0)

    # Each reduction over the data rebuilds its own input (see sum_over).
    n_sets = extra + (1 if not center else 3)
    sets = copies(n_sets, x, mask) if separate else [(x, mask)] * n_sets
    mine, rest = sets[: len(sets) - extra], sets[len(sets) - extra:]
    if not center:
        zero = jnp.zeros_like(count)
        v = values(*mine[0])
        return _finish(Moments(zero, zero, mean_of(v * v), count), axis_name, axis_index_groups), rest
    if mask is None and n > 0 and not split_across_devices(x, axes):
        # The first value of each statistic (see the module docstring), read
        # from a handle that no reduction uses: where XLA sees the slice of
        # the very array a fusion converts to float32, it converts the whole
        # array once for both and writes it to memory.
        first = x if separate else copies(1, x)[0][0]
        first_values = first[tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))]
        shift = lax.stop_gradient(first_values.astype(acc))
    else:
        shift = lax.stop_gradient(mean_of(values(*mine[0])))
    # One handle of the shift per reduction too: a shared one is broadcast to
    # x's full size and written to memory.
    shift_full = expand_minor(shift, x.shape, axes)
    (shift_1,), (shift_2,) = copies(2, shift_full) if separate else [(shift_full,)] * 2
    offset = mean_of(values(*mine[1], shift_1))
    d = values(*mine[2], shift_2)
    var = jnp.maximum(mean_of(d * d) - offset * offset, 0)
    return _finish(Moments(shift, offset, var, count), axis_name, axis_index_groups), rest


def _finish(local: Moments, axis_name: Any, axis_index_groups: Any) -> Moments:
    if axis_name is None:
        return local
    return merge_across_devices(local, axis_name, axis_index_groups)


def moments(
    x: Array,
    axes: int | Sequence[int],
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    keepdims: bool = False,
) -> tuple[Array, Array]:
    """Mean and biased variance of ``x`` over ``axes``, numerically stable.

    Statistics accumulate in at least float32 whatever ``x``'s dtype, with a
    shifted algorithm (see the module docstring): a float32 input with mean 1e4 and
    standard deviation 1e-2 keeps its variance to well under 1%, where
    ``E[x^2] - E[x]^2`` loses every digit.

    Args:
      x: (...) floating array.
      axes: axis or axes to reduce (negative values count from the end).
      mask: optional bool array broadcasting to ``x.shape``; True marks values
        that count. Masked values (NaN included) reach neither the statistics
        nor their gradients. A mask of lower rank than x must fit it one way
        only. A statistic without any valid value is mean 0, variance 0.
      axis_name: also reduce over this named axis (``shard_map``, ``pmap``,
        ``vmap(axis_name=...)``): count-weighted and exact (Chan et al.'s
        merge of per-device moments), one all-reduce forward; its gradient
        (autodiff of that all-reduce) is one more.
      axis_index_groups: reduce only within these groups of indices of
        ``axis_name`` (disjoint, non-empty, together every index once).
      keepdims: keep the reduced axes with size 1.

    Returns:
      ``(mean, var)``: x's shape without ``axes`` (or with them as 1), dtype
      ``promote_types(x.dtype, float32)``.

    Raises:
      ValueError: non-floating ``x``, bad ``axes``, a mask that does not
        broadcast, or ``axis_index_groups`` that do not split the axis.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jnp.array([[1., 2.], [3., 6.]])
      >>> mean, var = jn.moments(x, 0)
      >>> mean.tolist(), var.tolist()
      ([2.0, 4.0], [1.0, 4.0])
      >>> # the same statistics with the rows on two "devices" of a named axis:
      >>> mean, var = jax.vmap(lambda r: jn.moments(r, 0, axis_name="d"), axis_name="d")(x[:, None])
      >>> mean[0].tolist(), var[0].tolist()
      ([2.0, 4.0], [1.0, 4.0])
    """
    fn = "moments"
    x = jnp.asarray(check_floating(fn, x))
    red = canonical_axes(fn, "axes", axes, x.shape)
    mask = check_mask(fn, mask, x.shape)
    check_axis_index_groups(fn, axis_index_groups, axis_name)
    m = compute_moments(x, red, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    mean, var = m.mean, m.var
    if not keepdims:
        mean, var = jnp.squeeze(mean, red), jnp.squeeze(var, red)
    return mean, var
