"""Flax NNX weight normalizations: ``WeightNorm``, ``SpectralNorm``, ``WeightStandardization``.

Each wraps a layer instance (``WeightNorm(nnx.Linear(3, 4, rngs=rngs),
rngs=rngs)``). On every call the wrapped layer's selected parameters are
replaced by their normalized values (one call of :func:`jaxnorm.weight_norm`,
:func:`jaxnorm.spectral_norm` or :func:`jaxnorm.weight_standardize`) for the
duration of the layer's call, then the raw values are put back.

``WeightNorm`` and ``SpectralNorm`` take ``flax.nnx``'s (0.12) arguments and
defaults and hold the same state under the same paths: ``scales[path]`` (the
feature shape) and ``batch_stats[path + ("u",)]`` (1, out) /
``batch_stats[path + ("sigma",)]`` () as ``nnx.BatchStat``; ``u`` starts as
flax's ``normal(stddev=0.01)`` draw from one ``rngs.params()`` key per matrix.
The first call's outputs, gradients and statistics equal flax's. Two
deliberate differences, both flax nnx bugs:

- flax writes the normalized kernel *into the wrapped layer's parameter* on
  every call, so the next call (and the optimizer) starts from ``w / sigma``
  or ``g * v / ||v||`` instead of the raw weights: repeated calls keep
  dividing, and training no longer follows the reparameterization. Here the
  raw parameter is never changed, as in ``flax.linen``.
- flax keeps ``scales`` as plain arrays, so ``nnx.grad`` over ``nnx.Param``
  never trains them; here each scale is an ``nnx.Param`` (same path), drawn
  with a key from ``rngs.params()`` (flax passes the stream itself, which only
  works for the default ``ones``).

``model.train()`` / ``model.eval()`` switch ``SpectralNorm``'s
``update_stats`` through the ``use_running_average`` attribute, as in flax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._src.spectral_norm import check_matrix, spectral_norm, u_shape
from jaxnorm._src.state import SpectralState
from jaxnorm._src.weight_norm import feature_and_reduced_axes, scale_shape, weight_norm, weight_standardize

Dtype = Any
Initializer = Any
Axes = Any

__all__ = ["SpectralNorm", "WeightNorm", "WeightStandardization"]

_KERNEL = nnx.PathContains("kernel")


def _params(layer: nnx.Module, variable_filter: Any = None) -> list[tuple[tuple[Any, ...], Any]]:
    """``(path, nnx.Param)`` of the layer's parameters that pass ``variable_filter``."""
    pairs = nnx.to_flat_state(nnx.state(layer, nnx.Param))
    return [(path, var) for path, var in pairs if variable_filter is None or variable_filter(path, var)]


@contextlib.contextmanager
def _substituted(replacements: list[tuple[Any, Any]]) -> Iterator[None]:
    """Gives each variable a new value while the block runs, then its own value back."""
    saved = [var.get_value() for var, _ in replacements]
    try:
        for var, value in replacements:
            var.set_value(value)
        yield
    finally:
        for (var, _), value in zip(replacements, saved, strict=True):
            var.set_value(value)


class WeightNorm(nnx.Module):
    """L2 weight normalization of a wrapped layer (Salimans & Kingma 2016).

    ``flax.nnx.WeightNorm``'s arguments: the selected parameters become
    ``scale * v / sqrt(sum(v**2) + epsilon)`` over every axis not in
    ``feature_axes`` (:func:`jaxnorm.weight_norm`) while the layer runs.

    Args:
      layer_instance: the layer to wrap.
      feature_axes: kept axes of each parameter; None normalizes it by one norm.
      use_scale: learn a per-feature ``scale`` (an ``nnx.Param`` in ``scales``).
      scale_init: initializer of the scales (default ones).
      epsilon: added to the sum of squares.
      dtype: dtype of the normalized parameters (default: inferred, as flax).
      param_dtype: dtype of the scales.
      variable_filter: which parameters (default ``nnx.PathContains("kernel")``).
      promote_dtype: accepted for flax compatibility (unused: the core casts).
      rngs: keys for the scales.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jx
      >>> rngs = nnx.Rngs(0)
      >>> layer = jx.WeightNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
      >>> layer(jnp.ones((2, 3))).shape, layer.scales[("kernel",)].shape
      ((2, 4), (4,))
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes | None = -1,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        variable_filter: Any = _KERNEL,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = () if feature_axes is None else feature_axes
        self.use_scale = use_scale
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
        self.promote_dtype = promote_dtype
        self.scales = nnx.data(None)
        if use_scale:
            scales = {}
            for path, param in _params(layer_instance, self.variable_filter):
                feat, _ = feature_and_reduced_axes("WeightNorm", self.feature_axes, param.shape)
                scales[path] = nnx.Param(scale_init(rngs.params(), scale_shape(param.shape, feat), param_dtype))
            self.scales = nnx.data(scales)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its selected parameters weight-normalized."""
        replacements = []
        for path, param in _params(self.layer_instance, self.variable_filter):
            value = param.get_value()
            scale = None
            if self.use_scale:
                if path not in self.scales:
                    raise ValueError(
                        f"WeightNorm: the wrapped layer has a parameter {path!r} that was not "
                        f"there when the WeightNorm was built, so it has no scale; build the "
                        f"WeightNorm after the layer's parameters exist."
                    )
                scale = self.scales[path].get_value()
            feat, _ = feature_and_reduced_axes("WeightNorm", self.feature_axes, value.shape)
            dtype = dtypes.canonicalize_dtype(value, scale, dtype=self.dtype)
            out = weight_norm(value, scale, feature_axes=feat, epsilon=self.epsilon, dtype=dtype)
            replacements.append((param, out))
        with _substituted(replacements):
            return self.layer_instance(x, *args, **kwargs)


class SpectralNorm(nnx.Module):
    """Spectral normalization of a wrapped layer (Miyato et al. 2018).

    ``flax.nnx.SpectralNorm``'s arguments: every parameter of rank >= 2 is
    divided by its largest singular value, ``n_steps`` power iterations from
    the stored ``u`` (:func:`jaxnorm.spectral_norm`), while the layer runs.
    Rank < 2 parameters pass unchanged, and ``n_steps < 1`` normalizes
    nothing and keeps no state, as in flax.

    Args:
      layer_instance: the layer to wrap.
      n_steps: power iterations per call.
      epsilon: added to each squared norm in the iteration.
      dtype: dtype of the normalized parameters (default: inferred, as flax).
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for parameters of rank > 2 instead of
        viewing them as (-1, out).
      update_stats: the default of ``__call__``'s ``update_stats``; ``train()``
        sets it True, ``eval()`` False.
      rngs: keys for ``u``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jx
      >>> rngs = nnx.Rngs(0)
      >>> layer = jx.SpectralNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
      >>> layer(jnp.ones((2, 3))).shape, layer.batch_stats[("kernel", "u")].shape
      ((2, 4), (1, 4))
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        rngs: nnx.Rngs,
    ):
        self.layer_instance = layer_instance
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        # flax's attribute, so that train() / eval() switch it (its opposite is update_stats)
        self.use_running_average = not update_stats
        stats = {}
        for path, param in self._matrices():
            key = rngs.params()
            # flax nnx's draw (stddev 0.01; linen's is 1): the same key gives flax's state
            stats[(*path, "u")] = nnx.BatchStat(initializers.normal()(key, u_shape(param.shape), param_dtype))
            stats[(*path, "sigma")] = nnx.BatchStat(initializers.ones(key, (), param_dtype))
        self.batch_stats = nnx.data(stats)

    def _matrices(self) -> list[tuple[tuple[Any, ...], Any]]:
        if self.n_steps < 1:
            return []
        out = []
        for path, param in _params(self.layer_instance):
            if param.ndim <= 1:
                continue
            check_matrix("SpectralNorm", f"parameter {path!r}", param.shape,
                         error_on_non_matrix=self.error_on_non_matrix)
            out.append((path, param))
        return out

    def __call__(self, x: Any, *args: Any, update_stats: bool | None = None, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its matrices spectrally normalized.

        Args:
          x, args, kwargs: passed to the wrapped layer.
          update_stats: store the new ``u`` and ``sigma``; default
            ``not self.use_running_average`` (``train()``: True, ``eval()``: False).
        """
        update_stats = not self.use_running_average if update_stats is None else update_stats
        replacements = []
        for path, param in self._matrices():
            if (*path, "u") not in self.batch_stats:
                raise ValueError(
                    f"SpectralNorm: the wrapped layer has a parameter {path!r} that was not there "
                    f"when the SpectralNorm was built, so it has no `u`; build the SpectralNorm "
                    f"after the layer's parameters exist."
                )
            u_var, sigma_var = self.batch_stats[(*path, "u")], self.batch_stats[(*path, "sigma")]
            value = param.get_value()
            state = SpectralState(u_var.get_value(), sigma_var.get_value())
            dtype = dtypes.canonicalize_dtype(value, state.u, dtype=self.dtype)
            out, new = spectral_norm(
                value, state, n_steps=self.n_steps, update_stats=update_stats, epsilon=self.epsilon, dtype=dtype,
            )
            if update_stats:
                u_var.set_value(new.u)
                sigma_var.set_value(new.sigma)
            replacements.append((param, out))
        with _substituted(replacements):
            return self.layer_instance(x, *args, **kwargs)


class WeightStandardization(nnx.Module):
    """Weight standardization of a wrapped layer (Qiao et al. 2019).

    The selected parameters (the ``kernel`` by default) get zero mean and unit
    variance over their fan-in per output feature
    (:func:`jaxnorm.weight_standardize`) while the layer runs. No state of
    its own: ``nnx.state`` holds the wrapped layer's under ``layer_instance``.
    Usual use: a ``Conv`` followed by ``GroupNorm``.

    Args:
      layer_instance: the layer to wrap, e.g. ``nnx.Conv(2, 4, (3, 3), rngs=rngs)``.
      feature_axes: kept axes of each kernel (its output features).
      epsilon: added to the variance.
      dtype: dtype of the standardized parameters (default: each one's own).
      variable_filter: which parameters (default ``nnx.PathContains("kernel")``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jx
      >>> layer = jx.WeightStandardization(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)))
      >>> layer(jnp.ones((1, 8, 8, 2))).shape
      (1, 8, 8, 4)
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        feature_axes: Axes = -1,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        variable_filter: Any = _KERNEL,
    ):
        self.layer_instance = layer_instance
        self.feature_axes = feature_axes
        self.epsilon = epsilon
        self.dtype = dtype
        self.variable_filter = nnx.filterlib.to_predicate(variable_filter)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its selected parameters standardized."""
        replacements = [
            (param, weight_standardize(param.get_value(), feature_axes=self.feature_axes, epsilon=self.epsilon,
                                       dtype=self.dtype))
            for _, param in _params(self.layer_instance, self.variable_filter)
        ]
        with _substituted(replacements):
            return self.layer_instance(x, *args, **kwargs)
