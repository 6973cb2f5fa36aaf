"""NNX BatchNorm and BatchRenorm: variables and one call into the core.

The core functions are :func:`jaxnorm.batch_norm` and :func:`jaxnorm.batch_renorm`.

The keyword arguments handed to the core come from
:func:`jaxnorm._flax_common.batch_norm_options` (shared with the linen
layers). Imports no ``jaxnorm.linen`` / ``jaxnorm._linen``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._flax_common import batch_norm_options, merge_call_option
from jaxnorm._nnx.common import EMPTY, Dtype, Initializer, param, value
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_renorm import batch_renorm
from jaxnorm._src.checks import check_choice, check_static_bool
from jaxnorm._src.state import AVERAGES, BatchStats, init_batch_stats, stats_as_arrays, stats_from_arrays

Array = jax.Array


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
        bias_metadata: Mapping[str, Any] = EMPTY,
        scale_metadata: Mapping[str, Any] = EMPTY,
        average: str = "ema",
        unbiased: bool = False,
    ):
        fresh = init_batch_stats(num_features)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.count = nnx.BatchStat(fresh.count)
        shape = (num_features,)
        self.scale = param(scale_init, rngs, shape, param_dtype, scale_metadata, use_scale)
        self.bias = param(bias_init, rngs, shape, param_dtype, bias_metadata, use_bias)
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

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None, momentum: Any = None
    ) -> Array:
        """Normalizes ``x``; in training also updates ``mean``, ``var`` and ``count``.

        Args:
          x: (N, ..., C) (or C on ``axis``), floating.
          use_running_average: overrides the attribute for this call.
          mask: bool, broadcasts to x; True marks values that count.
          momentum: this call's momentum (e.g. a traced schedule value); default the attribute.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: ``use_running_average`` is None in both places, or bad
            axes, shapes, mask or options (from :func:`jaxnorm.batch_norm`).
        """
        return self._normalize(x, use_running_average, mask, batch_norm, **call_momentum(momentum))

    def _normalize(
        self, x: Array, use_running_average: bool | None, mask: Array | None, core: Any, **options: Any
    ) -> Array:
        """Calls ``core`` (jn.batch_norm or jn.batch_renorm) once and stores the new statistics."""
        name = type(self).__name__
        fn = f"jaxnorm.nnx.{name}"
        if use_running_average is None:
            use_running_average = merge_call_option(
                fn,
                "use_running_average",
                self.use_running_average,
                None,
                example=f"{name}(..., use_running_average=...)` or `model.eval()",
                call_example="bn(x, use_running_average=...)",
            )
        training = not check_static_bool(fn, "use_running_average", use_running_average)
        x, scale, bias = self.promote_dtype((x, value(self.scale), value(self.bias)), dtype=self.dtype)
        stats = stats_from_arrays(self.mean[...], self.var[...], self.count[...])
        y, new = core(
            x,
            stats,
            scale,
            bias,
            training=training,
            mask=mask,
            dtype=self.dtype,
            **{**batch_norm_options(self), **options},
        )
        if training:
            self.mean[...], self.var[...], self.count[...] = stats_as_arrays(new)
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
            self.average = check_choice("jaxnorm.nnx.BatchNorm", "average", average, AVERAGES)


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
        momentum: Any = None,
    ) -> Array:
        """Normalizes ``x``, in training with the renorm correction.

        Args:
          x: (N, ..., C) (or C on ``axis``), floating.
          use_running_average: overrides the attribute for this call.
          r_max, d_max: this call's limits (e.g. from :func:`jaxnorm.renorm_schedule`);
            default the attributes.
          mask: bool, broadcasts to x; True marks values that count.
          momentum: this call's momentum (e.g. a traced schedule value); default the attribute.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: as :class:`BatchNorm`, and limits out of range.
        """
        return self._normalize(
            x,
            use_running_average,
            mask,
            batch_renorm,
            r_max=self.r_max if r_max is None else r_max,
            d_max=self.d_max if d_max is None else d_max,
            **call_momentum(momentum),
        )


def layer_state(layer: BatchNorm) -> BatchStats:
    """The statistics a layer holds, as a plain :class:`~jaxnorm.BatchStats`."""
    return BatchStats(layer.mean[...], layer.var[...], layer.count[...])


def set_layer_state(layer: BatchNorm, stats: BatchStats) -> None:
    """Stores ``stats`` in the layer's ``nnx.BatchStat`` variables."""
    layer.mean[...], layer.var[...], layer.count[...] = stats.mean, stats.var, stats.count


def call_momentum(momentum: Any) -> dict[str, Any]:
    """The call-time ``momentum`` as a keyword for the core, when given.

    A traced momentum (a schedule inside one compiled step) belongs here rather
    than in the attribute, which nnx keeps as static metadata.
    """
    return {} if momentum is None else {"momentum": momentum}
