"""PreciseBN (Wu & Johnson 2021): recompute population statistics with the model frozen.

The running statistics of batch norm are an exponential moving average over
the last few hundred steps, taken while the weights were still moving, so they
lag the final weights; with small batches they are also noisy. PreciseBN
replaces them after training by the plain average, over a number of batches
run through the frozen model, of each layer's per-batch mean and variance,
every layer normalizing with batch statistics as in training (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm", section 3).

The policy is explicit, in the state. :func:`recalibrate` hands ``update``
every statistics node as a :class:`~jaxnorm._src.state.RecalibrationStats`
(mean 0, var 1, count 0): a pytree type of its own, which the user's code
passes to :func:`jaxnorm.batch_norm` / :func:`jaxnorm.batch_renorm` as it
would any :class:`~jaxnorm.BatchStats`. Those fold it with
``average="cumulative"`` whatever their ``average`` argument says, and batch
renorm applies no correction (``r_max=1, d_max=0``: the statistics being
rebuilt must not feed back into the outputs). With ``count`` at 0 the first
batch replaces a layer's statistics and the k-th is averaged in with weight
1/k, so after the pass each layer holds exactly the mean of its per-batch
means and (biased, or with ``unbiased=True`` corrected) variances. A batch
with non-finite statistics is skipped as in training. Nothing ambient is read
by the core: the same ``update`` traced with plain ``BatchStats`` behaves as
in training, and a jitted ``update`` simply retraces for the new type.

The exact mode (``population="exact"``) marks the nodes as
:class:`~jaxnorm._src.state.ExactRecalibrationStats` instead, whose count
holds the batches folded and each feature's exact value count (see that
class). Batch norm then merges every batch's moments into the node's with
Chan, Golub & LeVeque's pairwise formula, the function
:func:`jaxnorm.update_feature_stats` folds with, so after the pass each layer
holds the mean and variance of all valid values of all batches together
(``unbiased``: ``N/(N-1)`` of that over the N values); :func:`finish` turns
the count back into the batches folded. Why both: the average is Wu &
Johnson's estimator (their section 3); the exact moments are the pooled
estimate of their appendix, which differs when the batches have different
counts (sizes, masks), when their means differ (the average of per-batch
variances leaves out the variance of the batch means), and with small
batches (a biased batch variance is on average ``(m-1)/m`` of the
population's). ``docs/guides/small_batches.md`` shows the difference.

The Flax layers keep their statistics as plain variables (no NamedTuple type
to carry the mark), so there the mark is the count's layout
(:data:`~jaxnorm._src.state.PASS_LAYOUT`): :func:`restart` gives it, and a
layer reads its variables with :func:`~jaxnorm._src.state.stats_from_arrays`,
which types them. Nothing ambient is read on either side. :func:`run_pass`
is the loop all three entry points share (restart, one compiled step, keep
what folded).

(The design sketch put recalibration in ``inference.py`` next to
``fold_batch_norm``; it is a concept of its own, hence its own module.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src.state import (
    PASS_LAYOUT,
    POPULATIONS,
    BatchStats,
    ExactRecalibrationStats,
    RecalibrationStats,
    fresh_like,
    is_batch_stats,
    rebuild,
    stats_fields,
)

Array = jax.Array


def check_recalibration(
    fn: str, *, layers: int | None = None, batches: int | None = None, folded: int | None = None, hint: str = ""
) -> None:
    """PreciseBN needs batch-norm statistics, batches, and at least one layer that folded one."""
    if layers == 0:
        raise ValueError(
            f"{fn}: found no jaxnorm batch-norm statistics (jn.BatchStats or "
            f"{{'mean', 'var', 'count'}} dicts) to recalibrate; the model needs at "
            f"least one jaxnorm BatchNorm or BatchRenorm layer."
        )
    if batches == 0:
        raise ValueError(f"{fn}: `batches` is empty; pass an iterable of model inputs (e.g. 100 training batches).")
    if folded == 0:
        raise ValueError(
            f"{fn}: no jaxnorm batch-norm layer folded a batch, so no statistics were "
            f"recalibrated; {hint}, and check that the batches hold finite values."
        )


def count_stats(tree: Any) -> int:
    """Number of jaxnorm statistics nodes in ``tree``."""
    return sum(1 for leaf in jax.tree.leaves(tree, is_leaf=is_batch_stats) if is_batch_stats(leaf))


def check_population(fn: str, population: Any) -> str:
    """``population``; raises unless it is ``"average"`` or ``"exact"``."""
    if not isinstance(population, str) or population not in POPULATIONS:
        raise ValueError(
            f"{fn}: `population`={population!r} is not one of 'average', 'exact'; pass "
            f"`population='average'` (Wu & Johnson's mean of per-batch statistics, the default) or "
            f"`population='exact'` (the moments of all recalibration batches together)."
        )
    return population


def restart(tree: Any, *, mark: bool = False, population: str = "average") -> Any:
    """Every statistics node of ``tree`` reset (mean 0, var 1, count 0), marked for the pass.

    With ``mark`` the mark is the type (``RecalibrationStats``, or
    ``ExactRecalibrationStats`` for ``population="exact"``), for the
    functional entry point. Without it (the Flax layers' variables, plain
    arrays) the mark is the count's layout, :data:`~jaxnorm._src.state.PASS_LAYOUT`:
    zeros of shape ``mean.shape + (1,)``, or ``+ (3,)`` for the exact mode,
    whose count needs that layout in either case (see
    :class:`~jaxnorm._src.state.ExactRecalibrationStats`).
    """
    kind = ExactRecalibrationStats if population == "exact" else RecalibrationStats
    layout = population == "exact" or not mark

    def one(node: Any) -> Any:
        if not is_batch_stats(node):
            return node
        fresh = fresh_like(node)
        if layout:
            mean = stats_fields(fresh)["mean"]
            fresh = rebuild(fresh, {"count": jnp.zeros(jnp.shape(mean) + (PASS_LAYOUT[population],), jnp.int32)})
        return kind(*fresh) if mark and isinstance(node, BatchStats) else fresh

    return jax.tree.map(one, tree, is_leaf=is_batch_stats)


def finish(before: Any, after: Any, *, population: str = "average") -> tuple[Any, int]:
    """Keeps the recalibrated statistics of layers that folded a batch, the old ones elsewhere.

    Returns the new tree (nodes of ``before``'s types, so a RecalibrationStats
    never leaks out) and the number of statistics nodes that folded at least
    one batch. Anything that is not jaxnorm statistics (a foreign layer's
    state) comes back as it was in ``before``. With ``population="exact"``
    the count is the exact mode's (see
    :class:`~jaxnorm._src.state.ExactRecalibrationStats`): it comes back as
    the batches folded, and a feature that saw no valid value keeps its old
    mean and variance.
    """
    visited = []

    def one(old: Any, new: Any) -> Any:
        if not is_batch_stats(old):
            return old
        old_fields, new_fields = stats_fields(old), stats_fields(new)
        count = jnp.asarray(new_fields["count"])
        if population == "exact":
            # per feature: whether a value folded
            valid = (count[..., 1] > 0) | (count[..., 2] > 0)
        if jnp.ndim(count) > jnp.ndim(old_fields["count"]):
            # the pass's layout (PASS_LAYOUT): the batches folded, the same for every feature
            lead = jnp.shape(old_fields["count"])
            count = jnp.max(jnp.reshape(count[..., 0], lead + (-1,)), axis=-1, initial=0)
            count = count.astype(jnp.result_type(old_fields["count"]))
        # count may carry leading axes (layers stacked by scan or vmap): align from the left
        seen = count > 0
        visited.append(jnp.any(seen))

        def pick(key: str, old_value: Any) -> Any:
            if key == "count":
                return jnp.where(seen, count, old_value)
            where = valid if population == "exact" else seen
            where = jnp.reshape(where, where.shape + (1,) * (jnp.ndim(old_value) - where.ndim))
            return jnp.where(where, new_fields[key], old_value)

        return rebuild(old, {k: pick(k, v) for k, v in old_fields.items()})

    out = jax.tree.map(one, before, after, is_leaf=is_batch_stats)
    return out, int(sum(bool(v) for v in visited))


def run_pass(
    fn: str,
    update: Callable[..., Any],
    stats: Any,
    batches: Iterable[Any],
    hint: str,
    *,
    constants: Any = None,
    mark: bool = False,
    population: str = "average",
) -> Any:
    """The PreciseBN pass shared by the functional, linen and NNX entry points.

    ``update(constants, stats, batch) -> stats`` is jitted once (``constants``:
    arrays passed to the compiled step as arguments rather than baked into it,
    e.g. a model's parameters) and run on every batch from restarted
    statistics (marked as :class:`RecalibrationStats`, or
    :class:`ExactRecalibrationStats` for ``population="exact"``, with
    ``mark``; the Flax entry points mark inside their layers instead).
    ``hint`` completes the message raised when no layer folded a batch.
    ``population`` is checked before anything runs.
    """
    check_population(fn, population)
    check_recalibration(fn, layers=count_stats(stats))
    step = jax.jit(update)
    state, seen = restart(stats, mark=mark, population=population), 0
    for batch in batches:
        state = step(constants, state, batch)
        seen += 1
    check_recalibration(fn, batches=seen)
    out, folded = finish(stats, state, population=population)
    check_recalibration(fn, folded=folded, hint=hint)
    return out


def recalibrate(
    update: Callable[[Any, Any], Any], stats: Any, batches: Iterable[Any], *, population: str = "average"
) -> Any:
    """PreciseBN for functional models: population statistics from ``batches``.

    ``update(stats, batch) -> stats`` runs the frozen model on one batch in
    training mode (``training=True`` for every :func:`jaxnorm.batch_norm` /
    :func:`jaxnorm.batch_renorm`, parameters closed over) and returns the new
    statistics. Every :class:`~jaxnorm.BatchStats` in ``stats`` restarts as a
    ``RecalibrationStats`` (see the module docstring), so every batch norm that
    receives it folds the batch whatever its ``average`` (batch renorm acts as
    batch norm). ``update`` is jit-compiled once (batches of one shape) and
    run once per batch; it may be jitted already.

    ``population`` chooses the estimator (both honour ``unbiased``, masks
    and ghost batches, and skip a batch with non-finite statistics):

    - ``"average"`` (default): Wu & Johnson's, the plain average over the
      batches of each layer's per-batch mean and variance (what their paper,
      timm and detectron2 compute). Every batch weighs the same.
    - ``"exact"``: the mean and variance of all valid values of all batches
      together, as if they were one batch (Chan, Golub & LeVeque's merge,
      the one :func:`jaxnorm.update_feature_stats` uses; counts exact). It
      differs from the average when batch sizes or masks give batches
      different counts, and its variance also holds the spread of the
      per-batch means around the population mean, which an average of
      per-batch variances misses. With ``unbiased`` the variance is
      ``N/(N-1)`` times the biased one over all N values.

    Args:
      update: ``(stats, batch) -> stats``, a training-mode forward pass that
        hands each layer its node of ``stats``.
      stats: a pytree holding :class:`~jaxnorm.BatchStats` for every batch-norm layer.
      batches: an iterable of model inputs, e.g. 100 to 200 training batches.
      population: ``"average"`` or ``"exact"``, see above.

    Returns:
      ``stats`` with every statistics node recalibrated (plain ``BatchStats``
      again, ``count`` the batches folded); a node that folded no batch (its
      layer ran in evaluation mode, or every batch was non-finite) and
      anything else in the tree is returned unchanged. In the exact mode a
      feature that no batch gave a valid value (masks) keeps its old mean and
      variance.

    Raises:
      ValueError: ``batches`` is empty, ``stats`` holds no statistics, no
        layer folded a batch, or ``population`` is neither ``"average"`` nor
        ``"exact"``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 3)) + i for i in range(4)]
      >>> def update(stats, x):
      ...     return jn.batch_norm(x, stats, training=True)[1]   # ema by default
      >>> stats = jn.recalibrate(update, jn.init_batch_stats(3), batches)
      >>> means = jnp.stack([b.mean(0) for b in batches]).mean(0)
      >>> bool(jnp.allclose(stats.mean, means, atol=1e-5)), int(stats.count)
      (True, 4)
      >>> exact = jn.recalibrate(update, jn.init_batch_stats(3), batches, population="exact")
      >>> every = jnp.concatenate(batches)          # all batches as one
      >>> bool(jnp.allclose(exact.var, every.var(0), rtol=1e-5)), bool(jnp.all(exact.var > stats.var))
      (True, True)
    """
    return run_pass(
        "recalibrate", lambda _, s, batch: update(s, batch), stats, batches,
        "make `update` run batch_norm with `training=True` on the statistics it is given", mark=True,
        population=population,
    )
