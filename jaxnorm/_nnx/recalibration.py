"""NNX PreciseBN and reset: :func:`recalibrate` runs a functional copy of the model on marked statistics.

The pass is :func:`jaxnorm._src.recalibration.run_pass` (its restart marks
every count with the pass's layout, ``state.PASS_LAYOUT``); the reset is
:func:`jaxnorm._src.state.fresh_like` (the one reset of the library).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxnorm._nnx.batch_norm import BatchNorm, layer_state, set_layer_state
from jaxnorm._src.recalibration import run_pass
from jaxnorm._src.state import BatchStats, fresh_like


def batch_norm_layers(model: nnx.Module) -> list[BatchNorm]:
    """Every jaxnorm BatchNorm and BatchRenorm in ``model``, in a fixed order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]


def reset_batch_stats(model: nnx.Module) -> None:
    """Resets every jaxnorm BatchNorm in ``model`` in place: mean 0, var 1, count 0.

    With ``average="cumulative"`` the next training batch then replaces the
    statistics: the start of a PreciseBN recalibration.

    Args:
      model: any NNX module (graph) holding :class:`BatchNorm` layers.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> bn = jnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> _ = bn(jax.random.normal(jax.random.key(0), (8, 3)))
      >>> int(bn.count[...])
      1
      >>> jnx.reset_batch_stats(bn)
      >>> int(bn.count[...]), bn.var[...].tolist()
      (0, [1.0, 1.0, 1.0])
    """
    for layer in batch_norm_layers(model):
        set_layer_state(layer, fresh_like(layer_state(layer)))



def recalibrate(model: nnx.Module, batches: Any, *, population: str = "average") -> None:
    """PreciseBN (Wu & Johnson 2021): recompute every jaxnorm batch norm's statistics in place.

    Runs ``model(batch)`` on every element of ``batches`` with the parameters
    frozen. Every jaxnorm :class:`BatchNorm` and :class:`BatchRenorm` starts
    from fresh statistics and ends with the plain average over the batches of
    its per-batch mean and variance (``population="average"``), or with the
    mean and variance of all its inputs over all batches together
    (``population="exact"``; see :func:`jaxnorm.recalibrate` for when each is
    right), ``unbiased`` honoured, each normalizing
    with batch statistics as in training (batch renorm without its
    correction) whatever mode the model is in. The pass runs on a functional
    copy of the model: only those statistics change; parameters, other layers'
    state (``flax.nnx.BatchNorm`` included, RNG counters) and the model's
    train/eval mode are left as they were. Other layers run in the mode the
    model is in (e.g. dropout is off after ``model.eval()``). The per-batch
    step is jit-compiled once (batches of one shape).

    Args:
      model: an NNX module holding jaxnorm batch-norm layers anywhere inside;
        ``model(batch)`` must run it.
      batches: an iterable of the model's single positional input, e.g. 100
        to 200 training batches.
      population: ``"average"`` (Wu & Johnson's estimator) or ``"exact"``.

    Raises:
      ValueError: no jaxnorm batch-norm layer in ``model``, empty ``batches``,
        no layer folded a batch (every batch non-finite, or a layer called
        with ``use_running_average=True`` explicitly), or a ``population``
        other than ``"average"`` and ``"exact"``; the model is then unchanged.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model.eval()
      >>> jnx.recalibrate(model, [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(5)])
      >>> int(model.layers[1].count[...]), model.layers[1].use_running_average
      (5, True)
    """
    fn = "jaxnorm.nnx.recalibrate"
    graphdef, state = nnx.split(model)

    def update(state: Any, stats: list[BatchStats], batch: Any) -> list[BatchStats]:
        copy = nnx.merge(graphdef, state)
        layers = batch_norm_layers(copy)
        for layer, layer_stats in zip(layers, stats):
            layer.use_running_average = False
            layer.count.set_value(layer_stats.count)  # the pass's count has a layout of its own
            set_layer_state(layer, layer_stats)
        copy(batch)  # the pass's mark is in the count layout (restart): no switch
        return [layer_state(layer) for layer in layers]

    layers = batch_norm_layers(model)
    new = run_pass(
        fn, update, [layer_state(layer) for layer in layers], batches,
        "do not call the layers with `use_running_average=True` explicitly",
        constants=state, population=population,
    )
    for layer, layer_stats in zip(layers, new):
        set_layer_state(layer, layer_stats)

