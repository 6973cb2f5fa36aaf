"""Helpers every linen layer of jaxnorm uses: flax's dtype rule and parameter declaration (no maths)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from jaxnorm._src.axes import canonical_axes

Array = jax.Array
Dtype = Any
Initializer = Any
Axes = Any


def output_dtype(dtype: Dtype | None, *arrays: Any) -> Any:
    """flax's rule: ``dtype`` if given, else the promoted dtype of x and the params."""
    return dtypes.canonicalize_dtype(*(a for a in arrays if a is not None), dtype=dtype)



def params(mdl: nn.Module, shape: tuple[int, ...], use_scale: bool, use_bias: bool) -> tuple[Any, Any]:
    """scale then bias, in flax's order (the order decides their init keys)."""
    scale = mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype) if use_scale else None
    bias = mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype) if use_bias else None
    return scale, bias


def feature_shape(fn: str, x: Array, axes: Axes) -> tuple[int, ...]:
    return tuple(jnp.shape(x)[a] for a in canonical_axes(fn, "feature_axes", axes, jnp.shape(x)))

