"""Input normalization for flax linen: data-set statistics in ``batch_stats``, standardized features out.

:class:`InputNormalization` is Keras' ``Normalization`` layer (and
Stable-Baselines' ``VecNormalize`` observations) as a linen module: its
statistics are a :class:`jaxnorm.FeatureStats` held in the ``batch_stats``
collection (``count``, ``mean``, ``m2``, ``mean_residual``), and its call is
:func:`jaxnorm.standardize_features`. They come from :func:`adapt` (a pass
over a data set, Keras' ``adapt``) or, for reinforcement learning, from the
call itself with ``update_stats=True`` (:func:`jaxnorm.update_feature_stats`
on the batch, then standardization with the updated statistics). The
module has no maths of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

import jaxnorm as jn
from jaxnorm._src import checks
from jaxnorm._src.axes import layout

Array = jax.Array

FIELDS = jn.FeatureStats._fields


class InputNormalization(nn.Module):
    """Standardizes features with streaming data-set statistics: ``(x - mean) / sqrt(var + epsilon)``.

    Shapes: N batch, C features. ``axis`` names the kept feature axes (one
    statistic per feature); every other axis is reduced, as in batch norm.
    Statistics live in ``batch_stats`` and are fresh after ``init`` (count
    0, so the layer starts as the identity); fill them with
    :func:`adapt`, or call with ``update_stats=True`` and
    ``mutable=["batch_stats"]`` to fold each batch in before standardizing
    it (observation normalization while acting). ``init`` never updates them.

    Attributes:
      axis: kept feature axis or axes (``()`` for one statistic over all values).
      epsilon: added to the variance.
      clip: optional bound: outputs are clipped to ``[-clip, clip]``
        (Stable-Baselines' ``clip_obs=10.0``).
      axis_name: named axis whose devices each hold part of the batch, for
        updates (ignored during ``init``).
      axis_index_groups: groups of ``axis_name`` indices that pool their batches.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> layer = jnl.InputNormalization()
      >>> data = jax.random.normal(jax.random.key(0), (64, 3)) * 10 + 5
      >>> variables = layer.init(jax.random.key(1), data[:8])
      >>> variables = jnl.adapt(layer, variables, jnp.split(data, 8))
      >>> y = layer.apply(variables, data)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1, atol=1e-5))
      (True, True)
      >>> y, upd = layer.apply(variables, data[:4], update_stats=True, mutable=["batch_stats"])
      >>> upd["batch_stats"]["count"][:, 1].tolist()
      [68, 68, 68]
    """

    axis: int | tuple[int, ...] = -1
    epsilon: float = 1e-8
    clip: float | None = None
    axis_name: Any = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Array, *, update_stats: bool = False, mask: Array | None = None) -> Array:
        """Standardizes ``x`` (after folding it into the statistics when ``update_stats``).

        Args:
          x: (N, ..., C) floating array.
          update_stats: static bool; fold ``x`` into ``batch_stats`` first
            (apply with ``mutable=["batch_stats"]``).
          mask: bool, broadcasts to ``x``; True marks values that count in
            the update (it does not change the output).

        Returns:
          Array of x's shape and dtype.

        Raises:
          ValueError: bad axes, shapes, mask or options (from the core
            functions), or a traced ``update_stats``.
        """
        fn = "jaxnorm.linen.InputNormalization"
        update_stats = checks.check_static_bool(fn, "update_stats", update_stats)
        lay = layout(fn, jnp.shape(x), self.axis)
        fresh = jn.init_feature_stats(lay.feature_shape)
        held = {f: self.variable("batch_stats", f, lambda f=f: getattr(fresh, f)) for f in FIELDS}
        stats = jn.FeatureStats(*(held[f].value for f in FIELDS))
        if update_stats and not self.is_initializing():
            stats = jn.update_feature_stats(
                stats, x, axis=self.axis, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            )
            for f in FIELDS:
                held[f].value = getattr(stats, f)
        return jn.standardize_features(x, stats, axis=self.axis, epsilon=self.epsilon, clip=self.clip)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    if not path:
        return value
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def adapt(
    module: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    reset: bool = True,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Keras' ``adapt``: every :class:`InputNormalization` in ``module`` takes the statistics of ``batches``.

    Runs ``module.apply(variables, batch, **apply_kwargs)`` on every batch
    with each :class:`InputNormalization` inside (the module itself, or a
    layer anywhere in a model) updating its statistics; each ends with the
    exact statistics of the values it saw, concatenated over the batches
    (scikit-learn's ``partial_fit`` over the stream). Only those
    statistics change: parameters and other layers' ``batch_stats`` come back
    as given. The step is jit-compiled once (batches of one shape).

    Args:
      module: a linen module holding :class:`InputNormalization` layers.
      variables: its variables (``module.init``'s result).
      batches: an iterable of the module's single positional input.
      reset: start from fresh statistics (Keras); ``False`` continues from
        the ones in ``variables`` (``partial_fit``).
      **apply_kwargs: passed to ``module.apply`` on every batch (e.g.
        ``train=False``).

    Returns:
      A new dict of variables.

    Raises:
      ValueError: no ``batch_stats``, no :class:`InputNormalization` in the
        module, or empty ``batches``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> class Model(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2)(jnl.InputNormalization()(x))
      >>> data = jax.random.normal(jax.random.key(0), (32, 3)) + 100
      >>> model = Model()
      >>> variables = jnl.adapt(model, model.init(jax.random.key(1), data), jnp.split(data, 4))
      >>> stats = variables["batch_stats"]["InputNormalization_0"]
      >>> bool(jnp.allclose(stats["mean"], data.mean(0))), stats["count"][:, 1].tolist()
      (True, [32, 32, 32])
    """
    fn = "jaxnorm.linen.adapt"
    checks.check_collection(fn, variables, "batch_stats")
    reset = checks.check_static_bool(fn, "reset", reset)
    found: list[tuple[str, ...]] = []

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, InputNormalization) and context.method_name == "__call__":
            path = tuple(context.module.scope.path)
            if path not in found:
                found.append(path)
            kwargs = {**kwargs, "update_stats": True}
        return next_fun(*args, **kwargs)

    def step(variables: Any, batch: Any) -> list[Any]:
        with nn.intercept_methods(interceptor):
            _, upd = module.apply(variables, batch, mutable=["batch_stats"], **apply_kwargs)
        return [_get(upd["batch_stats"], p) for p in found]

    variables = unfreeze(variables)
    stats = variables["batch_stats"]
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"{fn}: `batches` is empty; pass an iterable of model inputs, e.g. `jnp.split(data, 10)`.")
    jax.eval_shape(step, variables, first)  # finds the layers
    if not found:
        raise ValueError(
            f"{fn}: `module` ({type(module).__name__}) calls no jaxnorm.linen.InputNormalization, so there "
            f"are no statistics to adapt; add an InputNormalization layer to the model."
        )
    if reset:
        for p in found:
            stats = _set(stats, p, jax.tree.map(jnp.zeros_like, _get(stats, p)))
    compiled = jax.jit(step)
    for batch in itertools.chain([first], stream):
        for p, new in zip(found, compiled({**variables, "batch_stats": stats}, batch), strict=True):
            stats = _set(stats, p, new)
    return {**variables, "batch_stats": stats}
