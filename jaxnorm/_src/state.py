"""Running statistics of batch norm and their update rules.

:class:`BatchStats` is the one state type of batch norm and batch renorm, a
NamedTuple pytree (works under jit, vmap, scan; ``_replace`` for updates).
:func:`update_stats` folds one batch's statistics into it:

- ``"ema"``: ``new = momentum * old + (1 - momentum) * batch`` (flax's direction;
  PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here).
- ``"cumulative"``: the plain mean over every batch so far (PyTorch's
  ``momentum=None``), ``new = old + (batch - old) / (count + 1)``.
- ``unbiased``: the batch variance enters as ``m/(m-1)`` times itself (Bessel,
  the paper's Algorithm 2; :func:`unbias`).
- the count saturates at its dtype's maximum instead of wrapping;
- the non-finite guard: a batch with any non-finite statistic, or a feature
  without valid values, leaves every feature and the count as they were.
- updates are cast back to the state's dtypes, so dtypes never drift.

:class:`RecalibrationStats` is the same state marked for a PreciseBN pass
(:mod:`jaxnorm._src.recalibration`): a subclass, so it is a different pytree
type that survives jit, vmap and scan, and the policy reaches
:func:`jaxnorm.batch_norm` through its argument rather than an ambient switch.
Batch norm folds such a state cumulatively and batch renorm applies no
correction; the result keeps the type.

:func:`is_batch_stats` is the one test of "is this node batch-norm
statistics" (a :class:`BatchStats`, or a flax-style mapping), and
:func:`fresh_like` the one reset (mean 0, var 1, count 0, shapes and dtypes
kept) used by recalibration and the Flax helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

AVERAGES = ("ema", "cumulative")


class BatchStats(NamedTuple):
    """Running statistics of batch norm: a pytree that works under jit, vmap and scan.

    Attributes:
      mean: feature shape, float32: running mean.
      var: feature shape, float32: running variance.
      count: (), int32: batches accumulated; saturates at the dtype's maximum.

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> stats = jn.BatchStats(jnp.zeros(3), jnp.ones(3), jnp.asarray(0))
      >>> stats._replace(count=jnp.asarray(1)).count.item()
      1
    """

    mean: Array
    var: Array
    count: Array


class RecalibrationStats(BatchStats):
    """:class:`BatchStats` being recalibrated (PreciseBN): folded cumulatively, no renorm correction.

    Made by :func:`jaxnorm.recalibrate` for the duration of its pass; user
    code passes it through like any :class:`BatchStats`.
    """

    __slots__ = ()


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


def is_batch_stats(node: Any, *, with_count: bool = True) -> bool:
    """Whether ``node`` is batch-norm statistics: a :class:`BatchStats`, or a mapping of them.

    A mapping counts when it holds array leaves ``mean`` and ``var`` and, with
    ``with_count`` (jaxnorm's layers), exactly those and ``count``; without it
    (flax's own BatchNorm keeps no count), any other keys are allowed.
    """
    if isinstance(node, BatchStats):
        return True
    if not isinstance(node, Mapping) or "mean" not in node or "var" not in node:
        return False
    if isinstance(node["mean"], Mapping):
        return False
    return set(node) == {"mean", "var", "count"} if with_count else True


def stats_fields(node: Any) -> dict[str, Any]:
    """The fields of a statistics node (see :func:`is_batch_stats`) as a dict."""
    return dict(node._asdict()) if isinstance(node, BatchStats) else dict(node)


def rebuild(node: Any, fields: Mapping[str, Any]) -> Any:
    """A node of ``node``'s kind (BatchStats type kept, or a dict) with ``fields``."""
    return node._replace(**fields) if isinstance(node, BatchStats) else {**node, **fields}


def fresh_like(node: Any) -> Any:
    """``node`` reset to mean 0, var 1, count 0 (a missing count stays missing); shapes and dtypes kept.

    Values come back strongly typed, as batch norm returns them, so that a
    step traced with the reset state is reused with the updated one.
    """
    fields = stats_fields(node)

    def strong(fill: Any, value: Any) -> Array:
        return jnp.full(jnp.shape(value), fill, jnp.result_type(value))

    out = {"mean": strong(0, fields["mean"]), "var": strong(1, fields["var"])}
    if "count" in fields:
        out["count"] = strong(0, fields["count"])
    return rebuild(node, out)


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
      stats: running statistics; a :class:`RecalibrationStats` folds
        cumulatively whatever ``average`` says, and keeps its type.
      batch_mean, batch_var: the batch's mean and biased variance, feature shape.
      batch_count: values behind each statistic (broadcasts to feature shape).
      momentum: weight on the old value for ``average="ema"``.
      average: ``"ema"`` or ``"cumulative"``.
      unbiased: fold ``m/(m-1)`` times the batch variance.

    Returns:
      New statistics of ``stats``'s type and dtypes; unchanged when the batch
      has a non-finite statistic or a feature without valid values.
    """
    if isinstance(stats, RecalibrationStats):
        average = "cumulative"
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
    return stats._replace(
        mean=jnp.where(ok, new_mean, stats.mean).astype(stats.mean.dtype),
        var=jnp.where(ok, new_var, stats.var).astype(stats.var.dtype),
        count=jnp.where(ok, new_count, stats.count).astype(stats.count.dtype),
    )
