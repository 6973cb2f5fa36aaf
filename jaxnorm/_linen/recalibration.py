"""linen PreciseBN: :func:`recalibrate` runs the model on statistics marked for the pass.

The pass itself (restart, one compiled step, keep what folded) is
:func:`jaxnorm._src.recalibration.run_pass`; its restart gives every count
the pass's layout (``state.PASS_LAYOUT``), from which each jaxnorm layer
hands the core a ``RecalibrationStats`` state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from flax.core import unfreeze

from jaxnorm._src.checks import check_collection
from jaxnorm._src.recalibration import run_pass


def recalibrate(
    model: nn.Module, variables: Mapping[str, Any], batches: Any, *, population: str = "average", **apply_kwargs: Any
) -> dict[str, Any]:
    """PreciseBN (Wu & Johnson 2021): recompute every jaxnorm batch norm's statistics.

    Runs ``model.apply(variables, batch, **apply_kwargs)`` on every element of
    ``batches`` with the parameters frozen. Every jaxnorm :class:`BatchNorm`
    and :class:`BatchRenorm` the pass trains starts from fresh statistics and
    ends with the plain average over the batches of its per-batch mean and
    variance (``population="average"``), or with the mean and variance of
    all its inputs over all batches together (``population="exact"``; see
    :func:`jaxnorm.recalibrate` for when each is right), ``unbiased``
    honoured, each layer normalizing with batch
    statistics as in training (batch renorm without its correction). Pass
    the keyword arguments that run your model in training mode, as your
    training step does (e.g. ``train=True``, ``rngs={"dropout": key}``).
    The per-batch step is jit-compiled once (batches of one shape).

    Layers that are not jaxnorm batch norms (``flax.linen.BatchNorm``
    included) keep their state, and so does a jaxnorm layer that the pass runs
    in evaluation mode or that sees only non-finite batches. See
    :mod:`jaxnorm._src.recalibration` for how the layers are switched.

    Args:
      model: a linen module holding jaxnorm batch-norm layers anywhere inside.
      variables: its variables, with ``params`` and ``batch_stats``.
      batches: an iterable of the model's single positional input, e.g. 100
        to 200 training batches (Wu & Johnson use about 100 batches of 32 images).
      population: ``"average"`` (Wu & Johnson's estimator) or ``"exact"``.
      **apply_kwargs: passed to ``model.apply`` on every batch.

    Returns:
      A new dict of variables: ``batch_stats`` recalibrated, everything else as given.

    Raises:
      ValueError: no ``batch_stats`` or no jaxnorm batch-norm statistics in
        them, empty ``batches``, no layer trained during the pass, or a
        ``population`` other than ``"average"`` and ``"exact"``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         x = jnl.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      ...         return nn.Dense(2)(nn.relu(x))
      >>> model = MLP()
      >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(5)]
      >>> variables = model.init(jax.random.key(0), batches[0], train=False)
      >>> variables = jnl.recalibrate(model, variables, batches, train=True)
      >>> int(variables["batch_stats"]["BatchNorm_0"]["count"])
      5
    """
    fn = "jaxnorm.linen.recalibrate"
    check_collection(fn, variables, "batch_stats")
    constants = {k: v for k, v in variables.items() if k != "batch_stats"}

    def update(constants: Any, stats: Any, batch: Any) -> Any:
        # the pass's mark is in the statistics' count layout (restart), so the layers need no switch
        _, new = model.apply({**constants, "batch_stats": stats}, batch, mutable=["batch_stats"], **apply_kwargs)
        return new["batch_stats"]

    stats = run_pass(
        fn, update, unfreeze(variables["batch_stats"]), batches,
        "pass the keyword arguments that run the model in training mode, e.g. `train=True`",
        constants=constants, population=population,
    )
    return {**variables, "batch_stats": stats}

