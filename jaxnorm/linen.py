"""Flax linen layers over the jaxnorm core: drop-in for ``flax.linen``'s norms.

``jaxnorm.linen.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm`` take the constructor fields, defaults and variable names of the
``flax.linen`` layers of the same name, so a model switches by changing its
import. Each ``__call__`` only declares variables and calls the matching core
function once (:func:`jaxnorm.batch_norm`, :func:`jaxnorm.layer_norm`, ...):
every formula lives in ``jaxnorm/_src``.

Variables:

- ``params/scale``, ``params/bias``: gamma and beta, as in flax.
- ``batch_stats/mean``, ``batch_stats/var``: running statistics, as in flax.
- ``batch_stats/count`` (BatchNorm only): int32 number of batches folded into
  the statistics; it makes ``average="cumulative"`` possible and saturates
  instead of wrapping. :func:`from_flax_variables` adds it to a flax checkpoint.

Differences from flax (see the README's "Flax" section):

- The variance is always jaxnorm's stable shifted one (see ``jaxnorm.moments``); ``use_fast_variance``
  is accepted for compatibility and ignored (flax's default one-pass
  ``E[x^2] - E[x]^2`` loses every digit for inputs with a large offset).
  ``force_float32_reductions`` is likewise accepted and ignored: statistics
  always accumulate in at least float32 and running statistics stay float32.
- A batch whose statistics are not finite leaves the running statistics
  unchanged (flax writes the NaN into them).
- Training BatchNorm with one value per feature is an error (flax returns the
  bias); during ``init`` such a batch is normalized with the fresh running
  statistics instead, so ``init`` with a single example still works.

Recalibration hook (PreciseBN): :func:`override_average` switches every
jaxnorm BatchNorm traced inside it to another averaging policy without touching
the model, and :func:`fresh_batch_stats` resets the statistics. With
``average="cumulative"`` and ``count == 0`` the first batch replaces the
statistics and later ones are averaged with equal weight::

    with jaxnorm.linen.override_average("cumulative"):
        variables = {**variables, **fresh_batch_stats(variables)}
        for x in batches:
            _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            variables = {**variables, **upd}
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze
from flax.linen import dtypes, initializers

import jaxnorm as jn
from jaxnorm._src import errors, precise_bn
from jaxnorm._src.batch_norm import AVERAGES, layout

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
    "batch_norm_pairs",
    "fold_batch_norms",
    "from_flax_variables",
    "fresh_batch_stats",
    "override_average",
    "recalibrate",
]

_AVERAGE_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxnorm_average_override", default=None)


@contextlib.contextmanager
def override_average(average: str) -> Iterator[None]:
    """Makes every jaxnorm BatchNorm (linen and NNX) traced inside use ``average``.

    The hook for recalibration passes (PreciseBN): switch a trained model to
    ``average="cumulative"`` from fresh statistics (:func:`fresh_batch_stats`)
    without rebuilding it. The override is read when a layer is traced, so call
    ``model.apply`` (or a function jitted for the first time) inside the
    ``with`` block; an already-compiled ``jax.jit`` function keeps the policy it
    was traced with.

    Args:
      average: ``"ema"`` or ``"cumulative"``.

    Raises:
      ValueError: an unknown policy.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> bn = jnl.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> with jnl.override_average("cumulative"):
      ...     _, upd = bn.apply(v, x, mutable=["batch_stats"])
      >>> upd["batch_stats"]["mean"].tolist()
      [3.0, 4.0]
    """
    errors.check_choice("override_average", "average", average, AVERAGES)
    token = _AVERAGE_OVERRIDE.set(average)
    try:
        yield
    finally:
        _AVERAGE_OVERRIDE.reset(token)


def current_average(field: str) -> str:
    """The averaging policy in force: :func:`override_average`'s, else the layer's field."""
    override = _AVERAGE_OVERRIDE.get()
    return field if override is None else override


def output_dtype(dtype: Dtype | None, *arrays: Any) -> Any:
    """flax's rule: ``dtype`` if given, else the promoted dtype of x and the params."""
    return dtypes.canonicalize_dtype(*(a for a in arrays if a is not None), dtype=dtype)


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
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalizes ``x`` with batch statistics (training) or running ones.

        Args:
          x: (N, ..., C) or any layout (see ``axis``), floating.
          use_running_average: True to evaluate; give it here or as the field, not both.
          mask: bool, broadcasts to x (e.g. (B, T, 1) for padded sequences);
            True marks values that count in the statistics.

        Returns:
          Array of x's shape.

        Raises:
          ValueError: ``use_running_average`` given twice or not at all, bad
            axes, shapes, mask or options (from :func:`jaxnorm.batch_norm`).
        """
        return self._normalize(x, use_running_average, mask, jn.batch_norm)

    def _normalize(self, x: Array, use_running_average: bool | None, mask: Array | None, core: Any, **options: Any) -> Array:
        """Declares the variables and calls ``core`` (jn.batch_norm or jn.batch_renorm) once."""
        name = type(self).__name__
        fn = f"jaxnorm.linen.{name}"
        use_running_average = errors.merge_call_option(
            fn, "use_running_average", self.use_running_average, use_running_average,
            example=f"{name}(use_running_average=...)",
            call_example="bn(x, use_running_average=...)",
        )
        training = not errors.check_static_bool(fn, "use_running_average", use_running_average)
        lay = layout(fn, jnp.asarray(x), self.axis)
        fresh = jn.init_batch_stats(lay.feature_shape)
        mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        var = self.variable("batch_stats", "var", lambda: fresh.var)
        count = self.variable("batch_stats", "count", lambda: fresh.count)
        scale, bias = _params(self, lay.feature_shape, self.use_scale, self.use_bias)

        initializing = self.is_initializing()
        if initializing and lay.values_per_feature < 2:
            # flax lets init see a single example; the running statistics give
            # the same shapes and are not updated during init anyway.
            training = False
        y, new = core(
            x, jn.BatchStats(mean.value, var.value, count.value), scale, bias,
            training=training, axis=self.axis, momentum=self.momentum,
            epsilon=self.epsilon, average=current_average(self.average),
            unbiased=self.unbiased, mask=mask,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=None if initializing else self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias), **options,
        )
        if training and not initializing:
            mean.value, var.value, count.value = new.mean, new.var, new.count
        return y


def _params(mdl: nn.Module, shape: tuple[int, ...], use_scale: bool, use_bias: bool) -> tuple[Any, Any]:
    """scale then bias, in flax's order (the order decides their init keys)."""
    scale = mdl.param("scale", mdl.scale_init, shape, mdl.param_dtype) if use_scale else None
    bias = mdl.param("bias", mdl.bias_init, shape, mdl.param_dtype) if use_bias else None
    return scale, bias


def _feature_shape(fn: str, x: Array, axes: Axes) -> tuple[int, ...]:
    return tuple(jnp.shape(x)[a] for a in errors.canonical_axes(fn, "feature_axes", axes, jnp.shape(x)))


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
        shape = _feature_shape("jaxnorm.linen.LayerNorm", x, self.feature_axes)
        scale, bias = _params(self, shape, self.use_scale, self.use_bias)
        return jn.layer_norm(
            x, scale, bias, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            feature_axes=self.feature_axes, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale, bias),
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
        shape = _feature_shape("jaxnorm.linen.RMSNorm", x, self.feature_axes)
        scale, _ = _params(self, shape, self.use_scale, False)
        return jn.rms_norm(
            x, scale, axis=self.reduction_axes, epsilon=self.epsilon, mask=mask,
            feature_axes=self.feature_axes, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, dtype=output_dtype(self.dtype, x, scale),
        )


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
        scale, bias = _params(self, (jnp.shape(x)[-1],), self.use_scale, self.use_bias)
        return jn.group_norm(
            x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
            channel_axis=-1, reduction_axes=self.reduction_axes, epsilon=self.epsilon,
            mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias),
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
        shape = _feature_shape("jaxnorm.linen.InstanceNorm", x, self.feature_axes)
        scale, bias = _params(self, shape, self.use_scale, self.use_bias)
        return jn.instance_norm(
            x, scale, bias, channel_axis=self.feature_axes, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
            dtype=output_dtype(self.dtype, x, scale, bias),
        )


def _map_batch_stats(tree: Any, fn: Any) -> Any:
    """Applies ``fn`` to every mapping that holds ``mean`` and ``var`` leaves."""
    if isinstance(tree, Mapping):
        if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
            return fn(dict(tree))
        return {k: _map_batch_stats(v, fn) for k, v in tree.items()}
    return tree


def from_flax_variables(variables: Mapping[str, Any], *, count: int = 0) -> dict[str, Any]:
    """Loads variables of a model built with ``flax.linen.BatchNorm`` into jaxnorm's.

    flax's BatchNorm keeps ``batch_stats/{mean,var}``; jaxnorm's adds an int32
    ``count``. This adds ``count`` next to every ``mean``/``var`` pair in the
    ``batch_stats`` collection (other collections are returned as they are), so
    a flax checkpoint restores into the same model written with
    ``jaxnorm.linen``. The default ``average="ema"`` ignores ``count``; pass
    ``count=`` if the model uses ``average="cumulative"``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` as flax's ``init`` or a
        checkpoint gives them (dicts or FrozenDicts).
      count: batches the statistics already hold.

    Returns:
      A new dict of variables with ``count`` leaves added (existing ones kept).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> x = jnp.ones((4, 3))
      >>> flax_vars = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
      >>> ours = jnl.from_flax_variables(flax_vars)
      >>> sorted(ours["batch_stats"])
      ['count', 'mean', 'var']
      >>> y = jnl.BatchNorm(use_running_average=True).apply(ours, x)
    """
    value = jnp.asarray(count, jnp.int32)

    def add(stats: dict[str, Any]) -> dict[str, Any]:
        stats.setdefault("count", value)
        return stats

    out = {k: v for k, v in variables.items()}
    if "batch_stats" in out:
        out["batch_stats"] = _map_batch_stats(out["batch_stats"], add)
    return out


def fresh_batch_stats(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``{"batch_stats": ...}`` with every BatchNorm's statistics reset: mean 0, var 1, count 0.

    Shapes and dtypes are kept. With ``average="cumulative"``
    (:func:`override_average`), the next batch then replaces the statistics
    and later batches are averaged with it: the start of a PreciseBN
    recalibration.

    Args:
      variables: the model's variables (must hold ``batch_stats``).

    Returns:
      ``{"batch_stats": reset_tree}``, to merge as ``{**variables, **fresh}``.
    """

    def reset(stats: dict[str, Any]) -> dict[str, Any]:
        fresh = jn.init_batch_stats(jnp.shape(stats["mean"]), dtype=jnp.result_type(stats["mean"]))
        out = {**stats, "mean": fresh.mean, "var": fresh.var}
        if "count" in stats:
            out["count"] = jnp.zeros_like(stats["count"])
        return out

    return {"batch_stats": _map_batch_stats(variables["batch_stats"], reset)}


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
    ) -> Array:
        """Normalizes ``x``, in training with the renorm correction.

        Args:
          x: (N, ..., C) or any layout (see ``axis``), floating.
          use_running_average: True to evaluate; give it here or as the field, not both.
          r_max, d_max: this call's limits (e.g. from :func:`jaxnorm.renorm_schedule`);
            default the fields.
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


def recalibrate(model: nn.Module, variables: Mapping[str, Any], batches: Any, **apply_kwargs: Any) -> dict[str, Any]:
    """PreciseBN (Wu & Johnson 2021): recompute every jaxnorm batch norm's statistics.

    Runs ``model.apply(variables, batch, **apply_kwargs)`` on every element of
    ``batches`` with the parameters frozen. Every jaxnorm :class:`BatchNorm`
    and :class:`BatchRenorm` the pass trains starts from fresh statistics and
    ends with the plain average over the batches of its per-batch mean and
    variance (``unbiased`` honoured), each layer normalizing with batch
    statistics as in training (batch renorm without its correction). Pass
    the keyword arguments that run your model in training mode, as your
    training step does (e.g. ``train=True``, ``rngs={"dropout": key}``).
    The per-batch step is jit-compiled once (batches of one shape).

    Layers that are not jaxnorm batch norms (``flax.linen.BatchNorm``
    included) keep their state, and so does a jaxnorm layer that the pass runs
    in evaluation mode or that sees only non-finite batches. See
    :mod:`jaxnorm._src.precise_bn` for how the layers are switched.

    Args:
      model: a linen module holding jaxnorm batch-norm layers anywhere inside.
      variables: its variables, with ``params`` and ``batch_stats``.
      batches: an iterable of the model's single positional input, e.g. 100
        to 200 training batches (Wu & Johnson use about 100 batches of 32 images).
      **apply_kwargs: passed to ``model.apply`` on every batch.

    Returns:
      A new dict of variables: ``batch_stats`` recalibrated, everything else as given.

    Raises:
      ValueError: no ``batch_stats`` or no jaxnorm batch-norm statistics in
        them, empty ``batches``, or no layer trained during the pass.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train: bool):
      ...         x = jnl.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      ...         return nn.Dense(2)(nn.relu(x))
      >>> model = MLP()
      >>> batches = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(5)]
      >>> variables = model.init(jax.random.key(0), batches[0], train=False)
      >>> variables = jnl.recalibrate(model, variables, batches, train=True)
      >>> int(variables["batch_stats"]["BatchNorm_0"]["count"])
      5
    """
    fn = "jaxnorm.linen.recalibrate"
    errors.check_collection(fn, variables, "batch_stats")
    constants = {k: v for k, v in variables.items() if k != "batch_stats"}

    def update(constants: Any, stats: Any, batch: Any) -> Any:
        _, new = model.apply({**constants, "batch_stats": stats}, batch, mutable=["batch_stats"], **apply_kwargs)
        return new["batch_stats"]

    stats = precise_bn.run(
        fn, update, unfreeze(variables["batch_stats"]), batches,
        "pass the keyword arguments that run the model in training mode, e.g. `train=True`",
        constants=constants,
    )
    return {**variables, "batch_stats": stats}


fold_batch_norms = jn.fold_batch_norms


def batch_norm_pairs(model: nn.Module, variables: Mapping[str, Any], *args: Any, strict: bool = True, **kwargs: Any) -> list[Any]:
    """Finds the Dense/Conv layers of ``model`` whose output goes straight into a BatchNorm.

    Traces ``model.apply(variables, *args, **kwargs)`` abstractly (no
    computation: :func:`jax.eval_shape`) with every module call intercepted,
    and pairs each batch norm (jaxnorm's :class:`BatchNorm`,
    :class:`BatchRenorm`, or ``flax.linen.BatchNorm``) with the
    ``flax.linen.Dense`` or ``flax.linen.Conv`` whose very output it receives.
    Pass the arguments that run the model in evaluation mode (e.g.
    ``train=False``). Feed the result to :func:`fold_batch_norms`.

    A pair is refused (``strict=True``: a ValueError; ``strict=False``: left
    out) when the batch norm's input is not a Dense/Conv output (it comes
    before the layer, or an activation sits in between), when it normalizes
    another axis than the last, or when the layer, or the batch norm, is called
    more than once, or the layer's output is also the input of another module.
    A use of the layer's output outside any module (e.g. a residual ``x + h``
    written in the parent's ``__call__``) is not seen: do not fold such a layer.

    Args:
      model: a linen module.
      variables: its variables.
      args, kwargs: the inputs and options of an evaluation-mode ``apply``.
      strict: raise for a batch norm that cannot be folded (default), or skip it.

    Returns:
      A list of :class:`jaxnorm.FoldPair` ``(layer, batch_norm, epsilon)`` paths, in call order.

    Raises:
      ValueError: with ``strict=True``, a batch norm that cannot be folded.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> class Net(nn.Module):
      ...     use_bn: bool = True
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.Conv(4, (3, 3), use_bias=not self.use_bn)(x)
      ...         if self.use_bn:
      ...             x = jnl.BatchNorm(use_running_average=True)(x)
      ...         return nn.relu(x)
      >>> x = jnp.ones((2, 5, 5, 3))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> pairs = jnl.batch_norm_pairs(Net(), variables, x)
      >>> [(p.layer, p.batch_norm) for p in pairs]
      [(('Conv_0',), ('BatchNorm_0',))]
      >>> folded = jnl.fold_batch_norms(variables, pairs)
      >>> y = Net(use_bn=False).apply(folded, x)
      >>> bool(jnp.allclose(y, Net().apply(variables, x), atol=1e-5))
      True
    """
    fn = "jaxnorm.linen.batch_norm_pairs"
    calls: list[tuple[nn.Module, tuple[Any, ...], Any]] = []

    def record(next_fun: Any, call_args: Any, call_kwargs: Any, context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__":
            calls.append((context.module, (*call_args, *call_kwargs.values()), out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), variables)

    layers = (nn.Dense, nn.Conv)
    norms = (BatchNorm, nn.BatchNorm)
    paths = [module.path for module, _, _ in calls]
    producer = {id(out): module for module, _, out in calls if isinstance(module, layers)}
    pairs = []
    for module, inputs, _ in calls:
        if not isinstance(module, norms):
            continue
        bn = "/".join(module.path)
        x = inputs[0] if inputs else None
        layer = producer.get(id(x))
        reason = _fold_refusal(fn, module, layer, x, paths, calls)
        if reason is not None:
            if strict:
                errors.check_batch_norm_follows_layer(fn, bn, reason)
            continue
        pairs.append(jn.FoldPair(tuple(layer.path), tuple(module.path), module.epsilon))
    return pairs


def _fold_refusal(fn: str, bn: nn.Module, layer: Any, x: Any, paths: list[Any], calls: list[Any]) -> str | None:
    """Why the batch norm ``bn`` (input ``x``) cannot be folded into ``layer``; None when it can."""
    if layer is None:
        return ("its input is not the output of a flax Dense or Conv (the batch norm comes "
                "before the layer, or something sits in between)")
    name = "/".join(layer.path)
    if paths.count(bn.path) > 1:
        return "the batch norm is called more than once"
    if paths.count(layer.path) > 1:
        return f"the layer {name!r} before it is called more than once"
    last = errors.canonical_axes(fn, "axis", -1, jnp.shape(x))
    if errors.canonical_axes(fn, "axis", bn.axis, jnp.shape(x)) != last:
        return (f"it normalizes axis {bn.axis!r} of its input (shape {jnp.shape(x)}), not the "
                f"last axis, which holds the output features of {name!r}")
    # modules around the batch norm (a wrapper handing x on to it) do not count as other users
    users = ["/".join(m.path) for m, inputs, _ in calls
             if bn.path[:len(m.path)] != m.path and any(i is x for i in inputs)]
    if users:
        return f"the output of {name!r} is also the input of {', '.join(users)}"
    return None
