"""Conditional norms for Flax linen: the scale and shift come from a condition vector.

Each layer normalizes ``x`` like its plain twin (:class:`jaxnorm.linen.BatchNorm`,
``InstanceNorm``, ``GroupNorm``, ``LayerNorm``) and takes ``condition`` at call
time (``layer(x, condition)``): one vector per example, (N, D), such as a class
embedding (conditional batch norm, de Vries et al. 2017; BigGAN, Brock et al.
2019) or a diffusion time-step embedding (adaLN, Peebles & Xie 2023). Two Dense
layers map it to the per-example scale and shift, which the core norm takes as
per-example parameters of shape (N, 1, ..., C):

    scale = condition @ W_s + b_s,   shift = condition @ W_b + b_b

``W_s`` and ``W_b`` start at zero (``kernel_init``), ``b_s`` at one
(``scale_init``) and ``b_b`` at zero (``bias_init``), so at initialization
the layer *is* the plain norm (the adaLN-Zero / BigGAN ``1 + gamma(c)``
start), and ``b_s``, ``b_b`` are the plain norm's learned gamma and beta.

Variables: ``params/scale/{kernel,bias}`` and ``params/bias/{kernel,bias}``
(the Dense projections; ``params/scale/bias`` plays the plain norm's
``params/scale``), and for :class:`ConditionalBatchNorm` the plain BatchNorm's
``batch_stats/{mean,var,count}``. No maths here: the Dense layers and one core
call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._flax_common import batch_norm_options, merge_call_option
from jaxnorm._linen.common import output_dtype
from jaxnorm._src.axes import canonical_axes, layout
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.checks import check_floating, check_static_bool
from jaxnorm._src.group_norm import group_norm, instance_norm
from jaxnorm._src.layer_norm import layer_norm
from jaxnorm._src.per_example import Projection, conditional_affine
from jaxnorm._src.state import init_batch_stats, stats_as_arrays, stats_from_arrays

Array = jax.Array
Dtype = Any
Initializer = Any
Axes = Any

__all__ = ["ConditionalBatchNorm", "ConditionalGroupNorm", "ConditionalInstanceNorm", "ConditionalLayerNorm"]


def _dense(mdl: nn.Module, name: str, bias_init: Initializer) -> Projection:
    """The projection named ``name``: a Dense layer of the width the core asks for."""

    def project(features: int, condition: Array) -> Array:
        return nn.Dense(
            features, kernel_init=mdl.kernel_init, bias_init=bias_init, dtype=mdl.dtype,
            param_dtype=mdl.param_dtype, name=name,
        )(condition)

    return project


def _projections(mdl: nn.Module, fn: str, x: Array, condition: Array, feature_axes: Sequence[int]) -> tuple[Any, Any]:
    """The per-example scale and shift from Dense layers named ``scale`` and ``bias`` (one core call)."""
    return conditional_affine(
        fn, jnp.shape(x), condition, feature_axes,
        scale=_dense(mdl, "scale", mdl.scale_init) if mdl.use_scale else None,
        bias=_dense(mdl, "bias", mdl.bias_init) if mdl.use_bias else None,
    )


class ConditionalBatchNorm(nn.Module):
    """Conditional batch norm (de Vries et al. 2017; BigGAN): batch norm with a per-example affine map.

    ``y = BN(x) * scale(c) + shift(c)`` with the batch statistics (training)
    or running ones (evaluation) of :func:`jaxnorm.batch_norm`, and scale and
    shift projected from ``condition`` (N, D) by zero-initialized Dense layers:
    at init the layer equals :class:`jaxnorm.linen.BatchNorm`.

    Attributes:
      use_running_average: True to evaluate; give it here or at call time, not both.
      axis: kept feature axis (-1 for NHWC, 1 for NCHW).
      momentum, epsilon, average, unbiased, axis_name, axis_index_groups: as
        in :class:`jaxnorm.linen.BatchNorm`.
      dtype: output dtype; default the promoted dtype of x and the projections.
      param_dtype: dtype of the projections' parameters.
      use_scale, use_bias: project a scale / a shift from the condition.
      kernel_init: the projections' kernels (default zeros: the plain norm at init).
      scale_init, bias_init: the projections' biases (ones and zeros: gamma and beta).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> c = jax.nn.one_hot(jnp.arange(8) % 4, 4)     # class labels
      >>> cbn = jnl.ConditionalBatchNorm()
      >>> variables = cbn.init(jax.random.key(1), x, c, use_running_average=False)
      >>> sorted(variables["batch_stats"]), variables["params"]["scale"]["kernel"].shape
      (['count', 'mean', 'var'], (4, 3))
      >>> y, upd = cbn.apply(variables, x, c, use_running_average=False, mutable=["batch_stats"])
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    kernel_init: Initializer = initializers.zeros
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    average: str = "ema"
    unbiased: bool = False

    @nn.compact
    def __call__(
        self, x: Array, condition: Array, *, use_running_average: bool | None = None, mask: Array | None = None,
    ) -> Array:
        """Batch-normalizes ``x`` with the scale and shift of ``condition``.

        Args:
          x: (N, ..., C) (or C on ``axis``), floating.
          condition: (N, D) floating, one vector per example.
          use_running_average: True to evaluate; here or as the field, not both.
          mask: bool, broadcasts to x; True marks values that count in the statistics.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: ``use_running_average`` twice or not at all, a condition
            that is not (N, D), or bad axes, shapes, mask or options.
        """
        fn = "jaxnorm.linen.ConditionalBatchNorm"
        use_running_average = merge_call_option(
            fn, "use_running_average", self.use_running_average, use_running_average,
            example="ConditionalBatchNorm(use_running_average=...)",
            call_example="cbn(x, condition, use_running_average=...)",
        )
        training = not check_static_bool(fn, "use_running_average", use_running_average)
        check_floating(fn, x)
        lay = layout(fn, jnp.shape(x), self.axis)
        fresh = init_batch_stats(lay.feature_shape)
        mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        var = self.variable("batch_stats", "var", lambda: fresh.var)
        count = self.variable("batch_stats", "count", lambda: fresh.count)
        scale, bias = _projections(self, fn, x, condition, lay.feature_axes)
        initializing = self.is_initializing()
        if initializing and lay.values_per_feature < 2:
            training = False  # as jaxnorm.linen.BatchNorm: init may see one example
        y, new = batch_norm(
            x, stats_from_arrays(mean.value, var.value, count.value), scale, bias,
            training=training, mask=mask, dtype=output_dtype(self.dtype, x, scale, bias),
            **batch_norm_options(self, initializing=initializing),
        )
        if training and not initializing:
            mean.value, var.value, count.value = stats_as_arrays(new)
        return y


class ConditionalLayerNorm(nn.Module):
    """Conditional (adaptive) layer norm: adaLN of diffusion transformers (Peebles & Xie 2023).

    ``y = LN(x) * scale(c) + shift(c)`` with :func:`jaxnorm.layer_norm`'s
    statistics over ``reduction_axes`` and scale and shift projected from
    ``condition``: (N, D) for one vector per example (DiT's time step and
    class), or (B, T, D) on (B, T, C) for one per token. Zero-initialized
    projections make it the plain :class:`jaxnorm.linen.LayerNorm` at init;
    ``scale(c) = 1 + condition @ W_s`` is adaLN-Zero's ``1 + scale``.

    Attributes:
      reduction_axes: axes the statistics are computed over.
      feature_axes: axes the projected scale and shift span.
      (others): as in :class:`ConditionalBatchNorm` and :class:`jaxnorm.linen.LayerNorm`.

    Example:
      >>> import jax, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8))       # (B, T, C) tokens
      >>> t = jax.random.normal(jax.random.key(1), (2, 16))         # time-step embedding
      >>> y, variables = jnl.ConditionalLayerNorm().init_with_output(jax.random.key(2), x, t)
      >>> y.shape, variables["params"]["bias"]["kernel"].shape
      ((2, 5, 8), (16, 8))
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    kernel_init: Initializer = initializers.zeros
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Layer-normalizes ``x`` with the scale and shift of ``condition`` (x's shape).

        Raises:
          ValueError: a condition that is not (N, D) (or x's leading axes plus
            D), bad axes, shapes or mask.
        """
        fn = "jaxnorm.linen.ConditionalLayerNorm"
        check_floating(fn, x)
        feature_axes = canonical_axes(fn, "feature_axes", self.feature_axes, jnp.shape(x))
        scale, bias = _projections(self, fn, x, condition, feature_axes)
        return layer_norm(
            x, scale, bias, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias),
        )


class ConditionalGroupNorm(nn.Module):
    """Conditional group norm: group norm with a per-example scale and shift from a condition.

    ``y = GN(x) * scale(c) + shift(c)`` (:func:`jaxnorm.group_norm`), as in
    the time-conditioned ResNet blocks of diffusion U-Nets; equal to
    :class:`jaxnorm.linen.GroupNorm` at init.

    Attributes:
      num_groups, group_size, reduction_axes: as in :class:`jaxnorm.linen.GroupNorm`.
      channel_axis: -1 (NHWC, default) or 1 (NCHW).
      (others): as in :class:`ConditionalBatchNorm`.

    Example:
      >>> import jax, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
      >>> c = jax.random.normal(jax.random.key(1), (2, 10))
      >>> y, _ = jnl.ConditionalGroupNorm(num_groups=8).init_with_output(jax.random.key(2), x, c)
      >>> y.shape
      (2, 4, 4, 32)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    kernel_init: Initializer = initializers.zeros
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    channel_axis: int = -1
    reduction_axes: Axes | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Group-normalizes ``x`` with the scale and shift of ``condition`` (x's shape).

        Raises:
          ValueError: a condition that is not (N, D), bad groups, axes, shapes or mask.
        """
        fn = "jaxnorm.linen.ConditionalGroupNorm"
        check_floating(fn, x)
        channel = canonical_axes(fn, "channel_axis", self.channel_axis, jnp.shape(x))
        scale, bias = _projections(self, fn, x, condition, channel)
        return group_norm(
            x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
            channel_axis=self.channel_axis, reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias),
        )


class ConditionalInstanceNorm(nn.Module):
    """Conditional instance norm (Dumoulin et al. 2017, multi-style transfer).

    ``y = IN(x) * scale(c) + shift(c)`` (:func:`jaxnorm.instance_norm`) with
    scale and shift projected from ``condition`` (N, D), e.g. a one-hot style
    index; equal to :class:`jaxnorm.linen.InstanceNorm` at init.

    Attributes:
      feature_axes: the kept channel axis (-1 NHWC, 1 NCHW).
      (others): as in :class:`ConditionalBatchNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> style = jax.nn.one_hot(jnp.array([0, 2]), 3)
      >>> y, _ = jnl.ConditionalInstanceNorm().init_with_output(jax.random.key(1), x, style)
      >>> y.shape
      (2, 8, 8, 3)
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    kernel_init: Initializer = initializers.zeros
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: str | None = None
    axis_index_groups: Any = None

    @nn.compact
    def __call__(self, x: Array, condition: Array, *, mask: Array | None = None) -> Array:
        """Instance-normalizes ``x`` with the scale and shift of ``condition`` (x's shape).

        Raises:
          ValueError: a condition that is not (N, D), a feature axis that is
            the batch axis, bad shapes or mask.
        """
        fn = "jaxnorm.linen.ConditionalInstanceNorm"
        check_floating(fn, x)
        feature_axes = canonical_axes(fn, "feature_axes", self.feature_axes, jnp.shape(x))
        scale, bias = _projections(self, fn, x, condition, feature_axes)
        return instance_norm(
            x, scale, bias, channel_axis=self.feature_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias),
        )
