"""linen GroupNorm and InstanceNorm: parameters and one call into the core.

The core functions are :func:`jaxnorm.group_norm` and :func:`jaxnorm.instance_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._flax_common import group_norm_options, instance_norm_options
from jaxnorm._linen.common import Axes, Dtype, Initializer, feature_shape, output_dtype, params
from jaxnorm._src.group_norm import group_norm, instance_norm

Array = jax.Array


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018), drop-in for ``flax.linen.GroupNorm``.

    x is (N, ..., C) with channels last, as in flax. Per example and group of
    C/G channels, standardize over the group's channels and ``reduction_axes``
    (default: every axis but the batch axis 0); calls :func:`jaxnorm.group_norm` once.

    Attributes:
      num_groups: G (default 32, the paper's); pass ``num_groups=None`` with ``group_size``.
      group_size: C/G.
      reduction_axes: axes reduced within a group; must include the last
        (channel) axis. ``(-1,)`` on (B, T, C) normalizes each time step on its own.
      (others): as in :class:`LayerNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
      >>> y, variables = jnl.GroupNorm(num_groups=8).init_with_output(jax.random.key(1), x)
      >>> variables["params"]["bias"].shape
      (32,)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Group-normalizes x (N, ..., C).

        Args:
          x: floating array, channels last, batch axis 0.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: neither or both of num_groups/group_size, a non-divisor,
            bad axes, shapes or mask (from :func:`jaxnorm.group_norm`).
        """
        scale, bias = params(self, (jnp.shape(x)[-1],), self.use_scale, self.use_bias)
        return group_norm(
            x, scale, bias, mask=mask, dtype=output_dtype(self.dtype, x, scale, bias), **group_norm_options(self)
        )


class InstanceNorm(nn.Module):
    """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.linen.InstanceNorm``.

    Per example and feature (``feature_axes``), standardize over every other
    non-batch axis: (N, H, W, C) by default, NCHW with ``feature_axes=1``.
    Calls :func:`jaxnorm.instance_norm` once.

    Attributes:
      feature_axes: kept axis or axes (never 0, the batch axis); scale and bias span them.
      (others): as in :class:`LayerNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))
      >>> y, variables = jnl.InstanceNorm(feature_axes=1).init_with_output(jax.random.key(1), x)
      >>> variables["params"]["scale"].shape
      (3,)
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Instance-normalizes x.

        Args:
          x: floating array, batch axis 0.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: a feature axis that is the batch axis, bad shapes or mask
            (from :func:`jaxnorm.instance_norm`).
        """
        shape = feature_shape("jaxnorm.linen.InstanceNorm", x, self.feature_axes)
        scale, bias = params(self, shape, self.use_scale, self.use_bias)
        return instance_norm(
            x, scale, bias, mask=mask, dtype=output_dtype(self.dtype, x, scale, bias), **instance_norm_options(self)
        )
