"""Input normalization for flax NNX: data-set statistics as ``nnx.BatchStat``, standardized features out.

The NNX twin of :class:`jaxnorm.linen.InputNormalization`: a
:class:`jaxnorm.FeatureStats` held in four ``nnx.BatchStat`` variables
(``count``, ``mean``, ``m2``, ``mean_residual``), filled by :func:`adapt`
(or ``layer.adapt``) or updated in the call when ``update_stats`` is set.
Every formula is the core's (:func:`jaxnorm.update_feature_stats`,
:func:`jaxnorm.standardize_features`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx

import jaxnorm as jn
from jaxnorm._src import checks

Array = jax.Array

FIELDS = jn.FeatureStats._fields


class InputNormalization(nnx.Module):
    """Standardizes features with streaming data-set statistics: ``(x - mean) / sqrt(var + epsilon)``.

    Shapes: N batch, C features; ``num_features`` is the shape of the kept
    feature axes (``axis``), every other axis is reduced. Fresh statistics
    (count 0) make the layer the identity. ``model.train()`` and
    ``model.eval()`` do not change it: statistics change only through
    :func:`adapt` or with ``update_stats`` (attribute or call argument).

    Args:
      num_features: feature shape, e.g. ``C`` or ``(H, W, C)``; ``()`` for
        one statistic over all values.
      axis: kept feature axis or axes of ``x``.
      epsilon: added to the variance.
      clip: optional bound: outputs are clipped to ``[-clip, clip]``.
      update_stats: fold every batch into the statistics before
        standardizing it (observation normalization while acting).
      axis_name, axis_index_groups: pool updates across devices.
      dtype: dtype of the statistics.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> layer = jnx.InputNormalization(3)
      >>> data = jax.random.normal(jax.random.key(0), (64, 3)) * 10 + 5
      >>> layer.adapt(jnp.split(data, 8))
      >>> y = layer(data)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), layer.stats.exact_count().tolist()
      (True, [64, 64, 64])
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        axis: int | tuple[int, ...] = -1,
        epsilon: float = 1e-8,
        clip: float | None = None,
        update_stats: bool = False,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        dtype: Any = None,
    ):
        fresh = jn.init_feature_stats(num_features, **({} if dtype is None else {"dtype": dtype}))
        for f in FIELDS:
            setattr(self, f, nnx.BatchStat(getattr(fresh, f)))
        self.axis = axis
        self.epsilon = epsilon
        self.clip = clip
        self.update_stats = update_stats
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    @property
    def stats(self) -> jn.FeatureStats:
        """The statistics as a :class:`jaxnorm.FeatureStats`."""
        return jn.FeatureStats(*(getattr(self, f)[...] for f in FIELDS))

    def set_stats(self, stats: jn.FeatureStats) -> None:
        """Replaces the statistics (e.g. with ones merged from other hosts)."""
        for f in FIELDS:
            getattr(self, f)[...] = getattr(stats, f)

    def __call__(self, x: Array, *, update_stats: bool | None = None, mask: Array | None = None) -> Array:
        """Standardizes ``x`` (after folding it into the statistics when updating).

        Args:
          x: (N, ..., C) floating array.
          update_stats: overrides the attribute for this call.
          mask: bool, broadcasts to ``x``; True marks values that count in the update.

        Returns:
          Array of x's shape and dtype.
        """
        fn = "jaxnorm.nnx.InputNormalization"
        update = self.update_stats if update_stats is None else update_stats
        update = checks.check_static_bool(fn, "update_stats", update)
        stats = self.stats
        if update:
            stats = jn.update_feature_stats(
                stats, x, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            )
            self.set_stats(stats)
        return jn.standardize_features(x, stats, axis=self.axis, epsilon=self.epsilon, clip=self.clip)

    def adapt(self, batches: Iterable[Any], *, reset: bool = True) -> None:
        """Keras' ``adapt`` on this layer: :func:`adapt` with the layer as the model."""
        adapt(self, batches, reset=reset)


def _layers(model: nnx.Module) -> list[InputNormalization]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, InputNormalization)]


def adapt(model: nnx.Module, batches: Iterable[Any], *, reset: bool = True) -> None:
    """Keras' ``adapt``, in place: every :class:`InputNormalization` in ``model`` takes the statistics of ``batches``.

    Runs ``model(batch)`` on every batch with each :class:`InputNormalization`
    updating; each ends with the exact statistics of the values it saw over
    all batches. The pass runs on a functional copy of the model: only those
    statistics change (parameters, other layers' state and RNG counters are
    left as they were). The step is jit-compiled once (batches of one shape).

    Args:
      model: an NNX module holding :class:`InputNormalization` layers (or one).
      batches: an iterable of the model's single positional input.
      reset: start from fresh statistics (Keras); ``False`` continues from
        the current ones (scikit-learn's ``partial_fit``).

    Raises:
      ValueError: no :class:`InputNormalization` in ``model``, or empty ``batches``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(jnx.InputNormalization(3), nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> data = jax.random.normal(jax.random.key(0), (32, 3)) + 100
      >>> jnx.adapt(model, jnp.split(data, 4))
      >>> bool(jnp.allclose(model.layers[0].mean[...], data.mean(0)))
      True
    """
    fn = "jaxnorm.nnx.adapt"
    reset = checks.check_static_bool(fn, "reset", reset)
    layers = _layers(model)
    if not layers:
        raise ValueError(
            f"{fn}: `model` ({type(model).__name__}) holds no jaxnorm.nnx.InputNormalization, so there are "
            f"no statistics to adapt; add an InputNormalization layer to the model."
        )
    graphdef, state = nnx.split(model)

    def step(state: Any, stats: list[jn.FeatureStats], batch: Any) -> list[jn.FeatureStats]:
        copy = nnx.merge(graphdef, state)
        copies = _layers(copy)
        for layer, layer_stats in zip(copies, stats, strict=True):
            layer.update_stats = True
            layer.set_stats(layer_stats)
        copy(batch)
        return [layer.stats for layer in copies]

    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"{fn}: `batches` is empty; pass an iterable of model inputs, e.g. `jnp.split(data, 10)`.")
    stats = [layer.stats for layer in layers]
    if reset:
        stats = [jax.tree.map(jax.numpy.zeros_like, s) for s in stats]
    compiled = jax.jit(step)
    for batch in itertools.chain([first], stream):
        stats = compiled(state, stats, batch)
    for layer, layer_stats in zip(layers, stats, strict=True):
        layer.set_stats(layer_stats)
