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

A batch with any non-finite statistic, or with fewer than two valid values for
some feature (a masked batch of one: no variance estimate), leaves every
feature and the count unchanged: one NaN batch must not erase a
training run's statistics.

Ghost batches (``ghost_batch_size=k``) and plain batches share one training
path: :func:`batch_view` sees ``x`` as ``(G, N // G, ...)`` (G = 1 without ghost
batches, a free reshape), :func:`batch_standardize` normalizes each group with
its own statistics, and :func:`fold_batch` folds the mean of the groups'
statistics into the state. :mod:`batch_renorm` reuses all three.

Where the rest lives: the state and its update rules in :mod:`state`, the
layout of ``axis`` in :mod:`axes`, the fused normalization and its derivative
in :mod:`standardize`, the evaluation map in :mod:`normalize`. The checks here
(:func:`check_stats_shape`, :func:`check_enough_values`,
:func:`check_ghost_batch_size`) have batch norm and batch renorm as their only
callers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.axes import Layout, layout
from jaxnorm._src.checks import (
    check_axis_index_groups,
    check_choice,
    check_epsilon,
    check_floating,
    check_mask,
    check_out_dtype,
    check_static_bool,
)
from jaxnorm._src.collectives import merge_stacked
from jaxnorm._src.feature_stats import FeatureStats, as_limbs, count_as_float, merged_state
from jaxnorm._src.moments import Moments
from jaxnorm._src.normalize import normalize
from jaxnorm._src.per_example import place
from jaxnorm._src.standardize import standardize
from jaxnorm._src.state import (
    AVERAGES,
    BatchStats,
    ExactRecalibrationStats,
    check_momentum,
    check_stats,
    unbias,
    update_stats,
)

Array = jax.Array


def check_stats_shape(
    fn: str, stats: BatchStats, feature_shape: tuple[int, ...], x_shape: tuple[int, ...], axis: Any
) -> BatchStats:
    """Returns ``stats``; raises unless its mean and var have the feature shape kept by ``axis``."""
    for field in ("mean", "var"):
        got = tuple(np.shape(getattr(stats, field)))
        if got != tuple(feature_shape):
            raise ValueError(
                f"{fn}: `stats.{field}` has shape {got}, but `x` of shape {tuple(x_shape)} "
                f"with `axis`={axis!r} keeps features of shape {tuple(feature_shape)}; "
                f"create the state with `jn.init_batch_stats({tuple(feature_shape)})` "
                f"or pass the `axis` the state was made for."
            )
    return stats


def check_enough_values(fn: str, per_feature: int, x_shape: tuple[int, ...], axis: Any) -> int:
    """Returns ``per_feature``; raises below 2 (training would return only the bias)."""
    if per_feature < 2:
        raise ValueError(
            f"{fn}: training needs more than one value per feature to estimate a "
            f"variance, but `x` of shape {tuple(x_shape)} with `axis`={axis!r} has "
            f"{per_feature}; use a batch of at least 2, evaluate with "
            f"`training=False`, or use layer_norm/group_norm for batch size 1."
        )
    return per_feature


def check_enough_masked(fn: str, view: BatchView, mask: Any, x_shape: tuple[int, ...], axis: Any) -> None:
    """Raises when a concrete mask leaves some statistic exactly one valid value: a batch of one.

    Without a mask that batch is refused (:func:`check_enough_values`); with a
    mask it would be normalized to the bias alone. A traced mask cannot be
    read here: :func:`fold_batch` then keeps such a batch out of the running
    statistics. A statistic with no valid value at all is allowed: none of its
    outputs count.
    """
    if view.mask is None or isinstance(view.mask, jax.core.Tracer):
        return
    flags = np.asarray(view.mask)
    if flags.all():
        return
    counts = np.broadcast_to(flags, view.x.shape).sum(view.axes)
    if np.any(counts == 1):
        where = "a feature" if view.x.shape[0] == 1 else "a feature in a ghost batch"
        raise ValueError(
            f"{fn}: training needs more than one valid value per feature to estimate a variance, but "
            f"`mask` (shape {tuple(np.shape(mask))}) leaves {where} of `x` (shape {tuple(x_shape)}, "
            f"`axis`={axis!r}) exactly one: a batch of one, which would be normalized to the bias alone. "
            f"Mask fewer values, evaluate with `training=False`, or use layer_norm/group_norm."
        )


def check_ghost_batch_size(
    fn: str,
    ghost_batch_size: Any,
    x_shape: tuple[int, ...] | None = None,
    feature_axes: tuple[int, ...] = (),
    per_example: int = 1,
    axis_name: Any = None,
) -> int | None:
    """Checks ``ghost_batch_size`` (always its type; with ``x_shape``, also against ``x``).

    Ghost batches split axis 0 into consecutive groups of ``ghost_batch_size``
    examples, so axis 0 must be a reduced (batch) axis, the size must divide it,
    and each group must hold two or more values per feature.
    """
    k = ghost_batch_size
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"{fn}: `ghost_batch_size` must be a positive Python int or None, got {k!r}; "
            f"pass e.g. `ghost_batch_size=16`."
        )
    k = int(k)
    if x_shape is None:
        return k
    if axis_name is not None:
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} cannot be combined with `axis_name`={axis_name!r}: "
            f"ghost batches are local to one device by definition; drop `axis_name` (each "
            f"device then normalizes its own ghost batches) or drop `ghost_batch_size`."
        )
    if 0 in feature_axes:
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} splits axis 0 of `x` (shape {tuple(x_shape)}) "
            f"into ghost batches, but axis 0 is a feature axis here; put the batch first "
            f"or leave `ghost_batch_size=None`."
        )
    n = x_shape[0]
    if n % k:
        divisors = ", ".join(str(d) for d in range(2, n + 1) if n % d == 0)
        raise ValueError(
            f"{fn}: `ghost_batch_size`={k} must divide the batch of {n} examples (axis 0 "
            f"of `x`, shape {tuple(x_shape)}); pass a divisor of {n} ({divisors}) or pad "
            f"the batch to a multiple of {k}."
        )
    if k * per_example < 2:
        raise ValueError(
            f"{fn}: ghost batches of `ghost_batch_size`={k} example(s) of `x` (shape "
            f"{tuple(x_shape)}) give {k * per_example} value per feature, too few to "
            f"estimate a variance; use `ghost_batch_size` >= 2."
        )
    return k


def check_inputs(
    fn: str, x: Any, stats: BatchStats, scale: Any, bias: Any, axis: Any, mask: Any
) -> tuple[Array, Layout, Array | None]:
    """The checks shared by batch_norm and batch_renorm; returns x, its layout and the mask."""
    x = jnp.asarray(check_floating(fn, x))
    lay = layout(fn, x.shape, axis)
    check_stats_shape(fn, stats, lay.feature_shape, x.shape, axis)
    # feature-shaped, or per example (x's rank, e.g. (N, 1, 1, C)): see per_example
    place(fn, "scale", scale, x.shape, lay.feature_axes)
    place(fn, "bias", bias, x.shape, lay.feature_axes)
    mask = check_mask(fn, mask, x.shape)
    return x, lay, mask


def as_broadcast(value: Array | None, lay: Layout) -> Array | None:
    """A feature-shaped value on x's rank; a per-example one (already x's rank) as it is."""
    if value is None or tuple(jnp.shape(value)) != lay.feature_shape:
        return value
    return jnp.reshape(value, lay.broadcast_shape)


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
    ghost_batch_size = check_ghost_batch_size(
        fn, ghost_batch_size, x.shape, lay.feature_axes, per_example, axis_name
    )
    check_axis_index_groups(fn, axis_index_groups, axis_name)
    if axis_name is None:
        # With a named axis the other devices supply the rest of the batch.
        check_enough_values(fn, lay.values_per_feature, x.shape, axis)
    view = batch_view(x, lay, mask, ghost_batch_size)
    if axis_name is None:
        check_enough_masked(fn, view, mask, x.shape, axis)
    y, m = standardize(
        view.x, view.axes, epsilon=epsilon, mask=view.mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        scale=view_affine(scale, view, lay), bias=view_affine(bias, view, lay), dtype=dtype,
    )
    return y, m, view


def view_param(value: Array | None, view: BatchView) -> Array | None:
    """A feature-shaped parameter or statistic, shaped to broadcast against the view."""
    return None if value is None else jnp.reshape(value, view.stats_shape)


def view_affine(value: Array | None, view: BatchView, lay: Layout) -> Array | None:
    """``scale`` or ``bias`` on the view: feature-shaped as :func:`view_param`; a
    per-example one (x's rank) gets its batch axis split into the ghost batches."""
    if value is None or tuple(jnp.shape(value)) == lay.feature_shape:
        return view_param(value, view)
    groups = view.x.shape[0]
    if value.shape[0] == 1:
        return value[None]
    return jnp.reshape(value, (groups, value.shape[0] // groups) + value.shape[1:])


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
    this is the batch's own mean and variance. An
    :class:`~jaxnorm._src.state.ExactRecalibrationStats` state (PreciseBN's
    exact mode) merges the moments instead (:func:`fold_exact`).
    """
    if isinstance(stats, ExactRecalibrationStats):
        return jax.tree.map(jax.lax.stop_gradient, fold_exact(stats, m, lay, unbiased=unbiased))
    count = jnp.broadcast_to(m.count, m.var.shape)
    var = unbias(m.var, count) if unbiased else m.var
    # One valid value is no variance estimate (the batch of one that training
    # refuses without a mask): such a group counts as empty here.
    valid = count > 1
    groups = jnp.sum(valid, axis=0)
    mean_over_groups = lambda a: jnp.sum(jnp.where(valid, a, 0), axis=0) / jnp.maximum(groups, 1)  # noqa: E731
    feature = lambda a: jnp.reshape(a, lay.feature_shape)  # noqa: E731
    new_stats = update_stats(
        stats, feature(mean_over_groups(m.mean)), feature(mean_over_groups(var)), feature(groups),
        momentum=momentum, average=average, unbiased=False,
    )
    return jax.tree.map(jax.lax.stop_gradient, new_stats)


def fold_exact(stats: ExactRecalibrationStats, m: Moments, lay: Layout, *, unbiased: bool) -> BatchStats:
    """PreciseBN's exact mode: the batch's moments merged into those of every batch so far.

    The ghost groups' moments (shape ``(G, 1, ...)``) merge into the batch's,
    and the batch's into the state's, with Chan, Golub & LeVeque's formula
    (:func:`~jaxnorm._src.collectives.merge_stacked`, through
    :func:`~jaxnorm._src.feature_stats.merged_state`, the fold of
    :func:`jaxnorm.update_feature_stats`): the state holds the mean and
    variance of all valid values seen, each value weighted alike, where the
    average mode weighs every batch alike. With ``unbiased`` the variance is
    ``N/(N-1)`` times the biased one of all N values (converted back before
    each merge). A feature without valid values in the batch keeps its
    statistics while the others fold (its values are absent, not wrong); a
    batch with a non-finite statistic is skipped whole. The batch's count is
    read from its moments (exact below 2^24 valid values per feature and
    batch); the running count is exact (two limbs, see
    :class:`~jaxnorm._src.state.ExactRecalibrationStats`). The mean is kept
    as one float32 (no residual as in :class:`jaxnorm.FeatureStats`: batch
    norm's population mean is float32, and activations do not sit 1e6
    standard deviations from zero).
    """
    dtype = stats.mean.dtype
    whole = merge_stacked(Moments(*(jnp.broadcast_to(a, m.var.shape) for a in m)))
    batch = Moments(*(jnp.reshape(a, lay.feature_shape).astype(dtype) for a in whole))
    n_batch = jnp.reshape(jnp.round(whole.count), lay.feature_shape).astype(jnp.int32)
    values = stats.count[..., 1:]
    n = count_as_float(values, dtype)
    biased = stats.var * jnp.maximum(n - 1, 1) / jnp.maximum(n, 1) if unbiased else stats.var
    held = FeatureStats(values, stats.mean, biased * n, jnp.zeros_like(stats.mean))
    new = merged_state(held, batch, as_limbs(n_batch))
    new_mean = (new.mean + new.mean_residual).astype(stats.mean.dtype)
    new_var = (unbias(new.var, new.num_values) if unbiased else new.var).astype(stats.var.dtype)
    ok = jnp.all(jnp.isfinite(batch.mean) & jnp.isfinite(batch.var)) & jnp.any(n_batch > 0)
    ok = ok & jnp.all(jnp.isfinite(new_mean) & jnp.isfinite(new_var))
    take = ok & (n_batch > 0)
    batches = stats.count[..., :1]
    batches = jnp.where(batches < jnp.iinfo(jnp.int32).max, batches + 1, batches)
    new_count = jnp.concatenate([batches, new.count], axis=-1).astype(stats.count.dtype)
    return stats._replace(
        mean=jnp.where(take, new_mean, stats.mean),
        var=jnp.where(take, new_var, stats.var),
        count=jnp.where(ok, new_count, stats.count),
    )


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
    training = check_static_bool(fn, "training", training)
    if average is not None:
        check_choice(fn, "average", average, AVERAGES)
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
    statistics; ``stats`` comes back unchanged. A
    :class:`~jaxnorm._src.state.RecalibrationStats` state (the PreciseBN pass
    of :func:`jaxnorm.recalibrate` makes them) averages cumulatively, whatever
    ``average`` says, and comes back with its type.

    Ghost batches (Hoffer, Hubara & Soudry 2017): with ``ghost_batch_size=k``,
    training splits axis 0 into ``N // k`` consecutive groups of ``k`` examples
    and normalizes each with its own statistics, as if it were a batch of its
    own; the running statistics take the plain mean of the groups' means and
    variances. This keeps the noise of small-batch statistics (a regularizer)
    while the rest of the step uses a large batch. Evaluation ignores it.

    Args:
      x: (N, ..., C) or any layout, floating (bfloat16/float16 allowed: statistics
        in float32, output in x's dtype).
      stats: :class:`BatchStats` of the feature shape; also accepted, and
        returned as :class:`BatchStats`: a mapping with exactly the keys
        ``mean``, ``var``, ``count`` (linen's ``batch_stats`` entry) or a plain
        tuple ``(mean, var, count)``. mean and var must be floating; a floating
        count holding a non-negative integer (what ``lax.pmean`` over the
        statistics makes of it) is restored to int32. Anything else is a
        ValueError.
      scale, bias: optional gamma and beta: the feature shape, or per example: x's
        rank with each size 1 or x's, e.g. (N, 1, 1, C) (conditional batch norm).
      training: static Python bool.
      axis: kept feature axis or axes.
      momentum: weight on the old running value, ``new = momentum * old +
        (1 - momentum) * batch`` (flax's convention). PyTorch's ``momentum=0.1``
        is ``momentum=0.9`` here. A concrete value must lie in [0, 1]; a traced
        one (a schedule, a vmap sweep) outside it, or NaN, leaves the state
        untouched, count included.
      epsilon: added to the variance.
      average: ``"ema"`` or ``"cumulative"`` (PyTorch's ``momentum=None``).
      unbiased: update the running variance with ``m/(m-1)`` times the batch's
        (per ghost batch, with its own m).
      mask: bool, broadcasts to ``x`` (e.g. (N, 1) for (N, C)); True marks values
        that count. Masked values (NaN included) reach neither the statistics nor
        their gradients; their outputs are normalized with the same statistics.
        A mask of lower rank than x must fit it one way only (a (3,) mask on a
        (3, 3) batch is refused: give it x's rank). A feature with exactly one
        valid value is a batch of one: refused when the mask is concrete; with
        a traced mask its output is the bias and the batch is not folded into
        the running statistics. A feature without any valid value gets mean 0
        and variance 0 (outputs ``x / sqrt(epsilon) * scale + bias``; flax
        gives NaN) and the batch is not folded in either (every feature and
        the count kept). A ghost batch with fewer than two valid values is
        left out of the running statistics.
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
        non-floating (or complex) input, training with one value per feature
        (per ghost batch, or left by a concrete mask; not checked with ``axis_name``), a ``ghost_batch_size`` that does
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
    check_epsilon(fn, epsilon)
    check_ghost_batch_size(fn, ghost_batch_size)
    stats = check_stats(fn, stats)
    if average == "ema":
        check_momentum(fn, momentum)
    x, lay, mask = check_inputs(fn, x, stats, scale, bias, axis, mask)
    check_out_dtype(fn, dtype)
    out_dtype = x.dtype if dtype is None else dtype
    if not training:
        return evaluate(x, stats, scale, bias, lay, epsilon, out_dtype), stats
    y, m, _ = batch_standardize(
        fn, x, lay, mask, scale, bias, axis=axis, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, ghost_batch_size=ghost_batch_size, dtype=out_dtype,
    )
    return jnp.reshape(y, x.shape), fold_batch(stats, m, lay, momentum=momentum, average=average, unbiased=unbiased)
