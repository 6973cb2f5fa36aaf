"""Batch renormalization (Ioffe 2017) and its warm-up schedule.

Batch norm normalizes by the mini-batch's statistics in training and by the
population's in inference; with small or non-i.i.d. batches the two differ and
the model learns to depend on the batch. Batch renormalization corrects the
training output towards the running statistics: with
``sigma_B = sqrt(batch var + eps)`` and ``sigma = sqrt(running var + eps)``,

    r = clip(sigma_B / sigma, 1/r_max, r_max)      (gradient stopped)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)   (gradient stopped)
    x_hat = (x - mu_B) / sigma_B * r + d

Unclipped, ``x_hat = (x - mu) / sigma``: the training output equals the
inference output, yet the gradient still flows through the batch statistics
(it is ``r`` times batch norm's). ``r_max = 1, d_max = 0`` is batch norm.

Implementation: ``x_hat`` and the batch moments come from the same fused
:func:`~jaxnorm._src.standardize.standardize` as batch norm (so the analytic
backward, masks, float32 accumulation and cross-device statistics are shared),
the running statistics are folded in by the same code, and evaluation calls
batch norm's. Only the correction ``x_hat * r + d`` lives here. ``r_max`` and
``d_max`` may be traced scalars, so a schedule runs inside one compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src.batch_norm import (
    batch_standardize,
    check_ghost_batch_size,
    check_inputs,
    check_options,
    evaluate,
    fold_batch,
    view_affine,
    view_param,
)
from jaxnorm._src.checks import check_after, check_at_least, check_epsilon, check_limit, check_out_dtype
from jaxnorm._src.moments import accumulation_dtype
from jaxnorm._src.standardize import affine, inverse_std
from jaxnorm._src.state import BatchStats, RecalibrationStats, check_momentum, check_stats

Array = jax.Array


def batch_renorm(
    x: Array,
    stats: BatchStats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    r_max: float | Array = 3.0,
    d_max: float | Array = 5.0,
    axis: int | tuple[int, ...] = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    average: str = "ema",
    unbiased: bool = False,
    axis_index_groups: Any = None,
    ghost_batch_size: int | None = None,
    dtype: Any = None,
) -> tuple[Array, BatchStats]:
    """Batch renormalization (Ioffe 2017, Algorithm 1): batch norm corrected towards the running statistics.

    Shapes: N batch, C features, ``...`` spatial axes; ``axis`` names the kept
    feature axes (channels-last default ``-1``; PyTorch's NCHW uses ``axis=1``).

    Training: with the batch mean ``mu_B`` and biased variance over the reduced
    axes, ``sigma_B = sqrt(var_B + eps)`` and the running ``mu``,
    ``sigma = sqrt(var + eps)``::

        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = scale * ((x - mu_B) / sigma_B * r + d) + bias

    and the running statistics are updated exactly as :func:`jaxnorm.batch_norm`
    updates them (``momentum``, ``average``, ``unbiased``; a non-finite batch
    changes nothing). Evaluation is batch norm's: ``(x - mu) / sigma``.
    With a :class:`~jaxnorm._src.state.RecalibrationStats` state (the PreciseBN
    pass of :func:`jaxnorm.recalibrate`) it is batch norm (``r_max=1,
    d_max=0``) with cumulative running statistics.

    The paper trains with ``r_max = 1, d_max = 0`` (plain batch norm) at first
    and then relaxes the limits; :func:`renorm_schedule` gives that schedule
    as traced values, so one compiled step serves every training step.

    Args:
      x: (N, ..., C) or any layout, floating (statistics in at least float32).
      stats: :class:`BatchStats` of the feature shape; also accepted, and
        returned as :class:`BatchStats`: a mapping with exactly the keys
        ``mean``, ``var``, ``count`` (linen's ``batch_stats`` entry) or a plain
        tuple ``(mean, var, count)``. mean and var must be floating; a floating
        count holding a non-negative integer (what ``lax.pmean`` over the
        statistics makes of it) is restored to int32. Anything else is a
        ValueError.
      scale, bias: optional gamma and beta: the feature shape, or per example: x's
        rank with each size 1 or x's, e.g. (N, 1, 1, C).
      training: static Python bool.
      r_max: bound on ``r`` (>= 1, inf allowed); a real scalar or a traced one.
      d_max: bound on ``|d|`` (>= 0, inf allowed); a real scalar or a traced one.
      axis: kept feature axis or axes.
      momentum: weight on the old running value, ``new = momentum * old +
        (1 - momentum) * batch`` (flax's convention; PyTorch's ``momentum=0.1``
        is ``momentum=0.9`` here). The paper's running averages are updated in
        every step and feed ``r`` and ``d``, so they should track the weights
        closely: keep ``momentum`` moderate (e.g. 0.99).
      epsilon: added to the variances.
      mask: bool, broadcasts to ``x``; True marks values that count; as in
        :func:`jaxnorm.batch_norm` (lower-rank masks, batches of one, features
        without valid values).
      axis_name: named axis to synchronize batch statistics over (as in
        :func:`jaxnorm.batch_norm`: one all-reduce forward, one backward; ``r``
        and ``d`` then come from the global batch's statistics).
      average: ``"ema"`` or ``"cumulative"``, as in :func:`jaxnorm.batch_norm`.
      unbiased: fold ``m/(m-1)`` times the batch variance into the running one.
      axis_index_groups: groups of ``axis_name`` indices that synchronize among themselves.
      ghost_batch_size: correct and normalize each consecutive group of this
        many examples with its own statistics (see :func:`jaxnorm.batch_norm`).
      dtype: dtype of ``y``; default x's dtype.

    Returns:
      ``(y, new_stats)``: y of x's shape and dtype (or ``dtype``); new :class:`BatchStats`.

    Raises:
      ValueError: everything :func:`jaxnorm.batch_norm` rejects, and a static
        ``r_max`` below 1 or ``d_max`` below 0.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 5 + 2
      >>> stats = jn.init_batch_stats(3)
      >>> r_max, d_max = jn.renorm_schedule(20_000)
      >>> y, stats = jn.batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max)
      >>> y_eval, _ = jn.batch_renorm(x, stats, training=False)
    """
    fn = "batch_renorm"
    training = check_options(fn, training, average)
    check_epsilon(fn, epsilon)
    check_ghost_batch_size(fn, ghost_batch_size)
    check_limit(fn, "r_max", r_max, 1, "r is clipped to [1/r_max, r_max]; r_max=1 disables the scale correction")
    check_limit(fn, "d_max", d_max, 0, "d is clipped to [-d_max, d_max]; d_max=0 disables the shift correction")
    stats = check_stats(fn, stats)
    if isinstance(stats, RecalibrationStats):
        # PreciseBN rebuilds the running statistics: they must not feed back
        # into the outputs, so this is batch norm (r = 1, d = 0).
        r_max, d_max = 1.0, 0.0
    if average == "ema":
        check_momentum(fn, momentum)
    x, lay, mask = check_inputs(fn, x, stats, scale, bias, axis, mask)
    check_out_dtype(fn, dtype)
    out_dtype = x.dtype if dtype is None else dtype
    if not training:
        return evaluate(x, stats, scale, bias, lay, epsilon, out_dtype), stats
    acc = accumulation_dtype(x.dtype)
    x_hat, m, view = batch_standardize(
        fn, x, lay, mask, None, None, axis=axis, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, ghost_batch_size=ghost_batch_size, dtype=acc,
    )
    running_mean = view_param(stats.mean, view).astype(acc)
    inv_sigma = inverse_std(view_param(stats.var, view).astype(acc), epsilon)
    r_max = jnp.asarray(r_max, acc)
    d_max = jnp.asarray(d_max, acc)
    # Both corrections are treated as constants (the paper's stop_gradient): the
    # gradient flows through the batch statistics only, scaled by r.
    r = lax.stop_gradient(jnp.clip(jnp.sqrt(m.var + epsilon) * inv_sigma, 1 / r_max, r_max))
    d = lax.stop_gradient(jnp.clip((m.mean - running_mean) * inv_sigma, -d_max, d_max))
    # scale * (x_hat * r + d) + bias with r and d folded into the per-feature
    # factor and shift: one pass over the data, as batch norm's affine
    # (measured: as fast as batch norm; the unfolded form costs about 1.3x on CPU).
    scale_v = view_affine(scale, view, lay)
    factor = r if scale is None else r * scale_v
    shift = d if scale is None else d * scale_v
    if bias is not None:
        shift = shift + view_affine(bias, view, lay)
    y = affine(x_hat, factor, shift, out_dtype)
    return jnp.reshape(y, x.shape), fold_batch(stats, m, lay, momentum=momentum, average=average, unbiased=unbiased)


def renorm_schedule(
    step: int | Array,
    *,
    warmup_steps: int = 5_000,
    r_max_steps: int = 40_000,
    d_max_steps: int = 25_000,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> tuple[Array, Array]:
    """The warm-up of Ioffe 2017: ``(r_max, d_max)`` for training step ``step``.

    The paper trains with plain batch norm (``r_max = 1, d_max = 0``) for the
    first 5k steps, then relaxes the limits gradually so that ``r_max = 3`` is
    reached at 40k steps and ``d_max = 5`` at 25k. The paper does not give the
    shape of the ramp; this one is linear: ``r_max`` rises from 1 to ``r_max``
    between ``warmup_steps`` and ``r_max_steps`` and ``d_max`` from 0 to
    ``d_max`` between ``warmup_steps`` and ``d_max_steps``, constant outside.
    Those step counts suit the paper's ImageNet run (about 130k steps at
    batch 32 per worker); scale them with the length of your training.

    ``step`` may be traced (e.g. an optimizer's step count), and so are the
    results, so ``jax.jit(train_step)`` compiles once for the whole schedule.

    Args:
      step: () int or float, the number of steps taken so far.
      warmup_steps: steps of plain batch norm before the limits relax.
      r_max_steps: step at which ``r_max`` reaches its final value (> warmup_steps).
      d_max_steps: step at which ``d_max`` reaches its final value (> warmup_steps).
      r_max: final bound on ``r`` (>= 1).
      d_max: final bound on ``|d|`` (>= 0).

    Returns:
      ``(r_max, d_max)``: float32 scalars, to pass to :func:`batch_renorm`.

    Raises:
      ValueError: negative ``warmup_steps``, an end step not after the warm-up,
        ``r_max`` below 1 or ``d_max`` below 0.

    Example:
      >>> import jaxnorm as jn
      >>> [round(float(v), 3) for v in jn.renorm_schedule(0)]
      [1.0, 0.0]
      >>> [round(float(v), 3) for v in jn.renorm_schedule(15_000)]
      [1.571, 2.5]
      >>> [round(float(v), 3) for v in jn.renorm_schedule(100_000)]
      [3.0, 5.0]
    """
    fn = "renorm_schedule"
    check_at_least(fn, "warmup_steps", warmup_steps, 0, "pass the number of plain batch-norm steps")
    check_after(fn, "r_max_steps", r_max_steps, "warmup_steps", warmup_steps)
    check_after(fn, "d_max_steps", d_max_steps, "warmup_steps", warmup_steps)
    check_limit(fn, "r_max", r_max, 1, "r_max=1 keeps r at 1")
    check_limit(fn, "d_max", d_max, 0, "d_max=0 keeps d at 0")
    step = jnp.asarray(step, jnp.float32)

    def ramp(end: int) -> Array:
        return jnp.clip((step - warmup_steps) / (end - warmup_steps), 0.0, 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_steps), d_max * ramp(d_max_steps)
