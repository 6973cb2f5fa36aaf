"""Batch normalization over explicit state (Ioffe & Szegedy 2015).

Training (Algorithm 1) normalizes each feature by the mean and biased variance
of the mini-batch and folds those statistics into :class:`BatchStats`;
evaluation (Algorithm 2) normalizes with the running statistics instead.

Running-average policies (``average=``):

- ``"ema"``: ``new = momentum * old + (1 - momentum) * batch`` (flax's direction;
  PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).
- ``"cumulative"``: the plain mean over every batch so far (PyTorch's
  ``momentum=None``), ``new = old + (batch - old) / (count + 1)``.

``unbiased=True`` folds ``m/(m-1)`` times the batch variance into the running
variance (the paper's Algorithm 2, PyTorch's behaviour); normalization during
training always uses the biased batch variance.

A batch with any non-finite statistic, or with no valid value for some feature,
leaves every feature and the count unchanged: one NaN batch must not erase a
training run's statistics.

Ghost batches (``ghost_batch_size=k``) and plain batches share one training
path: :func:`batch_view` sees ``x`` as ``(G, N // G, ...)`` (G = 1 without ghost
batches, a free reshape), :func:`batch_standardize` normalizes each group with
its own statistics, and :func:`fold_batch` folds the mean of the groups'
statistics into the state. :mod:`batch_renorm` reuses all three.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm._src import errors, precise_bn
from jaxnorm._src.normalize import normalize, standardize
from jaxnorm._src.stats import Moments

Array = jax.Array

AVERAGES = ("ema", "cumulative")


class BatchStats(NamedTuple):
    """Running statistics of batch norm: a pytree that works under jit, vmap and scan.

    Attributes:
      mean: feature shape, float32: running mean.
      var: feature shape, float32: running variance.
      count: (), int32: batches accumulated; saturates at the dtype's maximum.
    """

    mean: Array
    var: Array
    count: Array


def init_batch_stats(feature_shape: int | tuple[int, ...], *, dtype: Any = jnp.float32) -> BatchStats:
    """Fresh running statistics: mean 0, var 1, count 0.

    Evaluating before any training step is safe: it returns ``x / sqrt(1 + eps)``
    (times scale, plus bias).

    Args:
      feature_shape: shape of the kept feature axes, e.g. ``(C,)`` or ``C``.
      dtype: dtype of ``mean`` and ``var``.

    Returns:
      :class:`BatchStats`.

    Example:
      >>> import jaxnorm as jn
      >>> stats = jn.init_batch_stats(4)
      >>> stats.mean.shape, int(stats.count)
      ((4,), 0)
    """
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return BatchStats(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32))


class Layout(NamedTuple):
    """Where the features of ``x`` are, for a given ``axis``."""

    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    broadcast_shape: tuple[int, ...]  # x's rank, 1 on reduced axes
    values_per_feature: int


def layout(fn: str, x: Array, axis: Any) -> Layout:
    """Splits x's axes into kept feature axes (``axis``) and reduced ones."""
    feature_axes = errors.canonical_axes(fn, "axis", axis, x.shape)
    reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    broadcast_shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    per_feature = math.prod(x.shape[a] for a in reduction_axes)
    return Layout(feature_axes, reduction_axes, feature_shape, broadcast_shape, per_feature)


def check_inputs(fn: str, x: Any, stats: BatchStats, scale: Any, bias: Any, axis: Any, mask: Any) -> tuple[Array, Layout, Array | None]:
    """The checks shared by batch_norm and batch_renorm; returns x, its layout and the mask."""
    errors.check_floating(fn, x)
    x = jnp.asarray(x)
    lay = layout(fn, x, axis)
    errors.check_stats_shape(fn, stats, lay.feature_shape, x.shape, axis)
    errors.check_param_shape(fn, "scale", scale, [lay.feature_shape], x.shape)
    errors.check_param_shape(fn, "bias", bias, [lay.feature_shape], x.shape)
    mask = errors.check_mask(fn, mask, x.shape)
    return x, lay, mask


def as_broadcast(value: Array | None, lay: Layout) -> Array | None:
    return None if value is None else jnp.reshape(value, lay.broadcast_shape)


def unbias(var: Array, count: Array) -> Array:
    """``m/(m-1)`` times a biased variance of ``m`` values (Bessel; unchanged for m <= 1)."""
    return var * count / jnp.maximum(count - 1, 1)


def update_stats(
    stats: BatchStats,
    batch_mean: Array,
    batch_var: Array,
    batch_count: Array,
    *,
    momentum: Any,
    average: str,
    unbiased: bool,
) -> BatchStats:
    """Folds one batch's statistics (feature shape) into the running ones.

    Args:
      stats: running statistics.
      batch_mean, batch_var: the batch's mean and biased variance, feature shape.
      batch_count: values behind each statistic (broadcasts to feature shape).
      momentum: weight on the old value for ``average="ema"``.
      average: ``"ema"`` or ``"cumulative"``.
      unbiased: fold ``m/(m-1)`` times the batch variance.

    Returns:
      New :class:`BatchStats`, in the dtypes of ``stats``; unchanged when the
      batch has a non-finite statistic or a feature without valid values.
    """
    if unbiased:
        batch_var = unbias(batch_var, batch_count)
    if average == "ema":
        new_mean = momentum * stats.mean + (1 - momentum) * batch_mean
        new_var = momentum * stats.var + (1 - momentum) * batch_var
    else:
        step = 1.0 / (stats.count.astype(batch_mean.dtype) + 1)
        new_mean = stats.mean + (batch_mean - stats.mean) * step
        new_var = stats.var + (batch_var - stats.var) * step
    ok = jnp.all(jnp.isfinite(batch_mean) & jnp.isfinite(batch_var) & (batch_count > 0))
    limit = jnp.iinfo(stats.count.dtype).max
    new_count = jnp.where(stats.count < limit, stats.count + 1, stats.count)
    return BatchStats(
        jnp.where(ok, new_mean, stats.mean).astype(stats.mean.dtype),
        jnp.where(ok, new_var, stats.var).astype(stats.var.dtype),
        jnp.where(ok, new_count, stats.count).astype(stats.count.dtype),
    )


class BatchView(NamedTuple):
    """``x`` as ``(G, N // G, ...)``: G consecutive ghost batches (G = 1 without them).

    Every batch-statistics path reduces this view, so a plain batch is the
    one-group case of ghost batches and both share one code path. Adding a
    leading axis of size 1 is a free reshape.
    """

    x: Array
    mask: Array | None
    axes: tuple[int, ...]  # reduced axes of the view: every axis but 0 and the features
    stats_shape: tuple[int, ...]  # running statistics reshaped to broadcast against the view


def batch_view(x: Array, lay: Layout, mask: Array | None, ghost_batch_size: int | None) -> BatchView:
    """Splits axis 0 of ``x`` (and of ``mask``) into ghost batches of ``ghost_batch_size``."""
    k = ghost_batch_size
    groups = 1 if k is None else x.shape[0] // k
    xv = x[None] if k is None else jnp.reshape(x, (groups, k) + x.shape[1:])
    if mask is not None:
        mask = jnp.reshape(mask, (1,) * (x.ndim - mask.ndim) + mask.shape)
        if k is None or mask.shape[0] == 1:
            mask = mask[None]
        else:
            mask = jnp.reshape(mask, (groups, k) + mask.shape[1:])
    axes = tuple(a + 1 for a in lay.reduction_axes)
    return BatchView(xv, mask, axes, (1,) + lay.broadcast_shape)


def batch_standardize(
    fn: str,
    x: Array,
    lay: Layout,
    mask: Array | None,
    scale: Array | None,
    bias: Array | None,
    *,
    axis: Any,
    epsilon: float,
    axis_name: Any,
    axis_index_groups: Any,
    ghost_batch_size: Any,
    dtype: Any,
) -> tuple[Array, Moments, BatchView]:
    """Algorithm 1 of batch norm (per ghost batch): ``y = x_hat * scale + bias`` in the view's shape.

    Args:
      scale, bias: optional, feature shape; both None give ``x_hat`` (batch
        renorm corrects it before its own affine map).
      dtype: dtype of ``y``.

    Returns:
      ``(y, moments, view)``: ``y`` shaped like ``view.x`` (reshape it to
      ``x.shape``), moments of shape ``(G, 1, ...)`` with the features kept.
    """
    per_example = lay.values_per_feature // max(x.shape[0], 1) if 0 in lay.reduction_axes else 1
    ghost_batch_size = errors.check_ghost_batch_size(
        fn, ghost_batch_size, x.shape, lay.feature_axes, per_example, axis_name
    )
    errors.check_axis_index_groups(fn, axis_index_groups, axis_name)
    if axis_name is None:
        # With a named axis the other devices supply the rest of the batch.
        errors.check_enough_values(fn, lay.values_per_feature, x.shape, axis)
    view = batch_view(x, lay, mask, ghost_batch_size)
    y, m = standardize(
        view.x, view.axes, epsilon=epsilon, mask=view.mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        scale=view_param(scale, view), bias=view_param(bias, view), dtype=dtype,
    )
    return y, m, view


def view_param(value: Array | None, view: BatchView) -> Array | None:
    """A feature-shaped parameter or statistic, shaped to broadcast against the view."""
    return None if value is None else jnp.reshape(value, view.stats_shape)


def fold_batch(
    stats: BatchStats,
    m: Moments,
    lay: Layout,
    *,
    momentum: Any,
    average: str,
    unbiased: bool,
) -> BatchStats:
    """Folds the ghost batches' moments (shape ``(G, 1, ...)``) into the running statistics.

    The batch contributes the plain mean over its groups of each group's mean
    and variance (each variance made unbiased with its own count first, when
    asked); groups without a valid value (masks) are left out of the mean, and
    a feature without any valid group leaves the state unchanged. With G = 1
    this is the batch's own mean and variance.
    """
    count = jnp.broadcast_to(m.count, m.var.shape)
    var = unbias(m.var, count) if unbiased else m.var
    valid = count > 0
    groups = jnp.sum(valid, axis=0)
    mean_over_groups = lambda a: jnp.sum(jnp.where(valid, a, 0), axis=0) / jnp.maximum(groups, 1)  # noqa: E731
    feature = lambda a: jnp.reshape(a, lay.feature_shape)  # noqa: E731
    new_stats = update_stats(
        stats, feature(mean_over_groups(m.mean)), feature(mean_over_groups(var)), feature(groups),
        momentum=momentum, average=average, unbiased=False,
    )
    return jax.tree.map(jax.lax.stop_gradient, new_stats)


def evaluate(
    x: Array, stats: BatchStats, scale: Array | None, bias: Array | None, lay: Layout, epsilon: float, dtype: Any
) -> Array:
    """Algorithm 2: normalize by the running statistics (all feature-shaped)."""
    shape = lay.broadcast_shape
    return normalize(
        x, jnp.reshape(stats.mean, shape), jnp.reshape(stats.var, shape),
        as_broadcast(scale, lay), as_broadcast(bias, lay), epsilon=epsilon, dtype=dtype,
    )


def check_options(fn: str, training: Any, average: str | None = None) -> bool:
    training = errors.check_static_bool(fn, "training", training)
    if average is not None:
        errors.check_choice(fn, "average", average, AVERAGES)
    return training


def batch_norm(
    x: Array,
    stats: BatchStats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    axis: int | tuple[int, ...] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    average: str = "ema",
    unbiased: bool = False,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    dtype: Any = None,
) -> tuple[Array, BatchStats]:
    """Batch normalization (Ioffe & Szegedy 2015, Algorithms 1 and 2).

    Shapes: N batch, C features, ``...`` spatial axes. ``axis`` names the kept
    feature axes; every other axis is reduced. Channels-last ``(N, ..., C)`` uses
    the default ``axis=-1``; PyTorch's BatchNorm1d/2d/3d layouts ``(N, C)``,
    ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)`` use ``axis=1``.

    Training: ``y = scale * (x - mu_B) / sqrt(sigma2_B + eps) + bias`` with the
    batch mean and biased variance over the reduced axes, and the running
    statistics updated by ``average``. Evaluation: the same map with the running
    statistics; ``stats`` comes back unchanged. During a PreciseBN pass
    (:func:`jaxnorm.recalibrate`) the running statistics average cumulatively,
    whatever ``average`` says.

    Ghost batches (Hoffer, Hubara & Soudry 2017): with ``ghost_batch_size=k``,
    training splits axis 0 into ``N // k`` consecutive groups of ``k`` examples
    and normalizes each with its own statistics, as if it were a batch of its
    own; the running statistics take the plain mean of the groups' means and
    variances. This keeps the noise of small-batch statistics (a regularizer)
    while the rest of the step uses a large batch. Evaluation ignores it.

    Args:
      x: (N, ..., C) or any layout, floating (bfloat16/float16 allowed: statistics
        in float32, output in x's dtype).
      stats: :class:`BatchStats` of the feature shape.
      scale, bias: optional (feature shape) gamma and beta.
      training: static Python bool.
      axis: kept feature axis or axes.
      momentum: weight on the old running value, ``new = momentum * old +
        (1 - momentum) * batch`` (flax's convention). PyTorch's ``momentum=0.1``
        is ``momentum=0.9`` here.
      epsilon: added to the variance.
      average: ``"ema"`` or ``"cumulative"`` (PyTorch's ``momentum=None``).
      unbiased: update the running variance with ``m/(m-1)`` times the batch's
        (per ghost batch, with its own m).
      mask: bool, broadcasts to ``x`` (e.g. (N, 1) for (N, C)); True marks values
        that count. Masked values (NaN included) reach neither the statistics nor
        their gradients; their outputs are normalized with the same statistics.
        A ghost batch without valid values is left out of the running statistics.
      axis_name: named axis (``shard_map``, ``pmap``, ``vmap``) to synchronize
        statistics over: the batch statistics (and the running ones, and the
        ``unbiased`` m) are those of the global batch, count-weighted when
        masks leave devices different numbers of valid values. One all-reduce
        in the forward pass (the exact merge of per-device moments) and one in
        the backward pass (the fused backward's sums); the gradient of each
        device's local loss w.r.t. its input is the single-device gradient of
        the summed loss. With one example per device, the named axis supplies
        the rest of the batch, so it is not refused. Under sharded ``jax.jit``
        leave it None: XLA inserts the all-reduces (two forward, one backward).
      axis_index_groups: groups of ``axis_name`` indices that synchronize among
        themselves, e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``; disjoint, non-empty,
        together every index once.
      ghost_batch_size: normalize each consecutive group of this many examples
        (axis 0, which must not be a feature axis and which it must divide) with
        its own statistics; the running statistics take the mean of the groups'.
        Not combinable with ``axis_name``.
      dtype: dtype of ``y``; default x's dtype (flax's ``dtype`` field).

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype (or ``dtype``); new :class:`BatchStats`.

    Raises:
      ValueError: bad axes, shapes, mask, option values, a traced ``training``,
        non-floating input, training with one value per feature (per ghost
        batch; not checked with ``axis_name``), a ``ghost_batch_size`` that does
        not divide the batch or comes with ``axis_name``, or bad
        ``axis_index_groups``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 5 + 2
      >>> stats = jn.init_batch_stats(3)
      >>> y, stats = jn.batch_norm(x, stats, training=True)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), int(stats.count)
      (True, 1)
      >>> y_eval, _ = jn.batch_norm(x, stats, training=False)
      >>> y, _ = jn.batch_norm(x, stats, training=True, ghost_batch_size=4)
      >>> bool(jnp.allclose(y[:4].mean(0), 0, atol=1e-5))
      True
    """
    fn = "batch_norm"
    training = check_options(fn, training, average)
    errors.check_epsilon(fn, epsilon)
    average = precise_bn.current_average(average)
    errors.check_ghost_batch_size(fn, ghost_batch_size)
    x, lay, mask = check_inputs(fn, x, stats, scale, bias, axis, mask)
    out_dtype = x.dtype if dtype is None else dtype
    if not training:
        return evaluate(x, stats, scale, bias, lay, epsilon, out_dtype), stats
    y, m, _ = batch_standardize(
        fn, x, lay, mask, scale, bias, axis=axis, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, ghost_batch_size=ghost_batch_size, dtype=out_dtype,
    )
    return jnp.reshape(y, x.shape), fold_batch(stats, m, lay, momentum=momentum, average=average, unbiased=unbiased)
