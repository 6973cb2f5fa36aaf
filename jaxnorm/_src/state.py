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
  without valid values, leaves every feature and the count as they were; so
  does a traced momentum outside [0, 1] or NaN (a concrete one is refused).
- updates are cast back to the state's dtypes, so dtypes never drift.

:class:`RecalibrationStats` is the same state marked for a PreciseBN pass
(:mod:`jaxnorm._src.recalibration`): a subclass, so it is a different pytree
type that survives jit, vmap and scan, and the policy reaches
:func:`jaxnorm.batch_norm` through its argument rather than an ambient switch.
Batch norm folds such a state cumulatively and batch renorm applies no
correction; the result keeps the type. Its subclass
:class:`ExactRecalibrationStats` marks the exact mode (``population="exact"``),
which batch norm folds by merging moments instead
(:func:`jaxnorm._src.batch_norm.fold_exact`).

:func:`is_batch_stats` is the one test of "is this node batch-norm
statistics" (a :class:`BatchStats`, or a flax-style mapping), and
:func:`fresh_like` the one reset (mean 0, var 1, count 0, shapes and dtypes
kept) used by recalibration and the Flax helpers.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.checks import check_floating_dtype

Array = jax.Array

AVERAGES = ("ema", "cumulative")


class SpectralState(NamedTuple):
    """Power-iteration state of one spectrally normalized kernel.

    Attributes:
      u: (1, out_features): the left singular vector estimate (flax's
        ``.../kernel/u``, PyTorch's ``weight_u`` as a row).
      sigma: (): the last estimate of the largest singular value, the one the
        kernel was last divided by (flax's ``.../kernel/sigma``).

    Example:
      >>> import jax.numpy as jnp, jaxnorm as jn
      >>> state = jn.SpectralState(u=jnp.ones((1, 4)), sigma=jnp.array(1.0))
      >>> state._replace(sigma=jnp.array(2.0)).sigma.tolist()
      2.0
    """

    u: Array
    sigma: Array


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
    code passes it through like any :class:`BatchStats`. This type is
    ``population="average"`` (Wu & Johnson's average of per-batch
    statistics); :class:`ExactRecalibrationStats` is the exact mode.
    """

    __slots__ = ()
    population = "average"


class ExactRecalibrationStats(RecalibrationStats):
    """PreciseBN with ``population="exact"``: the merged moments of every batch of the pass.

    ``mean`` and ``var`` are those of all valid values folded so far, as if
    the batches were concatenated (``var`` biased, or ``N/(N-1)`` times that
    with ``unbiased`` and N values). ``count`` has its own layout for the
    pass: int32 of shape feature shape + (3,), ``count[..., 0]`` the batches
    folded (the same for every feature) and ``count[..., 1:]`` the values
    folded per feature, as the two limbs of :attr:`jaxnorm.FeatureStats.count`
    (exact past 2^24). :func:`jaxnorm.recalibrate` turns it back into a plain
    :class:`BatchStats` whose ``count`` is the batches folded.
    """

    __slots__ = ()
    population = "exact"


POPULATIONS = ("average", "exact")

# Where a state travels as plain arrays (a Flax layer's variables) its type is
# lost, so the count's layout marks a PreciseBN pass instead: shape
# ``mean.shape + (k,)``, with k the entry below, where a plain state's count is
# a scalar. No ambient switch is needed: the mark is in the state handed over.
PASS_LAYOUT = {"average": 1, "exact": 3}


def stats_from_arrays(mean: Array, var: Array, count: Array) -> BatchStats:
    """A state held as three arrays, typed by its count's layout (:data:`PASS_LAYOUT`).

    A scalar count gives a :class:`BatchStats`; ``mean.shape + (1,)`` a
    :class:`RecalibrationStats` (its count the one value repeated there) and
    ``mean.shape + (3,)`` an :class:`ExactRecalibrationStats`.
    """
    shape, count_shape = jnp.shape(mean), jnp.shape(count)
    if count_shape == shape + (PASS_LAYOUT["exact"],):
        return ExactRecalibrationStats(mean, var, count)
    if count_shape == shape + (PASS_LAYOUT["average"],):
        return RecalibrationStats(mean, var, jnp.reshape(count, (-1,))[0])
    return BatchStats(mean, var, count)


def stats_as_arrays(stats: BatchStats) -> tuple[Array, Array, Array]:
    """``(mean, var, count)`` with the count in its layout: the inverse of :func:`stats_from_arrays`."""
    count = stats.count
    if type(stats) is RecalibrationStats:
        count = jnp.broadcast_to(count, jnp.shape(stats.mean) + (PASS_LAYOUT["average"],))
    return stats.mean, stats.var, count


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
    fn = "init_batch_stats"
    shape = check_feature_shape(fn, feature_shape)
    # batch_norm refuses such a state (updates would truncate): say so where it is made.
    check_floating_dtype(
        fn, dtype, requirement="a real floating dtype (running statistics are averages)",
        fix="pass e.g. `dtype=jnp.float32`",
    )
    return BatchStats(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), jnp.zeros((), jnp.int32))


def check_feature_shape(fn: str, feature_shape: Any) -> tuple[int, ...]:
    """``feature_shape`` as a tuple of non-negative ints (NumPy integers are ints); raises otherwise."""
    def size(d: Any) -> int | None:
        if isinstance(d, (bool, np.bool_)) or isinstance(d, jax.core.Tracer):
            return None
        try:
            return operator.index(d)  # NumPy integers and 0-d integer arrays are integers
        except TypeError:
            return None

    dims = (feature_shape,) if size(feature_shape) is not None else feature_shape
    try:
        dims = tuple(size(d) for d in dims)
    except TypeError:
        dims = None
    if dims is None or not all(d is not None and d >= 0 for d in dims):
        raise ValueError(
            f"{fn}: `feature_shape`={feature_shape!r} must be a non-negative int or a tuple of them; "
            "pass the sizes of the kept feature axes, e.g. `(C,)`."
        )
    return tuple(int(d) for d in dims)


def check_stats(fn: str, stats: Any) -> BatchStats:
    """``stats`` as :class:`BatchStats` (its subclass kept); raises a ValueError for anything else.

    Accepted: a :class:`BatchStats`, a mapping with exactly ``mean``, ``var``,
    ``count`` (linen's ``batch_stats`` entry) or a plain 3-tuple ``(mean, var,
    count)``. ``mean`` and ``var`` must be floating. A floating ``count`` (what
    ``lax.pmean`` over the statistics tree makes of it) holding a non-negative
    integer is restored to int32; traced, it is rounded and cast. A concrete
    negative or non-integer count is refused.
    """
    if isinstance(stats, BatchStats):
        pass
    elif isinstance(stats, Mapping) and set(stats) == {"mean", "var", "count"}:
        stats = BatchStats(stats["mean"], stats["var"], stats["count"])
    elif type(stats) in (tuple, list) and len(stats) == 3:
        stats = BatchStats(*stats)
    else:
        got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
        raise ValueError(
            f"{fn}: `stats` must be a BatchStats, a mapping with exactly the keys 'mean', 'var', 'count' "
            f"or a tuple (mean, var, count); got {got}. Create it with `jn.init_batch_stats(C)`."
        )
    for field in ("mean", "var"):
        dtype = jnp.result_type(getattr(stats, field))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{fn}: `stats.{field}` has dtype {dtype}, but running statistics must be floating; "
                f"create them with `jn.init_batch_stats(C, dtype=jnp.float32)`."
            )
    count = stats.count
    cdtype = jnp.result_type(count)
    concrete = not isinstance(count, jax.core.Tracer)
    if concrete and not isinstance(stats, ExactRecalibrationStats):  # its count has the pass's layout
        value = np.asarray(count)
        if value.shape != () or not (np.isfinite(value) and value >= 0 and value == np.round(value)):
            raise ValueError(
                f"{fn}: `stats.count`={value!r} must be a non-negative integer scalar (batches folded in); "
                "pass the count of a state made by `jn.init_batch_stats` (a float count from `lax.pmean` "
                "is accepted when it holds an integer)."
            )
    if jnp.issubdtype(cdtype, jnp.floating):
        stats = stats._replace(count=jnp.round(count).astype(jnp.int32))
    elif not jnp.issubdtype(cdtype, jnp.integer):
        raise ValueError(f"{fn}: `stats.count` has dtype {cdtype}; it must be an integer scalar.")
    return stats


def check_momentum(fn: str, momentum: Any) -> Any:
    """``momentum``; raises when it is concrete and NaN or outside [0, 1] (a traced NaN is guarded in the update)."""
    if momentum is None:
        return momentum
    if isinstance(momentum, jax.core.Tracer):
        if momentum.ndim != 0 or not jnp.issubdtype(momentum.dtype, jnp.number):
            raise ValueError(
                f"{fn}: `momentum` must be a real scalar, got a traced {momentum.aval}; pass one weight on "
                "the old running value, e.g. a schedule's `momentum(step)`."
            )
        return momentum
    try:
        value = float(momentum)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(momentum, bool) or not (0.0 <= value <= 1.0):
        raise ValueError(
            f"{fn}: `momentum`={momentum!r} must be a number in [0, 1] (the weight on the old running value, "
            "flax's convention); PyTorch's momentum=0.1 is momentum=0.9 here."
        )
    return momentum


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
    new_mean = new_mean.astype(stats.mean.dtype)
    new_var = new_var.astype(stats.var.dtype)
    # After the cast: a float16 state that overflows must not store the inf;
    # a traced NaN momentum fails here too, and a traced one outside [0, 1]
    # (which would extrapolate; a concrete one is a ValueError) is refused alike.
    ok = jnp.all(jnp.isfinite(batch_mean) & jnp.isfinite(batch_var) & (batch_count > 0))
    if average == "ema" and isinstance(momentum, jax.core.Tracer):
        ok = ok & jnp.all((momentum >= 0) & (momentum <= 1))
    ok = ok & jnp.all(jnp.isfinite(new_mean)) & jnp.all(jnp.isfinite(new_var))
    limit = jnp.iinfo(stats.count.dtype).max
    new_count = jnp.where(stats.count < limit, stats.count + 1, stats.count)
    return stats._replace(
        mean=jnp.where(ok, new_mean, stats.mean).astype(stats.mean.dtype),
        var=jnp.where(ok, new_var, stats.var).astype(stats.var.dtype),
        count=jnp.where(ok, new_count, stats.count).astype(stats.count.dtype),
    )
