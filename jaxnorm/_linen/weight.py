"""Flax linen weight normalizations: ``WeightNorm``, ``SpectralNorm``, ``WeightStandardization``.

Each wraps a layer instance (``WeightNorm(nn.Dense(4))``) and rewrites the
wrapped layer's variables on their way in with ``nn.map_variables``, as
``flax.linen.WeightNorm`` and ``flax.linen.SpectralNorm`` do; the rewriting is
one call of the core (:func:`jaxnorm.weight_norm`,
:func:`jaxnorm.spectral_norm`, :func:`jaxnorm.weight_standardize`).

``WeightNorm`` and ``SpectralNorm`` have flax 0.12's fields, defaults, call
signatures and variables, so ``variables`` (and checkpoints) move between
them and flax's unchanged; with the same key, ``init`` gives the same
variables, and float32 outputs and updated statistics are bit-equal:

- ``WeightNorm``: ``params/<WeightNorm_k>/<layer>/<path>/scale`` of the
  feature shape, e.g. ``Dense_1/kernel/scale`` (4,); the layer's own
  ``params/<layer>/kernel`` is the direction ``v``.
- ``SpectralNorm``: ``<collection_name>/<SpectralNorm_k>/<layer>/<path>/u``
  (1, out) and ``.../sigma`` () (``batch_stats`` by default); ``update_stats``
  is a required keyword of ``__call__``. ``n_steps < 1`` leaves every
  variable unchanged and creates no state, as flax does.
- ``WeightStandardization`` (no flax counterpart) adds no variables at all:
  a model with ``WeightStandardization(nn.Conv(...))`` has the variables of
  the plain ``nn.Conv`` model.

The one difference: a bfloat16 kernel's norm (``WeightNorm``) is reduced in
float32 here and in bfloat16 in flax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, initializers

from jaxnorm._src.spectral_norm import check_matrix, init_spectral_state, spectral_norm
from jaxnorm._src.state import SpectralState
from jaxnorm._src.weight_norm import feature_and_reduced_axes, scale_shape, weight_norm, weight_standardize

Dtype = Any
Initializer = Any
Axes = Any

__all__ = ["SpectralNorm", "WeightNorm", "WeightStandardization"]


def _str_path(layer: nn.Module, path: Any) -> str:
    """flax's name of a wrapped variable: ``<layer>/<path without the collection>``."""
    return f"{layer.name}/{jax.tree_util.keystr(path[1:], simple=True, separator='/')}"


def _selected(variable_filter: Iterable[str] | None, str_path: str) -> bool:
    """flax's filter: a substring of the variable's path; an empty filter selects everything."""
    return not variable_filter or any(name in str_path for name in variable_filter)


def _map_layer(mdl: nn.Module, transform: Any, args: Any, kwargs: Any, mutable: bool) -> Any:
    def layer_forward(layer_instance):
        return layer_instance(*args, **kwargs)

    return nn.map_variables(
        layer_forward,
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(transform, vs),
        init=mdl.is_initializing(),
        mutable=mutable,
    )(mdl.layer_instance)


class WeightNorm(nn.Module):
    """L2 weight normalization of a wrapped layer (Salimans & Kingma 2016).

    Drop-in for ``flax.linen.WeightNorm``: the wrapped layer's variables whose
    path contains a ``variable_filter`` entry become
    ``scale * v / sqrt(sum(v**2) + epsilon)``, the sum over every axis not in
    ``feature_axes`` (:func:`jaxnorm.weight_norm`).

    Attributes:
      layer_instance: the module to wrap, e.g. ``nn.Dense(4)`` or ``nn.Conv(8, (3, 3))``.
      epsilon: added to the sum of squares.
      dtype: dtype of the normalized variables (default: inferred from the
        variable and its scale, as flax does).
      param_dtype: dtype of ``scale``.
      use_scale: learn a per-feature ``scale`` (``g``).
      scale_init: initializer of ``scale``.
      feature_axes: kept axes of each variable; None normalizes each by one norm.
      variable_filter: substrings of the variable paths to normalize
        (default ``{"kernel"}``); None or empty normalizes every variable.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
      >>> layer = jl.WeightNorm(nn.Dense(4))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> jax.tree.map(jnp.shape, variables["params"]["layer_instance/kernel/scale"])
      (4,)
    """

    layer_instance: nn.Module
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    feature_axes: Axes | None = -1
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its selected variables weight-normalized."""
        return _map_layer(self, self._normalize, args, kwargs, mutable=False)

    def _normalize(self, path: Any, vs: Any) -> Any:
        value = jnp.asarray(vs)
        str_path = _str_path(self.layer_instance, path)
        if not _selected(self.variable_filter, str_path):
            return value
        feat, _ = feature_and_reduced_axes("WeightNorm", self.feature_axes, value.shape)
        scale = None
        if self.use_scale:
            scale = self.param(f"{str_path}/scale", self.scale_init, scale_shape(value.shape, feat), self.param_dtype)
        dtype = dtypes.canonicalize_dtype(vs, scale, dtype=self.dtype)
        return weight_norm(value, scale, feature_axes=feat, epsilon=self.epsilon, dtype=dtype)


class SpectralNorm(nn.Module):
    """Spectral normalization of a wrapped layer (Miyato et al. 2018).

    Drop-in for ``flax.linen.SpectralNorm``: every variable of rank >= 2 of
    the wrapped layer is divided by its largest singular value, estimated by
    ``n_steps`` power iterations from the stored ``u``
    (:func:`jaxnorm.spectral_norm`; rank > 2 is viewed as (-1, out)).
    Variables of rank < 2 pass unchanged, as in flax.

    Training: ``model.apply(variables, x, update_stats=True,
    mutable=["batch_stats"])`` returns the new ``u`` and ``sigma``; evaluation:
    ``update_stats=False`` (the iteration still runs from the stored ``u``, as
    in flax, and nothing is written). :func:`jaxnorm.fold_spectral_norm`
    freezes a kernel with the stored ``sigma``.

    Attributes:
      layer_instance: the module to wrap, e.g. ``nn.Dense(4)``.
      n_steps: power iterations per call; below 1 nothing is normalized (flax).
      epsilon: added to each squared norm in the iteration.
      dtype: dtype of the normalized variables (default: inferred, as flax).
      param_dtype: dtype of ``u`` and ``sigma``.
      error_on_non_matrix: raise for variables of rank > 2 instead of viewing
        them as (-1, out).
      collection_name: collection of ``u`` and ``sigma``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
      >>> layer = jl.SpectralNorm(nn.Dense(4))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3)), update_stats=False)
      >>> sorted(variables["batch_stats"])
      ['layer_instance/kernel/sigma', 'layer_instance/kernel/u']
      >>> y, updates = layer.apply(variables, jnp.ones((2, 3)), update_stats=True, mutable=["batch_stats"])
    """

    layer_instance: nn.Module
    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"

    @nn.compact
    def __call__(self, *args: Any, update_stats: bool, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its matrices spectrally normalized.

        Args:
          args, kwargs: passed to the wrapped layer.
          update_stats: store the new ``u`` and ``sigma`` (training) or not (evaluation).
        """
        transform = functools.partial(self._normalize, update_stats=update_stats)
        return _map_layer(self, transform, args, kwargs, mutable=True)

    def _normalize(self, path: Any, vs: Any, update_stats: bool) -> Any:
        value = jnp.asarray(vs)
        if value.ndim <= 1 or self.n_steps < 1:
            return value
        base = _str_path(self.layer_instance, path)
        check_matrix("SpectralNorm", f"variable {base!r}", value.shape, error_on_non_matrix=self.error_on_non_matrix)
        fresh: list[SpectralState] = []

        def init(field: str) -> Any:
            if not fresh:
                fresh.append(init_spectral_state(self.make_rng("params"), value.shape, dtype=self.param_dtype))
            return getattr(fresh[0], field)

        u_var = self.variable(self.collection_name, f"{base}/u", init, "u")
        sigma_var = self.variable(self.collection_name, f"{base}/sigma", init, "sigma")
        state = SpectralState(u_var.value, sigma_var.value)
        dtype = dtypes.canonicalize_dtype(vs, state.u, dtype=self.dtype)
        out, new = spectral_norm(
            value, state, n_steps=self.n_steps, update_stats=update_stats, epsilon=self.epsilon, dtype=dtype,
        )
        if update_stats:
            u_var.value, sigma_var.value = new.u, new.sigma
        return out


class WeightStandardization(nn.Module):
    """Weight standardization of a wrapped layer (Qiao et al. 2019).

    The wrapped layer's variables whose path contains a ``variable_filter``
    entry (its ``kernel`` by default) get zero mean and unit variance over
    their fan-in per output feature (:func:`jaxnorm.weight_standardize`).
    Adds no variables, so a checkpoint of the plain layer loads as it is. With
    group norm after it, this is the micro-batch recipe of BiT and
    ResNet-GN-WS::

        x = WeightStandardization(nn.Conv(64, (3, 3), use_bias=False))(x)
        x = jaxnorm.linen.GroupNorm(num_groups=32)(x)

    Attributes:
      layer_instance: the module to wrap, e.g. ``nn.Conv(8, (3, 3))``.
      feature_axes: kept axes of each kernel (its output features).
      epsilon: added to the variance.
      dtype: dtype of the standardized variables (default: each variable's own).
      variable_filter: substrings of the variable paths to standardize
        (default ``{"kernel"}``); every selected variable needs a fan-in axis.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
      >>> layer = jl.WeightStandardization(nn.Conv(4, (3, 3)))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
      >>> sorted(variables["params"]["layer_instance"])
      ['bias', 'kernel']
    """

    layer_instance: nn.Module
    feature_axes: Axes = -1
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    variable_filter: Iterable | None = dataclasses.field(default_factory=lambda: {"kernel"})

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped layer with its selected variables standardized."""
        return _map_layer(self, self._standardize, args, kwargs, mutable=False)

    def _standardize(self, path: Any, vs: Any) -> Any:
        value = jnp.asarray(vs)
        if not _selected(self.variable_filter, _str_path(self.layer_instance, path)):
            return value
        return weight_standardize(value, feature_axes=self.feature_axes, epsilon=self.epsilon, dtype=self.dtype)
