"""linen folding: find the Dense/Conv -> BatchNorm pairs of a model (:func:`batch_norm_pairs`).

The folding itself is the core's :func:`jaxnorm.fold_batch_norms` (no flax
needed), re-exported as ``jaxnorm.linen.fold_batch_norms``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnorm._linen.batch_norm import BatchNorm
from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.folding import FoldPair
from jaxnorm._src.folding import fold_batch_norms as fold_batch_norms


def raise_cannot_fold(fn: str, bn_path: str, reason: str) -> None:
    """Always raises: a batch norm that cannot be folded into the layer before it."""
    raise ValueError(
        f"{fn}: cannot fold the batch norm {bn_path!r}: {reason}. Folding supports a "
        f"Dense/Conv whose output goes straight into a BatchNorm over the last axis; keep "
        f"this batch norm in the folded model, or pass `strict=False` to fold only the "
        f"supported pairs."
    )


def batch_norm_pairs(
    model: nn.Module, variables: Mapping[str, Any], *args: Any, strict: bool = True, **kwargs: Any
) -> list[Any]:
    """Finds the Dense/Conv layers of ``model`` whose output goes straight into a BatchNorm.

    Traces ``model.apply(variables, *args, **kwargs)`` abstractly (no
    computation: :func:`jax.eval_shape`) with every module call intercepted,
    and pairs each batch norm (jaxnorm's :class:`BatchNorm`,
    :class:`BatchRenorm`, or ``flax.linen.BatchNorm``) with the
    ``flax.linen.Dense`` or ``flax.linen.Conv`` whose very output it receives.
    Pass the arguments that run the model in evaluation mode (e.g.
    ``train=False``). Feed the result to :func:`fold_batch_norms`.

    A pair is refused (``strict=True``: a ValueError; ``strict=False``: left
    out) when the batch norm's input is not a Dense/Conv output (it comes
    before the layer, or an activation sits in between), when it normalizes
    another axis than the last, or when the layer, or the batch norm, is called
    more than once, or the layer's output is also the input of another module.
    A use of the layer's output outside any module (e.g. a residual ``x + h``
    written in the parent's ``__call__``) is not seen: do not fold such a layer.

    Args:
      model: a linen module.
      variables: its variables.
      args, kwargs: the inputs and options of an evaluation-mode ``apply``.
      strict: raise for a batch norm that cannot be folded (default), or skip it.

    Returns:
      A list of :class:`jaxnorm.FoldPair` ``(layer, batch_norm, epsilon)`` paths, in call order.

    Raises:
      ValueError: with ``strict=True``, a batch norm that cannot be folded.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> class Net(nn.Module):
      ...     use_bn: bool = True
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.Conv(4, (3, 3), use_bias=not self.use_bn)(x)
      ...         if self.use_bn:
      ...             x = jnl.BatchNorm(use_running_average=True)(x)
      ...         return nn.relu(x)
      >>> x = jnp.ones((2, 5, 5, 3))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> pairs = jnl.batch_norm_pairs(Net(), variables, x)
      >>> [(p.layer, p.batch_norm) for p in pairs]
      [(('Conv_0',), ('BatchNorm_0',))]
      >>> folded = jnl.fold_batch_norms(variables, pairs)
      >>> y = Net(use_bn=False).apply(folded, x)
      >>> bool(jnp.allclose(y, Net().apply(variables, x), atol=1e-5))
      True
    """
    fn = "jaxnorm.linen.batch_norm_pairs"
    calls: list[tuple[nn.Module, tuple[Any, ...], Any]] = []

    def record(next_fun: Any, call_args: Any, call_kwargs: Any, context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__":
            calls.append((context.module, (*call_args, *call_kwargs.values()), out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)

    layers = (nn.Dense, nn.Conv)
    norms = (BatchNorm, nn.BatchNorm)
    paths = [module.path for module, _, _ in calls]
    producer = {id(out): module for module, _, out in calls if isinstance(module, layers)}
    pairs = []
    for module, inputs, _ in calls:
        if not isinstance(module, norms):
            continue
        bn = "/".join(module.path)
        x = inputs[0] if inputs else None
        layer = producer.get(id(x))
        reason = _fold_refusal(fn, module, layer, x, paths, calls)
        if reason is not None:
            if strict:
                raise_cannot_fold(fn, bn, reason)
            continue
        pairs.append(FoldPair(tuple(layer.path), tuple(module.path), module.epsilon))
    return pairs


def _fold_refusal(fn: str, bn: nn.Module, layer: Any, x: Any, paths: list[Any], calls: list[Any]) -> str | None:
    """Why the batch norm ``bn`` (input ``x``) cannot be folded into ``layer``; None when it can."""
    if layer is None:
        return (
            "its input is not the output of a flax Dense or Conv (the batch norm comes "
            "before the layer, or something sits in between)"
        )
    name = "/".join(layer.path)
    if paths.count(bn.path) > 1:
        return "the batch norm is called more than once"
    if paths.count(layer.path) > 1:
        return f"the layer {name!r} before it is called more than once"
    last = canonical_axes(fn, "axis", -1, jnp.shape(x))
    if canonical_axes(fn, "axis", bn.axis, jnp.shape(x)) != last:
        return (
            f"it normalizes axis {bn.axis!r} of its input (shape {jnp.shape(x)}), not the "
            f"last axis, which holds the output features of {name!r}"
        )
    # modules around the batch norm (a wrapper handing x on to it) do not count as other users
    users = [
        "/".join(m.path) for m, inputs, _ in calls if bn.path[: len(m.path)] != m.path and any(i is x for i in inputs)
    ]
    if users:
        return f"the output of {name!r} is also the input of {', '.join(users)}"
    return None
