"""Flax NNX layers for the batch-free activation norms: no maths, one core call each.

Twins of :mod:`jaxnorm._linen.response_norms`: :class:`LocalResponseNorm` holds
no variables; :class:`FilterResponseNorm` holds ``nnx.Param`` ``scale``,
``bias``, ``tau`` ((C,) each) and, with ``learned_epsilon=True``, a scalar
``learned_epsilon``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from jaxnorm._src.response_norms import filter_response_norm, local_response_norm

Array = jax.Array
Dtype = Any
Initializer = Any

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
_EPSILON_INIT = initializers.constant(1e-4)

__all__ = ["FilterResponseNorm", "LocalResponseNorm"]


def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype, use: bool) -> Any:
    return nnx.Param(init(rngs.params(), shape, dtype)) if use else nnx.data(None)


def _value(var: Any) -> Array | None:
    return None if var is None else var[...]


class LocalResponseNorm(nnx.Module):
    """Local response normalization across channels, as ``torch.nn.LocalResponseNorm``.

    See :func:`jaxnorm.local_response_norm`. No variables, so no ``rngs``.

    Args:
      size: the number of neighbouring channels.
      alpha, beta, k: PyTorch's hyperparameters and defaults.
      channel_axis: -1 (NHWC, default) or 1 (PyTorch's NCHW).

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> lrn = jnx.LocalResponseNorm(5)
      >>> lrn(jax.random.normal(jax.random.key(0), (2, 8, 8, 16))).shape
      (2, 8, 8, 16)
    """

    def __init__(self, size: int, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, channel_axis: int = -1):
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.channel_axis = channel_axis

    def __call__(self, x: Array) -> Array:
        """Normalizes ``x`` across its channels (x's shape and dtype)."""
        return local_response_norm(
            x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k, channel_axis=self.channel_axis,
        )


class FilterResponseNorm(nnx.Module):
    """Filter response normalization with TLU (Singh & Krishnan 2020).

    ``z = max(scale * x / sqrt(mean(x**2 over space) + eps) + bias, tau)``; see
    :func:`jaxnorm.filter_response_norm`.

    Args:
      num_features: C, the size of the channel axis.
      epsilon: eps, or its lower bound with ``learned_epsilon``.
      channel_axis: -1 (NHWC, default) or 1 (NCHW).
      use_scale, use_bias: learn gamma / beta.
      use_tau: apply the TLU with a learned threshold (False: plain FRN).
      learned_epsilon: learn eps as ``epsilon + |learned_epsilon|`` (a scalar).
      dtype: output dtype (and the dtype x and params are promoted to).
      param_dtype: dtype of the parameters.
      scale_init, bias_init, tau_init, learned_epsilon_init: initializers
        (ones, zeros, zeros, the constant 1e-4).
      rngs: ``nnx.Rngs`` for the initializers.

    Example:
      >>> import jax, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> frn = jnx.FilterResponseNorm(4, rngs=nnx.Rngs(0))
      >>> frn(jax.random.normal(jax.random.key(0), (2, 8, 8, 4))).shape
      (2, 8, 8, 4)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        channel_axis: int = -1,
        use_scale: bool = True,
        use_bias: bool = True,
        use_tau: bool = True,
        learned_epsilon: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Initializer = _ONES,
        bias_init: Initializer = _ZEROS,
        tau_init: Initializer = _ZEROS,
        learned_epsilon_init: Initializer = _EPSILON_INIT,
        rngs: nnx.Rngs,
    ):
        shape = (num_features,)
        self.scale = _param(scale_init, rngs, shape, param_dtype, use_scale)
        self.bias = _param(bias_init, rngs, shape, param_dtype, use_bias)
        self.tau = _param(tau_init, rngs, shape, param_dtype, use_tau)
        self.learned_epsilon = _param(learned_epsilon_init, rngs, (), param_dtype, learned_epsilon)
        self.num_features = num_features
        self.epsilon = epsilon
        self.channel_axis = channel_axis
        self.dtype = dtype
        self.param_dtype = param_dtype

    def __call__(self, x: Array) -> Array:
        """Normalizes each example and channel of ``x`` by its spatial mean square (x's shape)."""
        x, scale, bias, tau = dtypes.promote_dtype(
            (x, _value(self.scale), _value(self.bias), _value(self.tau)), dtype=self.dtype,
        )
        return filter_response_norm(
            x, scale, bias, tau, epsilon=self.epsilon, channel_axis=self.channel_axis,
            learned_epsilon=_value(self.learned_epsilon),
        )
