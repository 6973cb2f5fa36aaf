"""PreciseBN (Wu & Johnson 2021): recompute population statistics with the model frozen.

The running statistics of batch norm are an exponential moving average over
the last few hundred steps, taken while the weights were still moving, so they
lag the final weights; with small batches they are also noisy. PreciseBN
replaces them after training by the plain average, over a number of batches
run through the frozen model, of each layer's per-batch mean and variance,
every layer normalizing with batch statistics as in training (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm", section 3).

How jaxnorm does it: inside :func:`recalibrating`, :func:`jaxnorm.batch_norm`
and :func:`jaxnorm.batch_renorm` fold batches with ``average="cumulative"``
whatever their ``average`` argument says, and batch renorm uses
``r_max=1, d_max=0`` (plain batch norm, since the running statistics being
rebuilt must not feed back into the outputs). With ``count`` restarted at 0,
the first batch replaces a layer's statistics and the k-th is averaged in with
weight 1/k, so after the pass each layer holds exactly the mean of its
per-batch means and (biased, or with ``unbiased=True`` corrected) variances.
A batch with non-finite statistics is skipped as in training. Every layer
sees the same batches, normalized by its own batch statistics, so the pass
gives what the paper calls the population statistics of the trained model.

The switch is read when a function is traced, so it reaches layers of any
framework (functional code, :mod:`jaxnorm.linen`, :mod:`jaxnorm.nnx`) without
rebuilding the model; :func:`recalibrate` jits its step inside the switch.
Layers the pass runs in evaluation mode keep their statistics.

This module is framework-free; :func:`jaxnorm.linen.recalibrate` and
:func:`jaxnorm.nnx.recalibrate` call into it. (The design sketch put
recalibration in ``inference.py`` next to ``fold_batch_norm``; it is a concept
of its own, and the batch-norm functions read its switch, so it lives here.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src import errors

Array = jax.Array

_RECALIBRATING: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxnorm_recalibrating", default=False)


@contextlib.contextmanager
def recalibrating() -> Iterator[None]:
    """Within it, batch norm and batch renorm traced average cumulatively (see module doc)."""
    token = _RECALIBRATING.set(True)
    try:
        yield
    finally:
        _RECALIBRATING.reset(token)


def current_average(average: str) -> str:
    """``"cumulative"`` while recalibrating, else ``average``."""
    return "cumulative" if _RECALIBRATING.get() else average


def current_renorm_limits(r_max: Any, d_max: Any) -> tuple[Any, Any]:
    """``(1, 0)`` while recalibrating (batch renorm is then batch norm), else the limits given."""
    return (1.0, 0.0) if _RECALIBRATING.get() else (r_max, d_max)


def _is_stats(node: Any) -> bool:
    """A jaxnorm statistics node: a BatchStats, or a mapping of exactly mean, var, count (flax)."""
    from jaxnorm._src.batch_norm import BatchStats

    return isinstance(node, BatchStats) or (isinstance(node, Mapping) and set(node) == {"mean", "var", "count"})


def _fields(node: Any) -> dict[str, Any]:
    return dict(node._asdict()) if hasattr(node, "_asdict") else dict(node)


def _rebuild(node: Any, fields: dict[str, Any]) -> Any:
    return node._replace(**fields) if hasattr(node, "_replace") else fields


def restart(tree: Any) -> Any:
    """Sets ``count`` to 0 in every statistics node of ``tree`` (mean and var are kept).

    Statistics come back strongly typed, as batch norm returns them, so that a
    step traced for the first batch is reused for the next ones.
    """
    def one(node: Any) -> Any:
        if not _is_stats(node):
            return node
        fields = {k: jnp.asarray(v, jnp.result_type(v)) for k, v in _fields(node).items()}
        return _rebuild(node, {**fields, "count": jnp.zeros_like(fields["count"])})

    return jax.tree.map(one, tree, is_leaf=_is_stats)


def finish(before: Any, after: Any) -> tuple[Any, int]:
    """Keeps the recalibrated statistics of layers that folded a batch, the old ones elsewhere.

    Returns the new tree and the number of statistics nodes that folded at
    least one batch. Anything that is not jaxnorm statistics (a foreign
    layer's state) comes back as it was in ``before``.
    """
    visited = []

    def one(old: Any, new: Any) -> Any:
        if not _is_stats(old):
            return old
        new_fields = _fields(new)
        # count may carry leading axes (layers stacked by scan or vmap): align from the left
        seen = jnp.asarray(new_fields["count"]) > 0
        visited.append(jnp.any(seen))

        def pick(new_value: Any, old_value: Any) -> Any:
            return jnp.where(jnp.reshape(seen, seen.shape + (1,) * (jnp.ndim(old_value) - seen.ndim)), new_value, old_value)

        return _rebuild(old, {k: pick(new_fields[k], v) for k, v in _fields(old).items()})

    out = jax.tree.map(one, before, after, is_leaf=_is_stats)
    return out, int(sum(bool(v) for v in visited))


def count_stats(tree: Any) -> int:
    """Number of jaxnorm statistics nodes in ``tree``."""
    return sum(1 for leaf in jax.tree.leaves(tree, is_leaf=_is_stats) if _is_stats(leaf))


def recalibrate(update: Callable[[Any, Any], Any], stats: Any, batches: Iterable[Any]) -> Any:
    """PreciseBN for functional models: population statistics from ``batches``.

    ``update(stats, batch) -> stats`` runs the frozen model on one batch in
    training mode (``training=True`` for every :func:`jaxnorm.batch_norm` /
    :func:`jaxnorm.batch_renorm`, parameters closed over) and returns the new
    statistics. Every :class:`~jaxnorm.BatchStats` in ``stats`` restarts, and
    while the pass runs every batch norm averages cumulatively (batch renorm
    acts as batch norm), so each ends with the plain average over the batches
    of its per-batch mean and variance (``unbiased`` honoured). ``update`` is
    jit-compiled once (batches of one shape) and run once per batch.

    Args:
      update: ``(stats, batch) -> stats``, a training-mode forward pass; a plain
        Python function, not one wrapped in ``jax.jit`` (the switch is read
        while tracing, and JAX caches the traces of jitted functions).
      stats: a pytree holding :class:`~jaxnorm.BatchStats` (or flax-style
        ``{"mean", "var", "count"}`` dicts) for every batch-norm layer.
      batches: an iterable of model inputs, e.g. 100 to 200 training batches.

    Returns:
      ``stats`` with every statistics node recalibrated; a node that folded no
      batch (its layer ran in evaluation mode, or every batch was non-finite)
      and anything else in the tree is returned unchanged.

    Raises:
      ValueError: ``update`` is jitted, ``batches`` is empty, ``stats`` holds
        no statistics, or no layer folded a batch.

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
    return run("recalibrate", update, stats, batches, "make `update` run batch_norm with `training=True`")


def run(fn: str, update: Callable[..., Any], stats: Any, batches: Iterable[Any], hint: str, constants: Any = None) -> Any:
    """The PreciseBN pass shared by the functional, linen and NNX entry points.

    ``update(stats, batch)`` (or ``update(constants, stats, batch)`` when
    ``constants`` is given: arrays passed to the compiled step as arguments
    rather than baked into it, e.g. a model's parameters) is jitted once, inside
    :func:`recalibrating`, and run on every batch from restarted statistics.
    ``hint`` completes the message raised when no layer folded a batch.
    """
    errors.check_not_jitted(fn, "update", update)
    errors.check_recalibration(fn, layers=count_stats(stats))
    # A fresh function: jax caches traces per function object, and this trace
    # must neither reuse nor leave behind one made without the switch.
    if constants is None:
        step = jax.jit(lambda _, stats, batch: update(stats, batch))
    else:
        step = jax.jit(lambda constants, stats, batch: update(constants, stats, batch))
    state, seen = restart(stats), 0
    with recalibrating():
        for batch in batches:
            state = step(constants, state, batch)
            seen += 1
    errors.check_recalibration(fn, batches=seen)
    out, folded = finish(stats, state)
    errors.check_recalibration(fn, folded=folded, hint=hint)
    return out
