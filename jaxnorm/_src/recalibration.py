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

The Flax layers keep their statistics as plain variables (no NamedTuple type
to carry the mark), so :mod:`jaxnorm._flax_common` holds the one switch
the Flax side has (``recalibrating``), under which a jaxnorm layer builds its
state as ``RecalibrationStats``; :func:`run_pass` is the loop all three entry
points share (restart, one compiled step, keep what folded).

(The design sketch put recalibration in ``inference.py`` next to
``fold_batch_norm``; it is a concept of its own, hence its own module.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src.state import BatchStats, RecalibrationStats, fresh_like, is_batch_stats, rebuild, stats_fields

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


def restart(tree: Any, *, mark: bool = False) -> Any:
    """Every statistics node of ``tree`` reset (mean 0, var 1, count 0); with ``mark``, as RecalibrationStats."""

    def one(node: Any) -> Any:
        if not is_batch_stats(node):
            return node
        fresh = fresh_like(node)
        return RecalibrationStats(*fresh) if mark and isinstance(node, BatchStats) else fresh

    return jax.tree.map(one, tree, is_leaf=is_batch_stats)


def finish(before: Any, after: Any) -> tuple[Any, int]:
    """Keeps the recalibrated statistics of layers that folded a batch, the old ones elsewhere.

    Returns the new tree (nodes of ``before``'s types, so a RecalibrationStats
    never leaks out) and the number of statistics nodes that folded at least
    one batch. Anything that is not jaxnorm statistics (a foreign layer's
    state) comes back as it was in ``before``.
    """
    visited = []

    def one(old: Any, new: Any) -> Any:
        if not is_batch_stats(old):
            return old
        new_fields = stats_fields(new)
        # count may carry leading axes (layers stacked by scan or vmap): align from the left
        seen = jnp.asarray(new_fields["count"]) > 0
        visited.append(jnp.any(seen))

        def pick(new_value: Any, old_value: Any) -> Any:
            where = jnp.reshape(seen, seen.shape + (1,) * (jnp.ndim(old_value) - seen.ndim))
            return jnp.where(where, new_value, old_value)

        return rebuild(old, {k: pick(new_fields[k], v) for k, v in stats_fields(old).items()})

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
) -> Any:
    """The PreciseBN pass shared by the functional, linen and NNX entry points.

    ``update(constants, stats, batch) -> stats`` is jitted once (``constants``:
    arrays passed to the compiled step as arguments rather than baked into it,
    e.g. a model's parameters) and run on every batch from restarted
    statistics (marked as :class:`RecalibrationStats` with ``mark``). ``hint``
    completes the message raised when no layer folded a batch.
    """
    check_recalibration(fn, layers=count_stats(stats))
    step = jax.jit(update)
    state, seen = restart(stats, mark=mark), 0
    for batch in batches:
        state = step(constants, state, batch)
        seen += 1
    check_recalibration(fn, batches=seen)
    out, folded = finish(stats, state)
    check_recalibration(fn, folded=folded, hint=hint)
    return out


def recalibrate(update: Callable[[Any, Any], Any], stats: Any, batches: Iterable[Any]) -> Any:
    """PreciseBN for functional models: population statistics from ``batches``.

    ``update(stats, batch) -> stats`` runs the frozen model on one batch in
    training mode (``training=True`` for every :func:`jaxnorm.batch_norm` /
    :func:`jaxnorm.batch_renorm`, parameters closed over) and returns the new
    statistics. Every :class:`~jaxnorm.BatchStats` in ``stats`` restarts as a
    ``RecalibrationStats`` (see the module docstring), so every batch norm that
    receives it averages cumulatively (batch renorm acts as batch norm) and
    each ends with the plain average over the batches of its per-batch mean
    and variance (``unbiased`` honoured). ``update`` is jit-compiled once
    (batches of one shape) and run once per batch; it may be jitted already.

    Args:
      update: ``(stats, batch) -> stats``, a training-mode forward pass that
        hands each layer its node of ``stats``.
      stats: a pytree holding :class:`~jaxnorm.BatchStats` for every batch-norm layer.
      batches: an iterable of model inputs, e.g. 100 to 200 training batches.

    Returns:
      ``stats`` with every statistics node recalibrated (plain ``BatchStats``
      again); a node that folded no batch (its layer ran in evaluation mode,
      or every batch was non-finite) and anything else in the tree is
      returned unchanged.

    Raises:
      ValueError: ``batches`` is empty, ``stats`` holds no statistics, or no
        layer folded a batch.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 3)) + i for i in range(4)]
      >>> def update(stats, x):
      ...     return jn.batch_norm(x, stats, training=True)[1]   # ema by default
      >>> stats = jn.recalibrate(update, jn.init_batch_stats(3), batches)
      >>> means = jnp.stack([b.mean(0) for b in batches]).mean(0)
      >>> bool(jnp.allclose(stats.mean, means, atol=1e-5)), int(stats.count)
      (True, 4)
    """
    return run_pass(
        "recalibrate", lambda _, s, batch: update(s, batch), stats, batches,
        "make `update` run batch_norm with `training=True` on the statistics it is given", mark=True,
    )
