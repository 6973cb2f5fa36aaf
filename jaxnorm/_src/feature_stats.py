"""Streaming data-set statistics: feature scaling and observation normalization.

Normalization in its first sense: bring every input feature to a common scale
with the mean and variance of a whole data set (Keras ``Normalization.adapt``,
scikit-learn's ``StandardScaler.partial_fit``), or of everything an agent has
observed so far (Stable-Baselines' ``VecNormalize``, brax's and acme's running
statistics). :class:`FeatureStats` holds exact streaming moments; the data
arrive in batches, possibly on many devices, and states built on different
shards of a data set merge in any order.

The merge. A batch's moments come from :func:`jaxnorm._src.stats.compute_moments`
(shifted, masked, float32 accumulation, and with ``axis_name`` the exact
count-weighted cross-device merge in one collective: the moments code batch
norm uses). Folding them into the state, and :func:`merge_feature_stats`, is
the pairwise merge of Chan, Golub & LeVeque (1979/1983),

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,

computed by the function that merges devices' moments
(:func:`~jaxnorm._src.stats.merge_stacked`, behind
:func:`~jaxnorm._src.stats.merge_across_devices`), so the formula exists once
in jaxnorm. It never forms
``E[x^2] - E[x]^2`` and merging is associative and commutative up to float
rounding: any order or grouping of batches and shards gives the statistics
of the concatenated data.

Counts: exact to 2^61 per feature without x64. ``count`` is int32 with a
trailing axis of two limbs, ``count[..., 0] * 2**30 + count[..., 1]`` with
the low limb in [0, 2^30): two low limbs add without overflowing int32, and
the carry moves into the high limb (which saturates at 2^31 - 1 instead of
wrapping). A float32 count stops counting at 2^24 (16.7M: one pass over
ImageNet's pixels of a channel, a few minutes of a vectorized RL
environment), after which ``count + batch`` rounds, and a plain int32 wraps
at 2^31. The merge weights ``n_b / n`` are formed in float32 from the limbs
(``hi * 2^30 + lo``, relative error 2^-24), which is all a float32 weight
can hold; the count itself is never rounded. Counts are per feature, so a
mask may hide different values of different features (missing data).
:meth:`FeatureStats.exact_count` reads them as NumPy int64 on the host.
A batch's own count is exact too (static without a mask, an int32 sum with
one); only a masked batch reduced across devices takes its count from the
float32 merge, exact below 2^24 valid values per feature per call.

The mean: float32 plus a residual. ``mean`` is the float32 mean and
``mean_residual`` what rounding it left out (the true mean is
``mean + mean_residual``, a double-float pair kept by an error-free
two-sum). Without it the stored mean is off by up to half its ulp
(4.9e-4 at 1e4), every later batch's ``delta`` is taken against that wrong
mean, and M2 drifts towards the second moment about it; once the counts are
large the rounded mean stops moving and the error stays. For float32 data of
mean 1e4 and std 1e-2 in 1000 batches of 64 (three features), the variance
then ends up more than 5e-3 too large in some feature (the target is
1e-3 relative); with the residual every feature is right to 5e-6
(``tests/test_feature_stats.py`` streams that data both ways and checks
both bounds). The state therefore has four fields where the textbook
streaming state has three (``count``, ``mean``, ``m2``); unpacking gives four
values.
:func:`standardize_features` subtracts both
parts, so ``x - mean`` stays exact near the mean.

Float32 limits that remain: a batch whose weight ``n_b / n`` is below 2^-24
moves the mean and M2 by less than their rounding (its count still counts),
which is the precision float32 statistics have; M2 grows with the count and
overflows float32 only for ``count * var`` above 3e38.

Non-finite batches: a batch with a NaN or inf among its valid values (or
whose merge overflows) leaves the whole state (every feature, every count)
untouched, as batch norm does: one bad observation must not erase a run's
statistics. A feature without valid values in a batch (mask) keeps its own
statistics bit for bit while the others update.

Across devices (``axis_name``): the batch moments are merged across devices
in the one ``psum`` of :func:`~jaxnorm._src.stats.merge_across_devices`, then
folded into the (replicated) state on every device identically; the fold is
local, so an update costs one collective. ``axis_index_groups`` gives each
group its own statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import checks
from jaxnorm._src.axes import Layout, layout
from jaxnorm._src.collectives import merge_stacked
from jaxnorm._src.moments import Moments, compute_moments
from jaxnorm._src.standardize import _center, inverse_std

Array = jax.Array

LIMB_BITS = 30
_LOW = (1 << LIMB_BITS) - 1
_HIGH_MAX = int(np.iinfo(np.int32).max)


class FeatureStats(NamedTuple):
    """Streaming per-feature moments: a pytree that works under jit, vmap, scan and shard_map.

    Four fields, so unpacking gives four values,
    ``count, mean, m2, mean_residual = stats`` (and a checkpoint holds four
    arrays). The usual streaming state (Chan, Golub & LeVeque; Welford) has
    three, ``count``, ``mean`` and ``m2`` with ``var`` derived; the fourth is
    what keeps the variance right at large offsets: without it a float32 ``mean`` is off by
    up to half its ulp, every later batch is merged against that wrong mean,
    and for float32 data of mean 1e4 and std 1e-2 the variance ends up
    more than 5e-3 too large after 1000 batches of 64, against a 1e-3
    target, where with it the error stays below 5e-6
    (``tests/test_feature_stats.py`` checks both; see
    :mod:`jaxnorm._src.feature_stats`). Code that reads only the statistics
    uses ``mean``, :attr:`var` and :meth:`exact_count` and can ignore it.

    Attributes:
      count: int32, feature shape + (2,): values seen per feature, as two
        limbs ``count[..., 0] * 2**30 + count[..., 1]`` (exact to 2^61; see
        :mod:`jaxnorm._src.feature_stats`). Read it with :meth:`exact_count`
        or, as float32, :attr:`num_values`.
      mean: feature shape, float32: mean of the values seen (0 before any).
      m2: feature shape, float32: sum of squared deviations from the mean.
      mean_residual: feature shape, float32: the part of the mean below
        float32 rounding (the exact mean is ``mean + mean_residual``, a
        double-float pair); it keeps the variance exact at large offsets.
        Not needed to read the statistics; :func:`standardize_features`
        subtracts both parts.

    Properties: :attr:`var` (biased, ``m2 / count``; 1 where nothing was
    seen yet, so that standardizing with a fresh state is the identity) and
    :attr:`num_values`.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> stats = jn.update_feature_stats(jn.init_feature_stats(2), jnp.array([[1., 10.], [3., 30.]]))
      >>> stats.mean.tolist(), stats.var.tolist(), stats.exact_count().tolist()
      ([2.0, 20.0], [1.0, 100.0], [2, 2])
      >>> count, mean, m2, mean_residual = stats
      >>> jn.FeatureStats._fields
      ('count', 'mean', 'm2', 'mean_residual')
    """

    count: Array
    mean: Array
    m2: Array
    mean_residual: Array

    @property
    def num_values(self) -> Array:
        """The count as a float of the statistics' dtype (feature shape; exact below 2^24)."""
        return count_as_float(self.count, self.mean.dtype)

    @property
    def var(self) -> Array:
        """Biased variance ``m2 / count`` (feature shape); 1 where the count is 0."""
        n = self.num_values
        return jnp.where(n > 0, self.m2 / jnp.maximum(n, 1), jnp.ones_like(self.m2))

    def exact_count(self) -> np.ndarray:
        """The counts as a NumPy int64 array of the feature shape (on the host: not under jit)."""
        limbs = np.asarray(self.count).astype(np.int64)
        return (limbs[..., 0] << LIMB_BITS) + limbs[..., 1]


def init_feature_stats(feature_shape: int | tuple[int, ...], *, dtype: Any = jnp.float32) -> FeatureStats:
    """Empty statistics: count 0, mean 0, m2 0 (so ``var`` reads 1).

    Args:
      feature_shape: shape of the kept feature axes, e.g. ``(C,)`` or ``C``;
        ``()`` for one statistic over all values (e.g. rewards).
      dtype: floating dtype of ``mean``, ``m2`` and ``mean_residual``.

    Returns:
      :class:`FeatureStats`.

    Raises:
      ValueError: a non-floating ``dtype`` or a bad shape.

    Example:
      >>> import jaxnorm as jn
      >>> stats = jn.init_feature_stats(3)
      >>> stats.mean.shape, stats.count.shape, stats.var.tolist()
      ((3,), (3, 2), [1.0, 1.0, 1.0])
    """
    fn = "init_feature_stats"
    shape = (feature_shape,) if isinstance(feature_shape, (int, np.integer)) else feature_shape
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        shape = None
    if shape is None or any(d < 0 for d in shape) or isinstance(feature_shape, (bool, str)):
        raise ValueError(
            f"{fn}: `feature_shape` must be an int or a tuple of non-negative ints, got "
            f"{feature_shape!r}; pass e.g. `{fn}(64)` or `{fn}((32, 32, 3))`."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{fn}: `dtype` must be a floating dtype, got {jnp.dtype(dtype)}; pass e.g. `dtype=jnp.float32`."
        )
    zeros = jnp.zeros(shape, dtype)
    return FeatureStats(jnp.zeros(shape + (2,), jnp.int32), zeros, zeros, zeros)


def count_as_float(count: Array, dtype: Any) -> Array:
    """``hi * 2^30 + lo`` of the two count limbs, in ``dtype``."""
    return count[..., 0].astype(dtype) * float(1 << LIMB_BITS) + count[..., 1].astype(dtype)


def as_limbs(n: Array) -> Array:
    """Non-negative int32 counts (feature shape) as two limbs (feature shape + (2,))."""
    n = jnp.asarray(n, jnp.int32)
    return jnp.stack([n >> LIMB_BITS, n & _LOW], axis=-1)


def add_counts(a: Array, b: Array) -> Array:
    """Exact sum of two limb counts (feature shape + (2,)); saturates at the largest count."""
    lo = a[..., 1] + b[..., 1]  # both below 2^30: no int32 overflow
    carry = lo >> LIMB_BITS
    over = a[..., 0] > _HIGH_MAX - b[..., 0] - carry
    hi = jnp.where(over, _HIGH_MAX, a[..., 0] + b[..., 0] + carry)
    lo = jnp.where(over, _LOW, lo & _LOW)
    return jnp.stack([hi, lo], axis=-1)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b == s + e`` exactly (Knuth's two-sum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _as_moments(stats: FeatureStats) -> Moments:
    """A state as the core's :class:`Moments`: shift = mean, offset = its residual."""
    n = stats.num_values
    return Moments(stats.mean, stats.mean_residual, stats.m2 / jnp.maximum(n, 1), n)


def _merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s merge of two sets of moments: the core's cross-device merge over a pair."""
    return merge_stacked(jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))


def merged_state(a: FeatureStats, b_moments: Moments, b_count: Array) -> FeatureStats:
    """The state holding a's values and b's (``b_count``: b's exact limb count).

    Also the fold of PreciseBN's exact mode (:func:`jaxnorm._src.batch_norm.fold_exact`).
    """
    m = _merge_moments(_as_moments(a), b_moments)
    mean, residual = _two_sum(m.shift, m.offset)
    new = FeatureStats(add_counts(a.count, b_count), mean, m.var * m.count, residual)
    # Features b adds nothing to keep their state bit for bit (no m2 / n * n round trip).
    empty = b_moments.count <= 0
    return _where(empty, a, new)


def _where(cond: Array, if_true: FeatureStats, if_false: FeatureStats) -> FeatureStats:
    """Per feature (``cond`` of feature shape or scalar), every field of the state."""
    def pick(t: Array, f: Array) -> Array:
        c = jnp.reshape(cond, jnp.shape(cond) + (1,) * (t.ndim - jnp.ndim(cond))) if t.ndim > jnp.ndim(cond) else cond
        return jnp.where(c, t, f).astype(f.dtype)

    return FeatureStats(*(pick(t, f) for t, f in zip(if_true, if_false, strict=True)))


def check_feature_stats(
    fn: str, stats: Any, feature_shape: tuple[int, ...] | None = None, x_shape: Any = None, axis: Any = None,
    name: str = "stats", like: str | None = None,
) -> None:
    """Raises unless ``stats`` is a :class:`FeatureStats` whose fields have ``feature_shape``."""
    if not isinstance(stats, FeatureStats):
        raise ValueError(
            f"{fn}: `{name}` must be a jn.FeatureStats, got {type(stats).__name__}; create it with "
            f"`jn.init_feature_stats(feature_shape)`."
        )
    shape = tuple(np.shape(stats.mean)) if feature_shape is None else tuple(feature_shape)
    expected = {"mean": shape, "m2": shape, "mean_residual": shape, "count": shape + (2,)}
    for field, want in expected.items():
        got = tuple(np.shape(getattr(stats, field)))
        if got != want:
            if like is not None:
                raise ValueError(
                    f"{fn}: `{name}.{field}` has shape {got}, but `{like}.{field}` has shape {want}; "
                    f"merge states of the same feature shape (made by `jn.init_feature_stats` with one shape)."
                )
            where = (
                f"`x` of shape {tuple(x_shape)} with `axis`={axis!r} keeps features of shape {shape}"
                if x_shape is not None else f"`{name}.mean` has shape {tuple(np.shape(stats.mean))}"
            )
            raise ValueError(
                f"{fn}: `{name}.{field}` has shape {got}, but {where}, so it needs {want}; create "
                f"the state with `jn.init_feature_stats({shape})` or pass the `axis` it was made for."
            )
    if jnp.result_type(stats.count) != jnp.int32:
        raise ValueError(
            f"{fn}: `{name}.count` must be int32 (two limbs), got {jnp.result_type(stats.count)}; "
            f"create the state with `jn.init_feature_stats`."
        )
    for field in ("mean", "m2", "mean_residual"):
        checks.check_floating(fn, getattr(stats, field), f"{name}.{field}")


def _batch_count(m: Moments, x: Array, lay: Layout, mask: Array | None, axis_name: Any, groups: Any) -> Array:
    """The batch's exact count per feature as limbs (see the module docstring)."""
    fs = lay.feature_shape
    if mask is None:
        n = lay.values_per_feature
        if axis_name is None:
            sizes = None
        elif groups is None:
            n *= lax.axis_size(axis_name)
            sizes = None
        else:
            group_size = {i: len(g) for g in groups for i in g}
            sizes = [n * group_size[i] for i in range(len(group_size))]
        if sizes is None:
            limbs = jnp.asarray([n >> LIMB_BITS, n & _LOW], jnp.int32)
        else:
            table = jnp.asarray([[s >> LIMB_BITS, s & _LOW] for s in sizes], jnp.int32)
            limbs = table[lax.axis_index(axis_name)]
        return jnp.broadcast_to(limbs, fs + (2,))
    if axis_name is None:
        n = jnp.sum(jnp.broadcast_to(mask, x.shape), lay.reduction_axes, dtype=jnp.int32)
    else:
        n = jnp.round(jnp.broadcast_to(m.count, m.var.shape)).astype(jnp.int32)
    return as_limbs(jnp.reshape(n, fs))


def update_feature_stats(
    stats: FeatureStats,
    x: Array,
    *,
    axis: int | tuple[int, ...] = -1,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> FeatureStats:
    """Folds a batch into streaming per-feature statistics (Chan, Golub & LeVeque's merge).

    Shapes: N batch, C features, ``...`` other axes. ``axis`` names the kept
    feature axes, as batch norm's does; every other axis is reduced (for
    images (N, H, W, C) with ``axis=-1``, one statistic per channel over
    batch and space; ``axis=(1, 2, 3)`` gives one per pixel and channel;
    ``axis=()`` one over everything).

    The statistics equal those of all batches so far concatenated, whatever
    the batch sizes, to float32 rounding, at any offset; counts are exact
    (see :mod:`jaxnorm._src.feature_stats`).

    Args:
      stats: :class:`FeatureStats` of the feature shape.
      x: (N, ..., C) floating array (any float dtype; accumulation in at
        least float32).
      axis: kept feature axis or axes.
      mask: optional bool, broadcasts to ``x`` (e.g. (N, 1) to drop rows:
        padding, finished episodes); True marks values that count. Masked
        values (NaN included) are ignored; a feature without valid values
        keeps its statistics.
      axis_name: named axis (``shard_map``, ``pmap``, ``vmap``) whose
        devices each hold part of the batch: every device gets the
        statistics of the whole batch, for one collective.
      axis_index_groups: groups of ``axis_name`` indices that pool their
        batches among themselves, e.g. ``[[0, 1], [2, 3]]``.

    Returns:
      New :class:`FeatureStats`; ``stats`` itself when the batch holds a
      non-finite valid value (every feature and count unchanged).

    Raises:
      ValueError: non-floating ``x``, bad ``axis``, a state of another
        feature shape, a mask that does not broadcast, or bad
        ``axis_index_groups``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxnorm as jn
      >>> data = jax.random.normal(jax.random.key(0), (1000, 3)) * 0.01 + 1e4
      >>> stats = jn.init_feature_stats(3)
      >>> for batch in jnp.split(data, 10):
      ...     stats = jn.update_feature_stats(stats, batch)
      >>> ref = np.asarray(data, np.float64).var(0)
      >>> bool(np.allclose(stats.var, ref, rtol=1e-4)), stats.exact_count().tolist()
      (True, [1000, 1000, 1000])
    """
    fn = "update_feature_stats"
    checks.check_floating(fn, x)
    x = jnp.asarray(x)
    lay = layout(fn, x.shape, axis)
    check_feature_stats(fn, stats, lay.feature_shape, x.shape, axis)
    mask = checks.check_mask(fn, mask, x.shape)
    groups = checks.check_axis_index_groups(fn, axis_index_groups, axis_name)
    m = compute_moments(x, lay.reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=groups)
    dtype = stats.mean.dtype
    batch = Moments(*(jnp.reshape(jnp.broadcast_to(a, m.var.shape), lay.feature_shape).astype(dtype) for a in m))
    new = merged_state(stats, batch, _batch_count(m, x, lay, mask, axis_name, groups))
    ok = jnp.all(jnp.isfinite(batch.mean) & jnp.isfinite(batch.var) & jnp.isfinite(new.mean) & jnp.isfinite(new.m2))
    return jax.tree.map(lax.stop_gradient, _where(ok, new, stats))


def merge_feature_stats(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """The statistics of the values behind ``a`` and ``b`` together (Chan et al.'s pairwise merge).

    Associative and commutative up to float rounding: states built on shards
    of a data set (other hosts, other processes, other epochs) merge in any
    order and grouping to the statistics of the whole; counts add exactly.
    A feature empty in one state takes the other's statistics unchanged.

    Args:
      a, b: :class:`FeatureStats` of the same feature shape and dtype.

    Returns:
      :class:`FeatureStats`.

    Raises:
      ValueError: states of different shapes or dtypes.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> x = jnp.arange(12.0).reshape(6, 2)
      >>> a = jn.update_feature_stats(jn.init_feature_stats(2), x[:2])
      >>> b = jn.update_feature_stats(jn.init_feature_stats(2), x[2:])
      >>> merged = jn.merge_feature_stats(a, b)
      >>> merged.mean.tolist(), bool(jnp.allclose(merged.var, x.var(0))), merged.exact_count().tolist()
      ([5.0, 6.0], True, [6, 6])
    """
    fn = "merge_feature_stats"
    check_feature_stats(fn, a, name="a")
    check_feature_stats(fn, b, tuple(np.shape(a.mean)), name="b", like="a")
    if jnp.result_type(a.mean) != jnp.result_type(b.mean):
        raise ValueError(
            f"{fn}: `a` holds {jnp.result_type(a.mean)} statistics and `b` {jnp.result_type(b.mean)}; "
            f"cast one with `jax.tree.map(lambda v: v.astype(...), b)` (keeping `count` int32) or "
            f"create both with the same `dtype`."
        )
    merged = merged_state(a, _as_moments(b), b.count)
    # A state that saw nothing takes the other bit for bit (b empty is handled in merged_state).
    return _where(a.num_values <= 0, b, merged)


def _check_clip(fn: str, clip: Any) -> None:
    if clip is None or isinstance(clip, jax.core.Tracer):
        return
    try:
        value = np.asarray(clip, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if value is None or value.ndim != 0 or not value > 0 or isinstance(clip, bool):
        raise ValueError(
            f"{fn}: `clip` must be a positive number or None, got {clip!r}; outputs are clipped "
            f"to [-clip, clip], e.g. `clip=10.0` (Stable-Baselines' VecNormalize default), or "
            f"`clip=None` for no clipping."
        )


def _feature_view(fn: str, x: Any, stats: FeatureStats, axis: Any, epsilon: Any) -> tuple[Array, Layout, Any]:
    checks.check_floating(fn, x)
    checks.check_epsilon(fn, epsilon)
    x = jnp.asarray(x)
    lay = layout(fn, x.shape, axis)
    check_feature_stats(fn, stats, lay.feature_shape, x.shape, axis)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), stats.mean.dtype)
    return x, lay, acc


def standardize_features(
    x: Array,
    stats: FeatureStats,
    *,
    axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-8,
    clip: float | None = None,
) -> Array:
    """``(x - mean) / sqrt(var + epsilon)``, clipped to ``[-clip, clip]``: standardized features.

    Keras ``Normalization``, scikit-learn's ``StandardScaler.transform`` and
    Stable-Baselines' ``VecNormalize`` observations (``clip=10.0`` there,
    brax's ``max_abs_value``). A fresh state (count 0) has mean 0 and var 1,
    so this is then the identity (up to ``epsilon``). A constant feature maps
    to 0.

    Args:
      x: (N, ..., C) floating array.
      stats: :class:`FeatureStats` of the features kept by ``axis``.
      axis: kept feature axis or axes, as for :func:`update_feature_stats`.
      epsilon: added to the variance (Stable-Baselines' default 1e-8).
      clip: optional positive bound on the outputs' magnitude.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: non-floating ``x``, a state of another feature shape, a
        negative ``epsilon``, or a non-positive ``clip``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> x = jnp.array([[0., 100.], [2., 300.]])
      >>> stats = jn.update_feature_stats(jn.init_feature_stats(2), x)
      >>> jn.standardize_features(x, stats).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> jn.standardize_features(jnp.array([[9., 200.]]), stats, clip=5.0).tolist()
      [[5.0, 0.0]]
    """
    fn = "standardize_features"
    _check_clip(fn, clip)
    x, lay, acc = _feature_view(fn, x, stats, axis, epsilon)
    shape = lay.broadcast_shape
    mean, residual, var = (jnp.reshape(a, shape).astype(acc) for a in (stats.mean, stats.mean_residual, stats.var))
    y = _center(x, mean, residual, acc) * inverse_std(var, epsilon)
    if clip is not None:
        y = jnp.clip(y, -clip, clip)
    return y.astype(x.dtype)


def unstandardize_features(
    y: Array,
    stats: FeatureStats,
    *,
    axis: int | tuple[int, ...] = -1,
    epsilon: float = 1e-8,
) -> Array:
    """``y * sqrt(var + epsilon) + mean``: the inverse of :func:`standardize_features` (without clip).

    For models trained on standardized targets (regression targets, value
    functions with normalized returns): their outputs back in data units.

    Args:
      y: (N, ..., C) floating array in standardized units.
      stats: :class:`FeatureStats` of the features kept by ``axis``.
      axis: kept feature axis or axes.
      epsilon: the ``epsilon`` used to standardize.

    Returns:
      Array of y's shape and dtype.

    Raises:
      ValueError: non-floating ``y``, a state of another feature shape or a
        negative ``epsilon``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> x = jnp.array([[0., 100.], [2., 300.]])
      >>> stats = jn.update_feature_stats(jn.init_feature_stats(2), x)
      >>> jn.unstandardize_features(jn.standardize_features(x, stats), stats).tolist()
      [[0.0, 100.0], [2.0, 300.0]]
    """
    fn = "unstandardize_features"
    y, lay, acc = _feature_view(fn, y, stats, axis, epsilon)
    shape = lay.broadcast_shape
    mean, residual, var = (jnp.reshape(a, shape).astype(acc) for a in (stats.mean, stats.mean_residual, stats.var))
    x = (y.astype(acc) * jnp.sqrt(var + epsilon) + residual) + mean
    return x.astype(y.dtype)
