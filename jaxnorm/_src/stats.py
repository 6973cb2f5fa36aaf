"""Mean and variance over chosen axes: stable, masked, and merged across devices.

Everything in jaxnorm that needs statistics gets them from :func:`compute_moments`;
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
``shift + offset`` so that :mod:`normalize` can subtract it in two exact steps.

Masks. ``mask`` (True = counts) broadcasts against ``x``; masked values are
replaced by zeros with ``jnp.where`` before any arithmetic, so NaN or inf there
reaches neither the statistics nor their gradients.

Across devices. With ``axis_name``, each device computes its local
``(shift, offset, var, count)`` and the devices exchange them in **one**
``psum`` (four numbers per statistic per device, never the data). Every device
then merges them exactly and identically with Chan et al.'s pairwise formula,
count-weighted (devices may hold different numbers of valid values, so the
global mean is not the mean of per-device means, which is what flax computes)
and relative to a common reference shift, so no cross-device
``E[x^2] - E[x]^2`` appears either. A ``psum`` of ``(n, n*mean, M2 + n*mean^2)``
would also be one collective but reintroduces exactly that cancellation; the
exchange of per-device moments costs the same latency and keeps the merge exact.

Collectives, forward and backward (what the compiled HLO shows; the tests count them):

- ``axis_name`` (``shard_map``, ``pmap``, ``vmap``): **one** all-reduce in the
  forward pass (the moments exchange above) and **one** in the backward pass
  (the fused backward of :mod:`normalize` stacks its per-feature sums into a
  single ``psum``). Both are tiny: O(devices x features) and O(features).
- Sharded ``jax.jit`` without ``axis_name``: XLA partitions the reductions
  itself. The forward has **two** all-reduces, because the two-pass variance
  needs the global ``shift`` before it can reduce ``x - shift`` (XLA combines
  that pass's sums, and the count with a mask, into one), and the backward adds
  **one**: three in a training step, none of them an all-gather of the data.
  That is on an Explicit mesh (``jax.make_mesh``'s default), where x's type
  says the reduced axis is sharded and the shift is the mean. On an Auto mesh
  the sharding is invisible while tracing, so the one-pass shift (the first
  value) is read from the device that holds it: five small all-reduces in the
  forward pass, still no all-gather.
  ``shard_map`` with ``axis_name`` saves one, since each device's own shift is
  good enough locally and the exact merge fixes the rest.

``axis_index_groups`` (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``) makes each group of
indices of ``axis_name`` compute statistics over its own devices only. The
groups must split the indices into disjoint non-empty lists (sizes may differ);
they are applied after the one exchange, so they work under ``vmap`` and
``shard_map`` as well as ``pmap`` and cost no extra collective.

Gradients: the gradient of each device's local loss with respect to its local
input is the gradient of the global loss (the sum of the devices' losses) with
respect to that input, as if the whole batch were on one device; this is what
data-parallel training needs (PyTorch's SyncBatchNorm does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import errors

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
    its output, see ``normalize._row_sums``).
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
    if mask is None and n > 0 and not _split_across_devices(x, axes):
        # The first value of each statistic (see the module docstring), read
        # from a handle that no reduction uses: where XLA sees the slice of
        # the very array a fusion converts to float32, it converts the whole
        # array once for both and writes it to memory.
        first = x if separate else copies(1, x)[0][0]
        shift = lax.stop_gradient(first[tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))].astype(acc))
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


def _split_across_devices(x: Array, axes: Sequence[int]) -> bool:
    """Whether a reduced axis of ``x`` is sharded in its type (sharded jit on an Explicit mesh).

    There the first value lives on one device and slicing it is refused, so the
    shift falls back to the mean (the two-pass, whose reductions XLA turns into
    all-reduces of per-device partial sums).
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None:
        return False
    return any(a < len(spec) and spec[a] is not None for a in axes)


def _finish(local: Moments, axis_name: Any, axis_index_groups: Any) -> Moments:
    if axis_name is None:
        return local
    return merge_across_devices(local, axis_name, axis_index_groups)


def merge_across_devices(local: Moments, axis_name: Any, axis_index_groups: Any = None) -> Moments:
    """Exact count-weighted merge of per-device moments in one ``psum``.

    Chan et al.: with per-device counts n_i, means m_i and variances v_i,
    N = sum n_i, m = sum n_i m_i / N, v = (sum n_i v_i + sum n_i (m_i - m)^2) / N.
    Means are taken relative to one reference shift (the device holding the
    most values) so that differences of large means stay exact.

    The exchange is an all-gather written as a ``psum``: each device writes its
    four numbers per statistic into its own slot of a zero buffer with one slot
    per device, and the sum fills every slot (adding zeros is exact, and
    ``.at[].set`` keeps a device's NaN in its own slot). ``lax.all_gather``
    would move half the bytes, but under ``shard_map`` its result is typed as
    varying over the axis, so the merged statistics could not be returned with
    ``out_specs=P()``; the ``psum`` result is replicated by type. Groups are
    applied after the exchange, by giving the other groups' slots zero
    weight, so ``axis_index_groups`` works under ``vmap`` and ``shard_map`` too
    (``lax.psum`` supports it under ``pmap`` only).
    """
    shape = jnp.broadcast_shapes(local.var.shape, local.count.shape)
    packed = jnp.stack([jnp.broadcast_to(a, shape) for a in local])
    size = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    slots = jnp.zeros((size,) + packed.shape, packed.dtype).at[me].set(packed)
    gathered = lax.psum(slots, axis_name)
    shift, offset, var, n = gathered[:, 0], gathered[:, 1], gathered[:, 2], gathered[:, 3]
    if axis_index_groups is not None:
        groups = errors.check_axis_index_groups("moments", axis_index_groups, axis_name)
        member = jnp.asarray(_membership(groups, size))[me]
        member = jnp.reshape(member, (size,) + (1,) * len(shape))
        shift, offset, var, n = (jnp.where(member, a, 0) for a in (shift, offset, var, n))
    return merge_stacked(Moments(shift, offset, var, n))


def merge_stacked(parts: Moments) -> Moments:
    """Chan et al.'s exact count-weighted merge of moments stacked along axis 0.

    The formula behind :func:`merge_across_devices` (one part per device) and
    :mod:`jaxnorm._src.feature_stats` (a state and a batch, or two states).
    """
    shift, offset, var, n = parts
    total = jnp.sum(n, axis=0)
    weight = n / jnp.maximum(total, 1)
    ref = jnp.argmax(n, axis=0)
    ref_shift = lax.stop_gradient(jnp.take_along_axis(shift, ref[None], axis=0)[0])
    # A device without valid values has weight 0; its delta is zeroed too so a
    # huge reference shift cannot square to inf and turn 0 * inf into NaN.
    delta = jnp.where(n > 0, (shift - ref_shift) + offset, 0)
    mean_delta = jnp.sum(weight * delta, axis=0)
    spread = delta - mean_delta
    merged_var = jnp.sum(weight * (var + spread * spread), axis=0)
    return Moments(ref_shift, mean_delta, merged_var, total)


def _membership(groups: tuple[tuple[int, ...], ...], size: int) -> Any:
    """(size, size) bool NumPy table: row i marks the indices in i's group."""
    table = np.zeros((size, size), bool)
    for g in groups:
        for i in g:
            table[i, list(g)] = True
    return table


def varies_over(x: Array, axis_name: Any) -> bool:
    """Whether ``shard_map``'s type system (``check_vma=True``) marks ``x`` as varying over ``axis_name``.

    False under ``vmap``, ``pmap`` and ``shard_map(check_vma=False)``, which do
    not track this. The attribute moved between JAX versions, hence the lookups.
    """
    vma = varying_axes(x)
    if not vma:
        return False
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(n in vma for n in names)


def varying_axes(x: Any) -> frozenset:
    """The mesh axes over which ``shard_map``'s type system says ``x`` varies (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(vma or ())


def match_replication(cotangent: Array | None, primal: Array | None) -> Array | None:
    """``cotangent`` summed over the mesh axes where it varies but ``primal`` does not.

    Under ``shard_map(check_vma=True)`` a replicated value (a scale, a bias)
    meets per-device data through an implicit broadcast, whose transpose is a
    ``psum``; a ``custom_vjp`` must return its cotangents with the primal's
    type, so it does that sum itself. Elsewhere nothing varies by type and the
    cotangent passes unchanged.
    """
    if cotangent is None or primal is None:
        return cotangent
    extra = varying_axes(cotangent) - varying_axes(primal)
    if not extra:
        return cotangent
    return lax.psum(cotangent, tuple(sorted(extra)))


def sum_over(v: Array, axes: Sequence[int]) -> Array:
    """``jnp.sum(v, axes, keepdims=True)``.

    Measured on XLA:CPU (jax 0.10): a plain reduction of a fused elementwise
    expression is as fast as its ``dot_general``/einsum form for both row and
    column reductions, and the einsum form is slower when its operands must be
    materialized, so this is a plain sum. What costs time there is an
    elementwise intermediate of x's size that feeds two fusions: XLA writes it
    to memory (a fresh allocation, several times the cost of reading x). Hence
    :func:`copies`: every reduction over the data builds its own input.

    Group norm's layout (..., G, S) with S reduced is the other slow case
    there: the reduction over (..., S) runs about 2.5x faster as a reduction
    of the (..., G * S) layout over the leading axes followed by a small
    reduction over S, so that is how it is written when the trailing reduced
    run is short (at most ``SMALL_MINOR`` values), with an
    ``optimization_barrier`` between the two: without it XLA folds the reduce
    of a reduce back into the slow form (group norm's forward statistics,
    15.6 ms instead of 6.6 ms per pass over a (32, 32, 32, 32, 8) float32 x).
    """
    axes = tuple(sorted(axes))
    split = _minor_split(v.shape, axes)
    if split is not None:
        j, k = split
        nd = v.ndim
        lead = tuple(a for a in axes if a < j)
        merged = jnp.reshape(v, v.shape[:j] + (math.prod(v.shape[j:]),))
        part = jnp.sum(merged, lead, keepdims=True)
        # The barrier keeps XLA from merging the two reductions back into
        # the slow one (its simplifier folds a reduce of a reduce).
        part = lax.optimization_barrier(jnp.reshape(part, part.shape[:j] + v.shape[j:]))
        return jnp.sum(part, tuple(range(k, nd)), keepdims=True)
    return jnp.sum(v, axes, keepdims=True)


def _minor_split(shape: tuple[int, ...], axes: Sequence[int]) -> tuple[int, int] | None:
    """``(j, k)`` where :func:`sum_over` splits a reduction on CPU, else None.

    ``shape[k:]`` is the trailing reduced run (at most ``SMALL_MINOR`` values),
    ``shape[j:k]`` the kept axes before it, and some reduced axis lies before ``j``.
    """
    nd = len(shape)
    if not (on_cpu() and len(axes) > 1 and nd - 1 in axes):
        return None
    k = nd - 1
    while k - 1 in axes:
        k -= 1
    j = k
    while j - 1 >= 0 and j - 1 not in axes:
        j -= 1
    if j < k and any(a < j for a in axes) and math.prod(shape[k:]) <= SMALL_MINOR:
        return j, k
    return None


def reduces_trailing(axes: Sequence[int], ndim: int) -> bool:
    """Whether ``axes`` are the last ``len(axes)`` axes: each statistic is one contiguous row."""
    return len(axes) > 0 and tuple(sorted(axes)) == tuple(range(ndim - len(axes), ndim))


SMALL_MINOR = 64


def on_cpu() -> bool:
    """Whether jax compiles for XLA:CPU, where reductions are written as measured there."""
    return jax.default_backend() == "cpu"


def expand_minor(stat: Array, shape: tuple[int, ...], axes: Sequence[int]) -> Array:
    """A statistic broadcast along a short reduced minor axis (see :func:`sum_over`).

    Broadcasting a per-group value along the minor axis inside a fused
    reduction is what makes those reductions slow on XLA:CPU; a statistic
    stored with the minor axis expanded (a small array, passed through
    :func:`copies` so that it stays materialized) only broadcasts along the
    leading axes.
    """
    if _minor_split(shape, axes) is not None and stat.shape[-1] == 1:
        return jnp.broadcast_to(stat, stat.shape[:-1] + (shape[-1],))
    return stat


def copies(n: int, *arrays: Array | None) -> list[tuple[Array | None, ...]]:
    """``n`` sets of handles to the same arrays that XLA will not merge (None passes through).

    On CPU the sets come out of one ``optimization_barrier`` (no data is
    copied), so elementwise work built from different sets is not merged by
    common-subexpression elimination: each consumer recomputes its cheap input
    inside its own fusion instead of reading a materialized full-size
    intermediate. (Sets from separate barriers would be merged again once XLA
    drops the barriers.) Other backends fuse multi-output reductions
    themselves; there every set is the arrays themselves.
    """
    present = [a for a in arrays if a is not None]
    if not present or not on_cpu():
        return [arrays] * n
    flat = iter(lax.optimization_barrier(tuple(present) * n))
    return [tuple(None if a is None else next(flat) for a in arrays) for _ in range(n)]


def sum_across(values: Array, axis_name: Any, axis_index_groups: Any = None) -> Array:
    """Sum over ``axis_name`` (identity when it is None), within groups if given: one ``psum``.

    With groups, each device writes ``values`` into its group's slot of a zero
    buffer (one slot per group), so one ``psum`` sums every group at once and
    each device reads its own group's slot.
    """
    if axis_name is None:
        return values
    if axis_index_groups is None:
        return lax.psum(values, axis_name)
    size = lax.axis_size(axis_name)
    groups = errors.check_axis_index_groups("moments", axis_index_groups, axis_name)
    group_of = [0] * size
    for k, g in enumerate(groups):
        for i in g:
            group_of[i] = k
    mine = jnp.asarray(group_of)[lax.axis_index(axis_name)]
    slots = jnp.zeros((len(groups),) + values.shape, values.dtype).at[mine].set(values)
    return lax.psum(slots, axis_name)[mine]


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
        nor their gradients.
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
    errors.check_floating(fn, x)
    x = jnp.asarray(x)
    red = errors.canonical_axes(fn, "axes", axes, x.shape)
    mask = errors.check_mask(fn, mask, x.shape)
    errors.check_axis_index_groups(fn, axis_index_groups, axis_name)
    m = compute_moments(x, red, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups)
    mean, var = m.mean, m.var
    if not keepdims:
        mean, var = jnp.squeeze(mean, red), jnp.squeeze(var, red)
    return mean, var
