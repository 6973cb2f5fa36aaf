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
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm._src import errors
from jaxnorm._src.normalize import affine, normalize, standardize

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
        batch_var = batch_var * batch_count / jnp.maximum(batch_count - 1, 1)
    if average == "ema":
        new_mean = momentum * stats.mean + (1 - momentum) * batch_mean
        new_var = momentum * stats.var + (1 - momentum) * batch_var
    else:
        step = 1.0 / (stats.count.astype(batch_mean.dtype) + 1)
        new_mean = stats.mean + (batch_mean - stats.mean) * step
        new_var = stats.var + (batch_var - stats.var) * step
    ok = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(jnp.isfinite(batch_var)) & jnp.all(batch_count > 0)
    limit = jnp.iinfo(stats.count.dtype).max
    new_count = jnp.where(stats.count < limit, stats.count + 1, stats.count)
    return BatchStats(
        jnp.where(ok, new_mean, stats.mean).astype(stats.mean.dtype),
        jnp.where(ok, new_var, stats.var).astype(stats.var.dtype),
        jnp.where(ok, new_count, stats.count).astype(stats.count.dtype),
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
    statistics; ``stats`` comes back unchanged.

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
      unbiased: update the running variance with ``m/(m-1)`` times the batch's.
      mask: bool, broadcasts to ``x`` (e.g. (N, 1) for (N, C)); True marks values
        that count. Masked values (NaN included) reach neither the statistics nor
        their gradients; their outputs are normalized with the same statistics.
      axis_name: named axis (shard_map, pmap, vmap) to synchronize statistics over.
      axis_index_groups: groups of ``axis_name`` indices that synchronize among themselves.
      ghost_batch_size: normalize each consecutive group of this many examples
        (axis 0) with its own statistics; the running statistics take the mean
        of the groups'.
      dtype: dtype of ``y``; default x's dtype (flax's ``dtype`` field).

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype (or ``dtype``); new :class:`BatchStats`.

    Raises:
      ValueError: bad axes, shapes, mask, option values, a traced ``training``,
        non-floating input, or training with one value per feature.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 5 + 2
      >>> stats = jn.init_batch_stats(3)
      >>> y, stats = jn.batch_norm(x, stats, training=True)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), int(stats.count)
      (True, 1)
      >>> y_eval, _ = jn.batch_norm(x, stats, training=False)
    """
    fn = "batch_norm"
    training = check_options(fn, training, average)
    x, lay, mask = check_inputs(fn, x, stats, scale, bias, axis, mask)
    scale_b, bias_b = as_broadcast(scale, lay), as_broadcast(bias, lay)
    out_dtype = x.dtype if dtype is None else dtype
    if not training:
        return normalize(x, jnp.reshape(stats.mean, lay.broadcast_shape), jnp.reshape(stats.var, lay.broadcast_shape), scale_b, bias_b, epsilon=epsilon, dtype=out_dtype), stats
    if ghost_batch_size is not None:
        raise ValueError(
            f"{fn}: `ghost_batch_size`={ghost_batch_size!r} is not supported yet; "
            f"leave it None."
        )
    if axis_name is None:
        errors.check_enough_values(fn, lay.values_per_feature, x.shape, axis)
    x_hat, m = standardize(
        x, lay.reduction_axes, epsilon=epsilon, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
    )
    y = affine(x_hat, scale_b, bias_b, out_dtype)
    feature = lambda a: jnp.reshape(jnp.broadcast_to(a, m.var.shape), lay.feature_shape)  # noqa: E731
    new_stats = update_stats(
        stats, feature(m.mean), feature(m.var), feature(m.count),
        momentum=momentum, average=average, unbiased=unbiased,
    )
    return y, jax.tree.map(jax.lax.stop_gradient, new_stats)
