"""linen BatchNorm and BatchRenorm: variables and one call into the core.

The core functions are :func:`jaxnorm.batch_norm` and :func:`jaxnorm.batch_renorm`.

The keyword arguments handed to the core come from
:func:`jaxnorm._flax_common.batch_norm_options` (shared with the NNX
layers); the variables are read and written with
:func:`jaxnorm._src.state.stats_from_arrays` / ``stats_as_arrays``, whose
count layout carries the PreciseBN mark.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from jaxnorm._flax_common import batch_norm_options, merge_call_option
from jaxnorm._linen.common import Dtype, Initializer, output_dtype, params
from jaxnorm._src.axes import layout
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_renorm import batch_renorm
from jaxnorm._src.checks import check_static_bool
from jaxnorm._src.state import init_batch_stats, stats_as_arrays, stats_from_arrays

Array = jax.Array


class BatchNorm(nn.Module):
    """Batch normalization (Ioffe & Szegedy 2015), drop-in for ``flax.linen.BatchNorm``.

    Shapes: N batch, C features, ``...`` spatial axes. ``axis`` is the kept
    feature axis (or axes); every other axis is reduced: NHWC uses the default
    ``axis=-1``, PyTorch's NCHW layout ``axis=1``.

    Training (``use_running_average=False``) normalizes with the batch mean and
    biased variance and updates ``batch_stats`` (apply with
    ``mutable=["batch_stats"]``, else flax raises its usual
    ``ModifyScopeVariableError``); evaluation normalizes with the running
    statistics. ``init`` never updates the statistics.

    Attributes:
      use_running_average: True to evaluate with the running statistics. Give
        it here or at call time, not both.
      axis: kept feature axis or axes.
      momentum: weight on the old running value (flax's direction):
        ``new = momentum * old + (1 - momentum) * batch``. PyTorch's
        ``momentum=0.1`` is ``momentum=0.9`` here.
      epsilon: added to the variance.
      dtype: output dtype; default the promoted dtype of x and the params (flax's rule).
      param_dtype: dtype of scale and bias.
      use_bias, use_scale: learn beta / gamma.
      bias_init, scale_init: their initializers.
      axis_name: named axis (``nn.vmap``, ``shard_map``, ``pmap``) to synchronize
        statistics over (ignored during ``init``, as in flax): count-weighted
        global statistics, one all-reduce forward and one backward (see
        :func:`jaxnorm.batch_norm`); flax's own layer averages per-device
        means instead, which is wrong when masks leave devices uneven counts.
      axis_index_groups: groups of ``axis_name`` indices that synchronize among themselves.
      use_fast_variance: accepted for flax compatibility and ignored: the
        variance is always the stable shifted one.
      force_float32_reductions: accepted and ignored: statistics always
        accumulate in at least float32.
      average: ``"ema"`` (flax, default) or ``"cumulative"`` (the plain mean
        over all batches, PyTorch's ``momentum=None``).
      unbiased: fold ``m/(m-1)`` times the batch variance into the running
        variance (PyTorch's behaviour, the paper's Algorithm 2).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> bn = jnl.BatchNorm(momentum=0.9)
      >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
      >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
      >>> sorted(variables["batch_stats"])
      ['count', 'mean', 'var']
      >>> y, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      >>> int(upd["batch_stats"]["count"])
      1
      >>> y_eval = bn.apply({**variables, **upd}, x, use_running_average=True)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    average: str = "ema"
    unbiased: bool = False

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None, momentum: Any = None
    ) -> Array:
        """Normalizes ``x`` with batch statistics (training) or running ones.

        Args:
          x: (N, ..., C) or any layout (see ``axis``), floating.
          use_running_average: True to evaluate; give it here or as the field, not both.
          mask: bool, broadcasts to x (e.g. (B, T, 1) for padded sequences);
            True marks values that count in the statistics.
          momentum: this call's momentum (e.g. a traced schedule value); default the field.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: ``use_running_average`` given twice or not at all, bad
            axes, shapes, mask or options (from :func:`jaxnorm.batch_norm`).
        """
        return self._normalize(x, use_running_average, mask, batch_norm, **call_momentum(momentum))

    def _normalize(
        self, x: Array, use_running_average: bool | None, mask: Array | None, core: Any, **options: Any
    ) -> Array:
        """Declares the variables and calls ``core`` (jn.batch_norm or jn.batch_renorm) once."""
        name = type(self).__name__
        fn = f"jaxnorm.linen.{name}"
        use_running_average = merge_call_option(
            fn,
            "use_running_average",
            self.use_running_average,
            use_running_average,
            example=f"{name}(use_running_average=...)",
            call_example="bn(x, use_running_average=...)",
        )
        training = not check_static_bool(fn, "use_running_average", use_running_average)
        lay = layout(fn, jnp.shape(x), self.axis)
        fresh = init_batch_stats(lay.feature_shape)
        mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        var = self.variable("batch_stats", "var", lambda: fresh.var)
        count = self.variable("batch_stats", "count", lambda: fresh.count)
        scale, bias = params(self, lay.feature_shape, self.use_scale, self.use_bias)

        initializing = self.is_initializing()
        if initializing and lay.values_per_feature < 2:
            # flax lets init see a single example; the running statistics give
            # the same shapes and are not updated during init anyway.
            training = False
        y, new = core(
            x,
            stats_from_arrays(mean.value, var.value, count.value),
            scale,
            bias,
            training=training,
            mask=mask,
            dtype=output_dtype(self.dtype, x, scale, bias),
            **{**batch_norm_options(self, initializing=initializing), **options},
        )
        if training and not initializing:
            mean.value, var.value, count.value = stats_as_arrays(new)
        return y


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017) over :func:`jaxnorm.batch_renorm`.

    The fields, variables (``params/{scale,bias}``,
    ``batch_stats/{mean,var,count}``) and train/eval switching of
    :class:`BatchNorm`, plus the correction limits ``r_max`` and ``d_max``. In
    training the output is corrected towards the running statistics
    (``x_hat * r + d``, see :func:`jaxnorm.batch_renorm`); evaluation is batch
    norm's. Feed the paper's warm-up (:func:`jaxnorm.renorm_schedule`) through
    the call-time ``r_max=``/``d_max=``, which override the fields and may be
    traced, so one compiled step serves the whole schedule.

    Attributes:
      r_max: bound on ``r`` (>= 1); 1 disables the scale correction.
      d_max: bound on ``|d|`` (>= 0); 0 disables the shift correction.
      (others): as :class:`BatchNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn, jaxnorm.linen as jnl
      >>> brn = jnl.BatchRenorm(use_running_average=False)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> variables = brn.init(jax.random.key(1), x)
      >>> r_max, d_max = jn.renorm_schedule(10_000)
      >>> y, upd = brn.apply(variables, x, r_max=r_max, d_max=d_max, mutable=["batch_stats"])
      >>> int(upd["batch_stats"]["count"])
      1
    """

    r_max: float = 3.0
    d_max: float = 5.0

    @nn.compact
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
          x: (N, ..., C) or any layout (see ``axis``), floating.
          use_running_average: True to evaluate; give it here or as the field, not both.
          r_max, d_max: this call's limits (e.g. from :func:`jaxnorm.renorm_schedule`);
            default the fields.
          mask: bool, broadcasts to x; True marks values that count.
          momentum: this call's momentum (e.g. a traced schedule value); default the field.

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


def call_momentum(momentum: Any) -> dict[str, Any]:
    """The call-time ``momentum`` as a keyword for the core, when given.

    A traced momentum (a schedule inside one compiled step) belongs here rather
    than in the field, which is a static module field.
    """
    return {} if momentum is None else {"momentum": momentum}
