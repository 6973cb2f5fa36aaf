"""Conditional norms for Flax NNX: the twins of :mod:`jaxnorm._linen.conditional`.

Each layer holds two ``nnx.Linear`` projections, ``scale`` and ``bias``, from
``condition_features`` to ``num_features`` (kernels zero, biases one and zero:
the plain norm at init), and calls the core norm once with their outputs as
per-example parameters. :class:`ConditionalBatchNorm` also holds the
``nnx.BatchStat`` ``mean``, ``var`` and ``count`` of :class:`jaxnorm.nnx.BatchNorm`
and honours ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._flax_common import batch_norm_options, merge_call_option
from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.checks import check_floating, check_static_bool
from jaxnorm._src.group_norm import check_groups, group_norm, instance_norm
from jaxnorm._src.layer_norm import layer_norm
from jaxnorm._src.per_example import Projection, conditional_affine
from jaxnorm._src.state import init_batch_stats, stats_as_arrays, stats_from_arrays

Array = jax.Array
Dtype = Any
Initializer = Any

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
Axes = Any

__all__ = ["ConditionalBatchNorm", "ConditionalGroupNorm", "ConditionalInstanceNorm", "ConditionalLayerNorm"]


def _ignoring_width(linear: nnx.Linear) -> Projection:
    """An ``nnx.Linear`` as the core's projection: its width was fixed when it was built."""
    return lambda _features, condition: linear(condition)


class _Conditional(nnx.Module):
    """The two projections and the options every conditional layer shares."""

    def _init_projections(
        self, num_features: int, condition_features: int, *, use_scale: bool, use_bias: bool,
        kernel_init: Initializer, scale_init: Initializer, bias_init: Initializer,
        dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs,
    ) -> None:
        def linear(use: bool, init: Initializer) -> Any:
            if not use:
                return nnx.data(None)
            return nnx.Linear(
                condition_features, num_features, kernel_init=kernel_init, bias_init=init,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )

        self.scale = linear(use_scale, scale_init)
        self.bias = linear(use_bias, bias_init)
        self.num_features = num_features
        self.condition_features = condition_features
        self.use_scale = use_scale
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _projected(self, fn: str, x: Array, condition: Array, feature_axes: Sequence[int]) -> tuple[Any, Any]:
        """The per-example scale and shift from the ``scale`` and ``bias`` projections (one core call)."""
        return conditional_affine(
            fn, jnp.shape(x), condition, feature_axes,
            scale=None if self.scale is None else _ignoring_width(self.scale),
            bias=None if self.bias is None else _ignoring_width(self.bias),
        )

    def _out_dtype(self, x: Array, scale: Any, bias: Any) -> Any:
        return dtypes.canonicalize_dtype(*(a for a in (x, scale, bias) if a is not None), dtype=self.dtype)


class ConditionalBatchNorm(_Conditional):
    """Conditional batch norm (de Vries et al. 2017; BigGAN), NNX twin of the linen layer.

    ``y = BN(x) * scale(c) + shift(c)`` with :func:`jaxnorm.batch_norm`; in
    training it updates ``mean``, ``var``, ``count``; ``model.eval()`` switches
    to the running statistics.

    Args:
      use_running_average: and ``axis``, ``momentum``, ``epsilon``, ``axis_name``,
        ``axis_index_groups``, ``average``, ``unbiased``: as :class:`jaxnorm.nnx.BatchNorm`.
      num_features: C, the size of the feature (channel) axis.
      condition_features: D, the size of the condition vector.
      use_scale, use_bias: project a scale / a shift from the condition.
      kernel_init: the projections' kernels (default zeros: the plain norm at init).
      scale_init, bias_init: the projections' biases (ones and zeros).
      dtype: output dtype; param_dtype: the projections' parameters.
      rngs: ``nnx.Rngs`` for the initializers.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> cbn = jnx.ConditionalBatchNorm(3, 4, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> y = cbn(x, jax.nn.one_hot(jnp.arange(8) % 4, 4))
      >>> int(cbn.count[...])
      1
    """

    def __init__(
        self,
        num_features: int,
        condition_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        kernel_init: Initializer = _ZEROS,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        average: str = "ema",
        unbiased: bool = False,
        rngs: nnx.Rngs,
    ):
        fresh = init_batch_stats(num_features)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.count = nnx.BatchStat(fresh.count)
        self._init_projections(
            num_features, condition_features, use_scale=use_scale, use_bias=use_bias,
            kernel_init=kernel_init, scale_init=scale_init, bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.average = average
        self.unbiased = unbiased

    def __call__(
        self, x: Array, condition: Array, *, use_running_average: bool | None = None, mask: Array | None = None,
    ) -> Array:
        """Batch-normalizes ``x`` with the scale and shift of ``condition`` (N, D); x's shape.

        Raises:
          ValueError: ``use_running_average`` None in both places, a condition
            that is not (N, D), or bad axes, shapes, mask or options.
        """
        fn = "jaxnorm.nnx.ConditionalBatchNorm"
        if use_running_average is None:
            use_running_average = merge_call_option(
                fn, "use_running_average", self.use_running_average, None,
                example="ConditionalBatchNorm(..., use_running_average=...)` or `model.eval()",
                call_example="cbn(x, condition, use_running_average=...)",
            )
        training = not check_static_bool(fn, "use_running_average", use_running_average)
        check_floating(fn, x)
        axes = canonical_axes(fn, "axis", self.axis, jnp.shape(x))
        scale, bias = self._projected(fn, x, condition, axes)
        y, new = batch_norm(
            x, stats_from_arrays(self.mean[...], self.var[...], self.count[...]), scale, bias,
            training=training, mask=mask, dtype=self._out_dtype(x, scale, bias),
            **batch_norm_options(self),
        )
        if training:
            self.mean[...], self.var[...], self.count[...] = stats_as_arrays(new)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class ConditionalLayerNorm(_Conditional):
    """Conditional (adaptive) layer norm: adaLN of diffusion transformers, NNX twin.

    ``y = LN(x) * scale(c) + shift(c)`` (:func:`jaxnorm.layer_norm`);
    ``condition`` is (N, D), or (B, T, D) on (B, T, C) for one vector per token.

    Args:
      reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups: as
        :class:`jaxnorm.nnx.LayerNorm`.
      num_features: C, the size of the feature (channel) axis.
      condition_features: D, the size of the condition vector.
      use_scale, use_bias: project a scale / a shift from the condition.
      kernel_init: the projections' kernels (default zeros: the plain norm at init).
      scale_init, bias_init: the projections' biases (ones and zeros).
      dtype: output dtype; param_dtype: the projections' parameters.
      rngs: ``nnx.Rngs`` for the initializers.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> ln = jnx.ConditionalLayerNorm(8, 16, rngs=nnx.Rngs(0))
      >>> ln(jax.random.normal(jax.random.key(0), (2, 5, 8)), jax.random.normal(jax.random.key(1), (2, 16))).shape
      (2, 5, 8)
    """

    def __init__(
        self,
        num_features: int,
        condition_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        kernel_init: Initializer = _ZEROS,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        rngs: nnx.Rngs,
    ):
        self._init_projections(
            num_features, condition_features, use_scale=use_scale, use_bias=use_bias,
            kernel_init=kernel_init, scale_init=scale_init, bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.epsilon = epsilon
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Layer-normalizes ``x`` with the scale and shift of ``condition`` (x's shape)."""
        fn = "jaxnorm.nnx.ConditionalLayerNorm"
        check_floating(fn, x)
        feature_axes = canonical_axes(fn, "feature_axes", self.feature_axes, jnp.shape(x))
        scale, bias = self._projected(fn, x, condition, feature_axes)
        return layer_norm(
            x, scale, bias, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self._out_dtype(x, scale, bias),
        )


class ConditionalGroupNorm(_Conditional):
    """Conditional group norm, NNX twin: ``y = GN(x) * scale(c) + shift(c)`` (:func:`jaxnorm.group_norm`).

    Args:
      num_groups: and ``group_size``, ``reduction_axes``, ``epsilon``, ``axis_name``,
        ``axis_index_groups``: as :class:`jaxnorm.nnx.GroupNorm`.
      channel_axis: -1 (NHWC, default) or 1 (NCHW).
      num_features: C, the size of the feature (channel) axis.
      condition_features: D, the size of the condition vector.
      use_scale, use_bias: project a scale / a shift from the condition.
      kernel_init: the projections' kernels (default zeros: the plain norm at init).
      scale_init, bias_init: the projections' biases (ones and zeros).
      dtype: output dtype; param_dtype: the projections' parameters.
      rngs: ``nnx.Rngs`` for the initializers.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> gn = jnx.ConditionalGroupNorm(32, 10, num_groups=8, rngs=nnx.Rngs(0))
      >>> gn(jax.random.normal(jax.random.key(0), (2, 4, 4, 32)), jax.random.normal(jax.random.key(1), (2, 10))).shape
      (2, 4, 4, 32)
    """

    def __init__(
        self,
        num_features: int,
        condition_features: int,
        *,
        num_groups: int | None = 32,
        group_size: int | None = None,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        kernel_init: Initializer = _ZEROS,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        channel_axis: int = -1,
        reduction_axes: Axes | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        rngs: nnx.Rngs,
    ):
        check_groups("jaxnorm.nnx.ConditionalGroupNorm", num_features, num_groups, group_size)
        self._init_projections(
            num_features, condition_features, use_scale=use_scale, use_bias=use_bias,
            kernel_init=kernel_init, scale_init=scale_init, bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.num_groups = num_groups
        self.group_size = group_size
        self.epsilon = epsilon
        self.channel_axis = channel_axis
        self.reduction_axes = reduction_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Group-normalizes ``x`` with the scale and shift of ``condition`` (x's shape)."""
        fn = "jaxnorm.nnx.ConditionalGroupNorm"
        check_floating(fn, x)
        channel = canonical_axes(fn, "channel_axis", self.channel_axis, jnp.shape(x))
        scale, bias = self._projected(fn, x, condition, channel)
        return group_norm(
            x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
            channel_axis=self.channel_axis, reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self._out_dtype(x, scale, bias),
        )


class ConditionalInstanceNorm(_Conditional):
    """Conditional instance norm (Dumoulin et al. 2017), NNX twin (:func:`jaxnorm.instance_norm`).

    Args:
      feature_axes: the kept channel axis (-1 NHWC, 1 NCHW).
      epsilon, axis_name, axis_index_groups: as :class:`jaxnorm.nnx.InstanceNorm`.
      num_features: C, the size of the feature (channel) axis.
      condition_features: D, the size of the condition vector.
      use_scale, use_bias: project a scale / a shift from the condition.
      kernel_init: the projections' kernels (default zeros: the plain norm at init).
      scale_init, bias_init: the projections' biases (ones and zeros).
      dtype: output dtype; param_dtype: the projections' parameters.
      rngs: ``nnx.Rngs`` for the initializers.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> cin = jnx.ConditionalInstanceNorm(3, 3, rngs=nnx.Rngs(0))
      >>> cin(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jax.nn.one_hot(jnp.array([0, 2]), 3)).shape
      (2, 8, 8, 3)
    """

    def __init__(
        self,
        num_features: int,
        condition_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        kernel_init: Initializer = _ZEROS,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        feature_axes: Axes = -1,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        rngs: nnx.Rngs,
    ):
        self._init_projections(
            num_features, condition_features, use_scale=use_scale, use_bias=use_bias,
            kernel_init=kernel_init, scale_init=scale_init, bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.epsilon = epsilon
        self.feature_axes = feature_axes
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Instance-normalizes ``x`` with the scale and shift of ``condition`` (x's shape)."""
        fn = "jaxnorm.nnx.ConditionalInstanceNorm"
        check_floating(fn, x)
        feature_axes = canonical_axes(fn, "feature_axes", self.feature_axes, jnp.shape(x))
        scale, bias = self._projected(fn, x, condition, feature_axes)
        return instance_norm(
            x, scale, bias, channel_axis=self.feature_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self._out_dtype(x, scale, bias),
        )
