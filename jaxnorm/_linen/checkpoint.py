"""linen checkpoints: flax BatchNorm variables into jaxnorm's, and fresh statistics for a recalibration.

Both walk a variable tree with :func:`jaxnorm._src.state.is_batch_stats` (the
one test of a statistics node) and reset with
:func:`jaxnorm._src.state.fresh_like` (the one reset). No flax import needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from jaxnorm._src.state import fresh_like, is_batch_stats


def map_batch_stats(tree: Any, fn: Callable[[dict[str, Any]], Any]) -> Any:
    """Applies ``fn`` to every statistics mapping (``mean`` and ``var`` leaves, count optional)."""
    if is_batch_stats(tree, with_count=False):
        return fn(dict(tree))
    if isinstance(tree, Mapping):
        return {k: map_batch_stats(v, fn) for k, v in tree.items()}
    return tree


def from_flax_variables(variables: Mapping[str, Any], *, count: int = 0) -> dict[str, Any]:
    """Loads variables of a model built with ``flax.linen.BatchNorm`` into jaxnorm's.

    flax's BatchNorm keeps ``batch_stats/{mean,var}``; jaxnorm's adds an int32
    ``count``. This adds ``count`` next to every ``mean``/``var`` pair in the
    ``batch_stats`` collection (other collections are returned as they are), so
    a flax checkpoint restores into the same model written with
    ``jaxnorm.linen``. The default ``average="ema"`` ignores ``count``; pass
    ``count=`` if the model uses ``average="cumulative"``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` as flax's ``init`` or a
        checkpoint gives them (dicts or FrozenDicts).
      count: batches the statistics already hold.

    Returns:
      A new dict of variables with ``count`` leaves added (existing ones kept).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jnp.ones((4, 3))
      >>> flax_vars = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
      >>> ours = jnl.from_flax_variables(flax_vars)
      >>> sorted(ours["batch_stats"])
      ['count', 'mean', 'var']
      >>> y = jnl.BatchNorm(use_running_average=True).apply(ours, x)
    """
    value = jnp.asarray(count, jnp.int32)

    def add(stats: dict[str, Any]) -> dict[str, Any]:
        stats.setdefault("count", value)
        return stats

    out = {k: v for k, v in variables.items()}
    if "batch_stats" in out:
        out["batch_stats"] = map_batch_stats(out["batch_stats"], add)
    return out


def fresh_batch_stats(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{"batch_stats": ...}`` with every BatchNorm's statistics reset: mean 0, var 1, count 0.

    Shapes and dtypes are kept. With ``average="cumulative"`` (a layer
    field), the next batch then replaces the statistics
    and later batches are averaged with it: the start of a PreciseBN
    recalibration.

    Args:
      variables: the model's variables (must hold ``batch_stats``).

    Returns:
      ``{"batch_stats": reset_tree}``, to merge as ``{**variables, **fresh}``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> bn = jnl.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> _, upd = bn.apply(v, x, mutable=["batch_stats"])
      >>> fresh = jnl.fresh_batch_stats({**v, **upd})["batch_stats"]
      >>> fresh["mean"].tolist(), fresh["var"].tolist(), int(fresh["count"])
      ([0.0, 0.0], [1.0, 1.0], 0)
    """

    return {"batch_stats": map_batch_stats(variables["batch_stats"], fresh_like)}

