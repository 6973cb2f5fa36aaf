"""NNX LayerNorm and RMSNorm: parameters and one call into :func:`jaxnorm.layer_norm` / :func:`jaxnorm.rms_norm`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._flax_common import layer_norm_options
from jaxnorm._nnx.common import EMPTY, Axes, Dtype, Initializer, Stateless, value
from jaxnorm._src.layer_norm import layer_norm, rms_norm

Array = jax.Array


class LayerNorm(Stateless):
    """Layer normalization (Ba, Kiros & Hinton 2016), drop-in for ``flax.nnx.LayerNorm``.

    Each example is standardized over ``reduction_axes``; scale and bias (of
    ``num_features``) sit on ``feature_axes``. Calls :func:`jaxnorm.layer_norm` once.

    Args:
      num_features: size of the feature axis.
      reduction_axes: axes the statistics are computed over.
      feature_axes: the axis the scale and bias span.
      epsilon: added to the variance.
      dtype: output dtype (and the dtype x and params are promoted to).
      param_dtype: dtype of the parameters.
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: their initializers.
      axis_name, axis_index_groups: also reduce over devices along this named axis.
      use_fast_variance: accepted for flax compatibility and ignored (always
        the stable shifted variance).
      promote_dtype: flax's dtype-promotion function, applied to x and the params.
      rngs: ``nnx.Rngs`` for the initializers.
      bias_metadata, scale_metadata: metadata for the ``nnx.Param`` variables.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> ln = jnx.LayerNorm(8, rngs=nnx.Rngs(0))
      >>> ln(jax.random.normal(jax.random.key(0), (2, 5, 8))).shape
      (2, 5, 8)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = EMPTY,
        scale_metadata: Mapping[str, Any] = EMPTY,
    ):
        self._init_common(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
        )
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Standardizes each example over ``reduction_axes``.

        Args:
          x: floating array.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: bad axes, shapes or mask (from :func:`jaxnorm.layer_norm`).
        """
        x, scale, bias = self._promoted(x)
        return layer_norm(x, scale, bias, mask=mask, dtype=self.dtype, **layer_norm_options(self))


class RMSNorm(Stateless):
    """RMS normalization (Zhang & Sennrich 2019), drop-in for ``flax.nnx.RMSNorm``.

    ``y = x / sqrt(mean(x**2) + eps) * scale`` over ``reduction_axes``; calls
    :func:`jaxnorm.rms_norm` once.

    Args:
      num_features: size of the feature axis.
      reduction_axes: axes the mean square is computed over.
      feature_axes: the axis the scale spans.
      (others): as :class:`LayerNorm` (no bias).

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> jnx.RMSNorm(8, rngs=nnx.Rngs(0))(jax.numpy.ones((2, 8))).shape
      (2, 8)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = EMPTY,
    ):
        self._init_common(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=None, use_scale=use_scale, bias_init=None, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=EMPTY, scale_metadata=scale_metadata,
        )
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """RMS-normalizes each example over ``reduction_axes``.

        Args:
          x: floating array.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: bad axes, shapes or mask (from :func:`jaxnorm.rms_norm`).
        """
        x, scale = self.promote_dtype((x, value(self.scale)), dtype=self.dtype)
        return rms_norm(x, scale, mask=mask, dtype=self.dtype, **layer_norm_options(self))

