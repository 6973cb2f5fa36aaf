"""linen LayerNorm and RMSNorm: parameters and one call into :func:`jaxnorm.layer_norm` / :func:`jaxnorm.rms_norm`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._flax_common import layer_norm_options
from jaxnorm._linen.common import Axes, Dtype, Initializer, feature_shape, output_dtype, params
from jaxnorm._src.layer_norm import layer_norm, rms_norm

Array = jax.Array


class LayerNorm(nn.Module):
    """Layer normalization (Ba, Kiros & Hinton 2016), drop-in for ``flax.linen.LayerNorm``.

    Each example is standardized over ``reduction_axes``; ``scale`` and
    ``bias`` have the shape of ``feature_axes``. Shapes: (N, C), (B, T, C),
    (N, H, W, C); NCHW with ``reduction_axes=(1, 2, 3), feature_axes=1``.
    Calls :func:`jaxnorm.layer_norm` once.

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype; default the promoted dtype of x and the params (flax's rule).
      param_dtype: dtype of the parameters.
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: their initializers.
      reduction_axes: axes the statistics are computed over.
      feature_axes: axes the scale and bias span.
      axis_name, axis_index_groups: also reduce over devices along this named
        axis (features sharded across devices).
      use_fast_variance, force_float32_reductions: accepted for flax
        compatibility and ignored (always the stable shifted variance with at
        least float32 accumulation).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8))
      >>> ln = jnl.LayerNorm()
      >>> y, variables = ln.init_with_output(jax.random.key(1), x)
      >>> variables["params"]["scale"].shape
      (8,)
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
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
        shape = feature_shape("jaxnorm.linen.LayerNorm", x, self.feature_axes)
        scale, bias = params(self, shape, self.use_scale, self.use_bias)
        return layer_norm(
            x, scale, bias, mask=mask, dtype=output_dtype(self.dtype, x, scale, bias), **layer_norm_options(self)
        )


class RMSNorm(nn.Module):
    """RMS normalization (Zhang & Sennrich 2019), drop-in for ``flax.linen.RMSNorm``.

    ``y = x / sqrt(mean(x**2) + eps) * scale`` over ``reduction_axes``; calls
    :func:`jaxnorm.rms_norm` once. Shapes as :class:`LayerNorm`.

    Attributes:
      reduction_axes: axes the mean square is computed over.
      feature_axes: axes the scale spans.
      (others): as in :class:`LayerNorm` (no bias).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8))
      >>> y, variables = jnl.RMSNorm().init_with_output(jax.random.key(1), x)
      >>> list(variables["params"])
      ['scale']
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
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
        shape = feature_shape("jaxnorm.linen.RMSNorm", x, self.feature_axes)
        scale, _ = params(self, shape, self.use_scale, False)
        return rms_norm(x, scale, mask=mask, dtype=output_dtype(self.dtype, x, scale), **layer_norm_options(self))

