"""Helpers every NNX layer of jaxnorm uses: parameter declaration and the per-example norms' shared state (no maths)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
from flax import nnx

Array = jax.Array
Dtype = Any
Initializer = Any
Axes = Any

EMPTY: Mapping[str, Any] = MappingProxyType({})


def param(
    init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype, metadata: Mapping[str, Any], use: bool
) -> Any:
    """An ``nnx.Param`` of ``shape`` from ``init``, or ``nnx.data(None)`` when the layer does not use it."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


def value(var: Any) -> Array | None:
    """The array a variable holds (None stays None)."""
    return None if var is None else var[...]


class Stateless(nnx.Module):
    """Holds scale/bias and the options shared by the per-example norms."""

    def _init_common(
        self, num_features: int, *, epsilon: float, dtype: Dtype | None, param_dtype: Dtype,
        use_bias: bool | None, use_scale: bool, bias_init: Initializer, scale_init: Initializer,
        axis_name: Any, axis_index_groups: Any, use_fast_variance: bool, promote_dtype: Any,
        rngs: nnx.Rngs, bias_metadata: Mapping[str, Any], scale_metadata: Mapping[str, Any],
    ) -> None:
        shape = (num_features,)
        self.scale = param(scale_init, rngs, shape, param_dtype, scale_metadata, use_scale)
        if use_bias is not None:  # None: the layer has no bias at all (RMSNorm)
            self.bias = param(bias_init, rngs, shape, param_dtype, bias_metadata, use_bias)
            self.use_bias = use_bias
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype

    def _promoted(self, x: Array) -> tuple[Array, Any, Any]:
        return self.promote_dtype((x, value(self.scale), value(self.bias)), dtype=self.dtype)

