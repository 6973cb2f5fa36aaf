"""Per-example (conditional) parameters: where a scale, bias or threshold sits on ``x``.

A norm's affine parameters come in two forms:

- the feature shape of today, e.g. (C,) for a channel axis, placed on the
  feature axes of ``x`` (axis 1 for NCHW, the last for NHWC);
- a shape of x's rank whose every size is 1 or x's, e.g. (N, 1, 1, C) on
  NHWC, (N, C, 1, 1) on NCHW or (B, 1, C) on sequences: per example (the
  batch axis kept), as conditional batch norm (de Vries et al. 2017, BigGAN),
  AdaIN (Huang & Belongie 2017) and the adaLN of diffusion transformers
  (Peebles & Xie 2023) need, or any other broadcast against ``x``.

:func:`place` turns either into an array of x's rank that broadcasts against
``x``. The fused :func:`jaxnorm._src.normalize.standardize` takes any such
shape: its backward sums each parameter's cotangent over exactly the axes on
which the parameter has size 1 (``_broadcast_axes``), and it shares the
reductions over reduced axes only along those on which every parameter is
constant, so a per-example parameter gets per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.checks import check_floating

Array = jax.Array
Projection = Callable[[int, Array], Array]


def is_broadcast_shape(shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """x's rank and every size 1 or x's."""
    return len(shape) == len(x_shape) and all(s in (1, d) for s, d in zip(shape, x_shape, strict=True))


def example_shape(x_shape: tuple[int, ...], feature_axes: Sequence[int]) -> tuple[int, ...]:
    """The per-example parameter shape: N on axis 0, the features on theirs, 1 elsewhere."""
    return tuple(
        d if (a == 0 or a in feature_axes) else 1 for a, d in enumerate(x_shape)
    )


def place(
    fn: str,
    name: str,
    param: Any,
    x_shape: tuple[int, ...],
    feature_axes: Sequence[int],
    *,
    allow_scalar: bool = False,
) -> Array | None:
    """``param`` reshaped to x's rank so that it broadcasts against ``x``.

    Args:
      fn, name: for the message.
      param: None, the feature shape (``x.shape[feature_axes]``), or a shape
        of x's rank with every size 1 or x's (per example: the batch axis kept).
      x_shape: shape of ``x``.
      feature_axes: non-negative axes of ``x`` that a feature-shaped parameter spans.
      allow_scalar: also accept a scalar (one value for every feature).

    Returns:
      None, or ``param`` as an array of x's rank.

    Raises:
      ValueError: any other shape, or a non-floating parameter.
    """
    if param is None:
        return None
    check_floating(fn, param, name)
    param = jnp.asarray(param)
    shape = tuple(param.shape)
    x_shape = tuple(x_shape)
    feature_shape = tuple(x_shape[a] for a in feature_axes)
    placed = tuple(x_shape[a] if a in feature_axes else 1 for a in range(len(x_shape)))
    if shape == feature_shape or (allow_scalar and shape == ()):
        return jnp.reshape(param, placed if shape else (1,) * len(x_shape))
    if is_broadcast_shape(shape, x_shape):
        return param
    scalar = " or a scalar" if allow_scalar else ""
    raise ValueError(
        f"{fn}: `{name}` has shape {shape}, but `x` of shape {x_shape} needs {feature_shape} "
        f"(the feature shape){scalar}, or a shape of x's rank with each size 1 or x's for "
        f"per-example values, e.g. {example_shape(x_shape, feature_axes)}; reshape it, "
        f"e.g. `{name}.reshape({example_shape(x_shape, feature_axes)})` for one {feature_shape} "
        f"vector per example."
    )


def varies_along(param: Array | None, axes: Sequence[int], ndim: int) -> bool:
    """Whether a placed parameter has a size other than 1 on any of ``axes``."""
    if param is None:
        return False
    shape = (1,) * (ndim - np.ndim(param)) + tuple(np.shape(param))
    return any(shape[a] != 1 for a in axes)


def projected_shape(
    fn: str, x_shape: tuple[int, ...], condition: Any, feature_axes: Sequence[int],
) -> tuple[int, tuple[int, ...]]:
    """Where a conditional layer's projection of ``condition`` sits on ``x``.

    ``condition`` is (N, D), one vector per example, or more generally
    ``x.shape[:m] + (D,)`` (e.g. (B, T, D) for one vector per token of a
    (B, T, C) sequence). A Dense layer maps its last axis to the
    ``prod(feature shape)`` features, which this shape places on the feature
    axes: ``x.shape[:m]`` kept, the features on their axes, 1 elsewhere.

    Returns:
      ``(F, shape)``: the number of projected features and the per-example
      parameter shape (x's rank) to reshape the projection to.

    Raises:
      ValueError: a non-floating condition, one without a batch axis, leading
        axes that differ from x's, or a feature axis among them.
    """
    check_floating(fn, condition, "condition")
    c_shape = tuple(np.shape(condition))
    x_shape = tuple(x_shape)
    m = len(c_shape) - 1
    if 0 in feature_axes:
        raise ValueError(
            f"{fn}: the feature axes {tuple(feature_axes)} include the batch axis 0 of `x` (shape "
            f"{x_shape}), which the condition's vectors run along; use e.g. -1 (NHWC) or 1 (NCHW)."
        )
    if m < 1 or m >= len(x_shape) or c_shape[:m] != x_shape[:m] or any(a < m for a in feature_axes):
        per_position = f" or ({x_shape[0]}, {x_shape[1]}, D) for one vector per position" if len(x_shape) > 2 else ""
        raise ValueError(
            f"{fn}: `condition` of shape {c_shape} must be ({x_shape[0]}, D), one vector per "
            f"example of `x` (shape {x_shape}), or x's leading non-feature axes plus D{per_position}; "
            f"pass e.g. an (N, D) embedding of the class or the time step."
        )
    features = 1
    for a in feature_axes:
        features *= x_shape[a]
    shape = x_shape[:m] + tuple(x_shape[a] if a in feature_axes else 1 for a in range(m, len(x_shape)))
    return features, shape


def onto(projection: Array, shape: tuple[int, ...]) -> Array:
    """A conditional layer's projection, ``x.shape[:m] + (F,)``, reshaped to :func:`projected_shape`'s ``shape``."""
    return jnp.reshape(projection, shape)


def conditional_affine(
    fn: str,
    x_shape: tuple[int, ...],
    condition: Any,
    feature_axes: Sequence[int],
    *,
    scale: Projection | None,
    bias: Projection | None,
) -> tuple[Array | None, Array | None]:
    """A conditional norm's per-example scale and shift: each projection of ``condition``, placed on ``x``.

    The one implementation behind the linen and NNX ``Conditional*Norm``
    layers: ``scale = condition @ W_s + b_s`` and ``shift = condition @ W_b +
    b_b``, each reshaped by :func:`onto` to :func:`projected_shape`'s
    per-example shape, which the core norms take as scale and bias.

    Args:
      fn: the public name for messages.
      x_shape: shape of ``x``.
      condition: (N, D), or ``x.shape[:m] + (D,)``; floating.
      feature_axes: non-negative axes of ``x`` the projections span.
      scale, bias: the layer's projections, or None for a layer without one;
        each is called as ``projection(F, condition)`` with F the number of
        projected features and returns ``condition.shape[:-1] + (F,)`` (a
        Dense layer of width F: linen builds it with F, NNX ignores F).

    Returns:
      ``(scale, bias)``, each None or of :func:`projected_shape`'s shape.

    Raises:
      ValueError: as :func:`projected_shape`, or a projection of another width than F.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.ones((2, 3))
      >>> scale, bias = conditional_affine("f", (4, 5, 3), jnp.ones((4, 2)), (2,),
      ...                                  scale=lambda f, c: c @ w, bias=None)
      >>> scale.shape, bias
      ((4, 1, 3), None)
    """
    features, shape = projected_shape(fn, x_shape, condition, feature_axes)

    def place_projection(name: str, projection: Projection | None) -> Array | None:
        if projection is None:
            return None
        out = projection(features, condition)
        if np.shape(out)[-1:] != (features,):
            raise ValueError(
                f"{fn}: the `{name}` projection of `condition` gives {np.shape(out)[-1]} features, but `x` "
                f"(shape {tuple(x_shape)}) has {features} on its feature axes {tuple(feature_axes)}; build "
                f"the layer with `num_features={features}`."
            )
        return onto(out, shape)

    return place_projection("scale", scale), place_projection("bias", bias)
