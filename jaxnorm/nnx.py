"""Flax NNX layers over the jaxnorm core: drop-in for ``flax.nnx``'s norms.

``jaxnorm.nnx.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm`` take the constructor arguments and defaults of the
``flax.nnx`` layers of the same name (``num_features`` first, ``rngs=``) and
hold the same variables: ``nnx.Param`` ``scale``/``bias`` and ``nnx.BatchStat``
``mean``/``var``, plus an int32 ``nnx.BatchStat`` ``count`` on BatchNorm. Each
``__call__`` calls the matching core function once; no formula lives here.

Train/eval switching follows flax: ``model.train()`` / ``model.eval()`` (and
``nnx.view(model, use_running_average=...)``) set the ``use_running_average``
attribute; a ``use_running_average`` given at call time takes precedence.

Recalibration hook (PreciseBN): ``average`` is a plain attribute, so
``nnx.view(model, average="cumulative")`` (or ``model.set_attributes``)
switches every jaxnorm BatchNorm to cumulative averaging without rebuilding the
model, :func:`reset_batch_stats` gives fresh statistics, and
:func:`jaxnorm.linen.override_average` works here too.

Differences from flax are listed in :mod:`jaxnorm.linen` and the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

import jaxnorm as jn
from jaxnorm._src import errors, precise_bn
from jaxnorm._src.batch_norm import AVERAGES
from jaxnorm._src.group_norm import check_groups
from jaxnorm.linen import current_average

Array = jax.Array
Dtype = Any
Initializer = Any
Axes = Any

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "recalibrate",
    "reset_batch_stats",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype, metadata: Mapping[str, Any], use: bool) -> Any:
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


def _value(var: Any) -> Array | None:
    return None if var is None else var[...]


class BatchNorm(nnx.Module):
    """Batch normalization (Ioffe & Szegedy 2015), drop-in for ``flax.nnx.BatchNorm``.

    Shapes: N batch, C features, ``...`` spatial axes; ``axis`` is the kept
    feature axis (-1 for NHWC, 1 for PyTorch's NCHW). In training
    (``use_running_average=False``) the layer normalizes with batch statistics
    and updates its ``nnx.BatchStat`` variables ``mean``, ``var``, ``count``; in
    evaluation it uses the running statistics.

    Args:
      num_features: C, the size of the feature axis.
      use_running_average: True to evaluate; ``model.eval()`` / ``model.train()``
        set it. A value passed at call time takes precedence (flax's rule).
      axis: kept feature axis.
      momentum: weight on the old running value, ``new = momentum * old +
        (1 - momentum) * batch`` (flax's direction; PyTorch's 0.1 is 0.9 here).
      epsilon: added to the variance.
      dtype: output dtype (and the dtype x and params are promoted to).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: their initializers.
      axis_name, axis_index_groups: synchronize statistics over a named axis
        (count-weighted global statistics, one all-reduce forward and one
        backward; see :func:`jaxnorm.batch_norm`).
      use_fast_variance: accepted for flax compatibility and ignored (the
        variance is always the stable shifted one).
      promote_dtype: flax's dtype-promotion function, applied to x and the params.
      rngs: ``nnx.Rngs`` for the initializers.
      bias_metadata, scale_metadata: metadata for the ``nnx.Param`` variables.
      average: ``"ema"`` (default) or ``"cumulative"`` (PyTorch's ``momentum=None``).
      unbiased: fold ``m/(m-1)`` times the batch variance into the running variance.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> bn = jnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> y = bn(x)            # training: updates bn.mean, bn.var, bn.count
      >>> int(bn.count[...])
      1
      >>> bn.eval(); y_eval = bn(x)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros_init(),
        scale_init: Initializer = initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
        average: str = "ema",
        unbiased: bool = False,
    ):
        fresh = jn.init_batch_stats(num_features)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.count = nnx.BatchStat(fresh.count)
        shape = (num_features,)
        self.scale = _param(scale_init, rngs, shape, param_dtype, scale_metadata, use_scale)
        self.bias = _param(bias_init, rngs, shape, param_dtype, bias_metadata, use_bias)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.average = average
        self.unbiased = unbiased

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalizes ``x``; in training also updates ``mean``, ``var`` and ``count``.

        Args:
          x: (N, ..., C) (or C on ``axis``), floating.
          use_running_average: overrides the attribute for this call.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: ``use_running_average`` is None in both places, or bad
            axes, shapes, mask or options (from :func:`jaxnorm.batch_norm`).
        """
        return self._normalize(x, use_running_average, mask, jn.batch_norm)

    def _normalize(self, x: Array, use_running_average: bool | None, mask: Array | None, core: Any, **options: Any) -> Array:
        """Calls ``core`` (jn.batch_norm or jn.batch_renorm) once and stores the new statistics."""
        name = type(self).__name__
        fn = f"jaxnorm.nnx.{name}"
        if use_running_average is None:
            use_running_average = errors.merge_call_option(
                fn, "use_running_average", self.use_running_average, None,
                example=f"{name}(..., use_running_average=...)` or `model.eval()",
                call_example="bn(x, use_running_average=...)",
            )
        training = not errors.check_static_bool(fn, "use_running_average", use_running_average)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        stats = jn.BatchStats(self.mean[...], self.var[...], self.count[...])
        y, new = core(
            x, stats, scale, bias, training=training, axis=self.axis,
            momentum=self.momentum, epsilon=self.epsilon,
            average=current_average(self.average), unbiased=self.unbiased,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=self.dtype, **options,
        )
        if training:
            self.mean[...], self.var[...], self.count[...] = new.mean, new.var, new.count
        return y

    def set_view(self, use_running_average: bool | None = None, average: str | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` and ``average`` when given.

        Args:
          use_running_average: if True, the stored statistics are used instead
            of the batch's.
          average: ``"ema"`` or ``"cumulative"``: ``nnx.view(model,
            average="cumulative")`` is the recalibration hook.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
        if average is not None:
            self.average = errors.check_choice("jaxnorm.nnx.BatchNorm", "average", average, AVERAGES)


class _Stateless(nnx.Module):
    """Holds scale/bias and the options shared by the per-example norms."""

    def _init_common(
        self, num_features: int, *, epsilon: float, dtype: Dtype | None, param_dtype: Dtype,
        use_bias: bool | None, use_scale: bool, bias_init: Initializer, scale_init: Initializer,
        axis_name: Any, axis_index_groups: Any, use_fast_variance: bool, promote_dtype: Any,
        rngs: nnx.Rngs, bias_metadata: Mapping[str, Any], scale_metadata: Mapping[str, Any],
    ) -> None:
        shape = (num_features,)
        self.scale = _param(scale_init, rngs, shape, param_dtype, scale_metadata, use_scale)
        if use_bias is not None:  # None: the layer has no bias at all (RMSNorm)
            self.bias = _param(bias_init, rngs, shape, param_dtype, bias_metadata, use_bias)
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
        return self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)


class LayerNorm(_Stateless):
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
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
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
        return jn.layer_norm(
            x, scale, bias, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            feature_axes=self.feature_axes, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class RMSNorm(_Stateless):
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
        scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        self._init_common(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=None, use_scale=use_scale, bias_init=None, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=_EMPTY, scale_metadata=scale_metadata,
        )
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """RMS-normalizes each example over ``reduction_axes``.

        Args:
          x: floating array.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: bad axes, shapes or mask (from :func:`jaxnorm.rms_norm`).
        """
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return jn.rms_norm(
            x, scale, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            feature_axes=self.feature_axes, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class GroupNorm(_Stateless):
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
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        groups, size = check_groups("jaxnorm.nnx.GroupNorm", num_features, num_groups, group_size)
        self._init_common(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
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
        return jn.group_norm(
            x, scale, bias, num_groups=self.num_groups, channel_axis=self.feature_axis,
            reduction_axes=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


class InstanceNorm(_Stateless):
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
        bias_metadata: Mapping[str, Any] = _EMPTY,
        scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        self._init_common(
            num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, bias_init=bias_init, scale_init=scale_init,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance, promote_dtype=promote_dtype, rngs=rngs,
            bias_metadata=bias_metadata, scale_metadata=scale_metadata,
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
        return jn.instance_norm(
            x, scale, bias, channel_axis=self.feature_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, dtype=self.dtype,
        )


def reset_batch_stats(model: nnx.Module) -> None:
    """Resets every jaxnorm BatchNorm in ``model`` in place: mean 0, var 1, count 0.

    With ``average="cumulative"`` the next training batch then replaces the
    statistics: the start of a PreciseBN recalibration.

    Args:
      model: any NNX module (graph) holding :class:`BatchNorm` layers.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, BatchNorm):
            fresh = jn.init_batch_stats(module.mean[...].shape)
            module.mean[...], module.var[...], module.count[...] = fresh.mean, fresh.var, fresh.count


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017) over :func:`jaxnorm.batch_renorm`.

    The arguments, variables (``scale``, ``bias``, ``mean``, ``var``,
    ``count``) and train/eval switching of :class:`BatchNorm`, plus the
    correction limits. In training the output is corrected towards the running
    statistics (``x_hat * r + d``, see :func:`jaxnorm.batch_renorm`);
    evaluation is batch norm's. Feed the paper's warm-up
    (:func:`jaxnorm.renorm_schedule`) through the call-time ``r_max=`` and
    ``d_max=``, which may be traced, so one compiled step serves the whole
    schedule.

    Args:
      num_features: C, the size of the feature axis.
      r_max: bound on ``r`` (>= 1); 1 disables the scale correction.
      d_max: bound on ``|d|`` (>= 0); 0 disables the shift correction.
      **kwargs: the keyword arguments of :class:`BatchNorm` (``rngs=`` included).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> brn = jnx.BatchRenorm(3, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> r_max, d_max = jn.renorm_schedule(10_000)
      >>> y = brn(x, r_max=r_max, d_max=d_max)   # training: updates mean, var, count
      >>> int(brn.count[...])
      1
    """

    def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.r_max = r_max
        self.d_max = d_max

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        r_max: Any = None,
        d_max: Any = None,
        mask: Array | None = None,
    ) -> Array:
        """Normalizes ``x``, in training with the renorm correction.

        Args:
          x: (N, ..., C) (or C on ``axis``), floating.
          use_running_average: overrides the attribute for this call.
          r_max, d_max: this call's limits (e.g. from :func:`jaxnorm.renorm_schedule`);
            default the attributes.
          mask: bool, broadcasts to x; True marks values that count.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: as :class:`BatchNorm`, and limits out of range.
        """
        return self._normalize(
            x, use_running_average, mask, jn.batch_renorm,
            r_max=self.r_max if r_max is None else r_max,
            d_max=self.d_max if d_max is None else d_max,
        )


def _batch_norm_layers(model: nnx.Module) -> list[BatchNorm]:
    """Every jaxnorm BatchNorm and BatchRenorm in ``model``, in a fixed order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]


def _stats(layer: BatchNorm) -> jn.BatchStats:
    return jn.BatchStats(layer.mean[...], layer.var[...], layer.count[...])


def _set_stats(layer: BatchNorm, stats: jn.BatchStats) -> None:
    layer.mean[...], layer.var[...], layer.count[...] = stats.mean, stats.var, stats.count


def recalibrate(model: nnx.Module, batches: Any) -> None:
    """PreciseBN (Wu & Johnson 2021): recompute every jaxnorm batch norm's statistics in place.

    Runs ``model(batch)`` on every element of ``batches`` with the parameters
    frozen. Every jaxnorm :class:`BatchNorm` and :class:`BatchRenorm` starts
    from fresh statistics and ends with the plain average over the batches of
    its per-batch mean and variance (``unbiased`` honoured), each normalizing
    with batch statistics as in training (batch renorm without its
    correction) whatever mode the model is in. The pass runs on a functional
    copy of the model: only those statistics change; parameters, other layers'
    state (``flax.nnx.BatchNorm`` included, RNG counters) and the model's
    train/eval mode are left as they were. Other layers run in the mode the
    model is in (e.g. dropout is off after ``model.eval()``). The per-batch
    step is jit-compiled once (batches of one shape).

    Args:
      model: an NNX module holding jaxnorm batch-norm layers anywhere inside;
        ``model(batch)`` must run it.
      batches: an iterable of the model's single positional input, e.g. 100
        to 200 training batches.

    Raises:
      ValueError: no jaxnorm batch-norm layer in ``model``, empty ``batches``,
        or no layer folded a batch (every batch non-finite, or a layer called
        with ``use_running_average=True`` explicitly).

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnx.BatchNorm(4, rngs=nnx.Rngs(0)))
      >>> model.eval()
      >>> jnx.recalibrate(model, [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(5)])
      >>> int(model.layers[1].count[...]), model.layers[1].use_running_average
      (5, True)
    """
    fn = "jaxnorm.nnx.recalibrate"
    graphdef, state = nnx.split(model)

    def update(state: Any, stats: list[jn.BatchStats], batch: Any) -> list[jn.BatchStats]:
        copy = nnx.merge(graphdef, state)
        layers = _batch_norm_layers(copy)
        for layer, layer_stats in zip(layers, stats):
            layer.use_running_average = False
            _set_stats(layer, layer_stats)
        copy(batch)
        return [_stats(layer) for layer in layers]

    layers = _batch_norm_layers(model)
    new = precise_bn.run(
        fn, update, [_stats(layer) for layer in layers], batches,
        "do not call the layers with `use_running_average=True` explicitly",
        constants=state,
    )
    for layer, layer_stats in zip(layers, new):
        _set_stats(layer, layer_stats)
