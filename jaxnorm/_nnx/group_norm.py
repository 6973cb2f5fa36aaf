"""NNX GroupNorm and InstanceNorm: parameters and one call into the core.

The core functions are :func:`jaxnorm.group_norm` and :func:`jaxnorm.instance_norm`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._flax_common import group_norm_options, instance_norm_options
from jaxnorm._nnx.common import EMPTY, Axes, Dtype, Initializer, Stateless
from jaxnorm._src.group_norm import check_groups, group_norm, instance_norm

Array = jax.Array


class GroupNorm(Stateless):
    """Group normalization (Wu & He 2018), drop-in for ``flax.nnx.GroupNorm``.

    x is (N, ..., C), channels last. Per example and group of C/G channels,
    standardize over the group's channels and ``reduction_axes`` (default every
    axis but 0). Unlike ``flax.nnx.GroupNorm`` 0.12, ``reduction_axes=(-1,)`` on
    (B, T, C) is right (each time step on its own, as ``flax.linen`` does).
    Calls :func:`jaxnorm.group_norm` once.

    Args:
      num_features: C.
      num_groups: G (default 32); pass ``num_groups=None`` with ``group_size``.
      group_size: C/G.
      reduction_axes: axes reduced within a group; must include the last axis.
      (others): as :class:`LayerNorm`.

    Raises:
      ValueError: neither or both of num_groups/group_size, or a non-divisor of C.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> gn = jnx.GroupNorm(32, num_groups=8, rngs=nnx.Rngs(0))
      >>> gn(jax.random.normal(jax.random.key(0), (2, 4, 4, 32))).shape
      (2, 4, 4, 32)
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = EMPTY,
        scale_metadata: Mapping[str, Any] = EMPTY,
    ):
        groups, size = check_groups("jaxnorm.nnx.GroupNorm", num_features, num_groups, group_size)
        self._init_common(
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.num_groups = groups
        self.group_size = size
        self.reduction_axes = reduction_axes
        self.feature_axis = -1

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Group-normalizes x (N, ..., C).

        Args:
          x: floating array, channels last, batch axis 0.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: bad axes, shapes or mask (from :func:`jaxnorm.group_norm`).
        """
        x, scale, bias = self._promoted(x)
        # num_groups and group_size are both stored (as flax does); the core takes one.
        options = {**group_norm_options(self), "group_size": None}
        return group_norm(x, scale, bias, mask=mask, dtype=self.dtype, **options)


class InstanceNorm(Stateless):
    """Instance normalization (Ulyanov et al. 2016), drop-in for ``flax.nnx.InstanceNorm``.

    Per example and channel (``feature_axes``), standardize over every other
    non-batch axis: (N, H, W, C) by default, NCHW with ``feature_axes=1``.
    Calls :func:`jaxnorm.instance_norm` once.

    Args:
      num_features: C.
      feature_axes: the kept channel axis (never 0).
      (others): as :class:`LayerNorm`.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> inorm = jnx.InstanceNorm(3, feature_axes=1, rngs=nnx.Rngs(0))
      >>> inorm(jax.random.normal(jax.random.key(0), (2, 3, 8, 8))).shape
      (2, 3, 8, 8)
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
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
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
            num_features,
            epsilon=epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            use_bias=use_bias,
            use_scale=use_scale,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            promote_dtype=promote_dtype,
            rngs=rngs,
            bias_metadata=bias_metadata,
            scale_metadata=scale_metadata,
        )
        self.feature_axes = feature_axes

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
        x, scale, bias = self._promoted(x)
        return instance_norm(x, scale, bias, mask=mask, dtype=self.dtype, **instance_norm_options(self))
