"""Flax linen layers for the batch-free activation norms: no maths, one core call each.

:class:`LocalResponseNorm` calls :func:`jaxnorm.local_response_norm` (exactly
``torch.nn.LocalResponseNorm``) and holds no variables; :class:`FilterResponseNorm`
holds ``params/scale``, ``params/bias``, ``params/tau`` (each (C,)) and,
with ``learned_epsilon=True``, the scalar ``params/learned_epsilon``, and calls
:func:`jaxnorm.filter_response_norm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes, initializers

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_floating
from jaxnorm._src.response_norms import filter_response_norm, local_response_norm

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["FilterResponseNorm", "LocalResponseNorm"]


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012), as ``torch.nn.LocalResponseNorm``.

    ``y_c = x_c / (k + alpha / size * sum of x**2 over the size neighbouring
    channels) ** beta``; see :func:`jaxnorm.local_response_norm`. No variables.

    Attributes:
      size: the number of neighbouring channels.
      alpha, beta, k: PyTorch's hyperparameters and defaults.
      channel_axis: -1 (NHWC, default) or 1 (PyTorch's NCHW).

    Example:
      >>> import jax, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
      >>> lrn = jnl.LocalResponseNorm(size=5)
      >>> lrn.apply({}, x).shape
      (2, 8, 8, 16)
    """

    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0
    channel_axis: int = -1

    def __call__(self, x: Array) -> Array:
        """Normalizes ``x`` across its channels.

        Args:
          x: floating array, e.g. (N, H, W, C).

        Returns:
          Array of x's shape and dtype.

        Raises:
          ValueError: bad ``size``, axis or input (from :func:`jaxnorm.local_response_norm`).
        """
        return local_response_norm(
            x, size=self.size, alpha=self.alpha, beta=self.beta, k=self.k, channel_axis=self.channel_axis,
        )


class FilterResponseNorm(nn.Module):
    """Filter response normalization with TLU (Singh & Krishnan 2020).

    ``z = max(scale * x / sqrt(mean(x**2 over space) + eps) + bias, tau)`` per
    example and channel: no batch statistics, for any batch size. See
    :func:`jaxnorm.filter_response_norm`.

    Attributes:
      epsilon: eps, or its lower bound with ``learned_epsilon``.
      channel_axis: -1 (NHWC, default) or 1 (NCHW).
      use_scale, use_bias: learn gamma / beta.
      use_tau: apply the TLU with a learned threshold ``tau`` (the paper's
        pairing; False gives plain FRN).
      learned_epsilon: learn eps as ``epsilon + |learned_epsilon|``, a scalar
        parameter (the paper's option for 1x1 activations).
      dtype: output dtype; default the promoted dtype of x and the params.
      param_dtype: dtype of the parameters.
      scale_init, bias_init, tau_init, learned_epsilon_init: initializers
        (ones, zeros, zeros, and the constant 1e-4 as TF Addons uses).

    Example:
      >>> import jax, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
      >>> frn = jnl.FilterResponseNorm(learned_epsilon=True)
      >>> y, variables = frn.init_with_output(jax.random.key(1), x)
      >>> sorted(variables["params"])
      ['bias', 'learned_epsilon', 'scale', 'tau']
    """

    epsilon: float = 1e-6
    channel_axis: int = -1
    use_scale: bool = True
    use_bias: bool = True
    use_tau: bool = True
    learned_epsilon: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = initializers.ones
    bias_init: Initializer = initializers.zeros
    tau_init: Initializer = initializers.zeros
    learned_epsilon_init: Initializer = initializers.constant(1e-4)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes each example and channel of ``x`` by its spatial mean square.

        Args:
          x: floating array, batch axis 0, e.g. (N, H, W, C).

        Returns:
          Array of x's shape.

        Raises:
          ValueError: bad axis or input (from :func:`jaxnorm.filter_response_norm`).
        """
        fn = "jaxnorm.linen.FilterResponseNorm"
        check_floating(fn, x)
        axis = canonical_axes(fn, "channel_axis", self.channel_axis, jnp.shape(x))[0]
        shape = (jnp.shape(x)[axis],)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        tau = self.param("tau", self.tau_init, shape, self.param_dtype) if self.use_tau else None
        learned = (
            self.param("learned_epsilon", self.learned_epsilon_init, (), self.param_dtype)
            if self.learned_epsilon else None
        )
        x, scale, bias, tau = dtypes.promote_dtype(x, scale, bias, tau, dtype=self.dtype)
        return filter_response_norm(
            x, scale, bias, tau, epsilon=self.epsilon, channel_axis=self.channel_axis, learned_epsilon=learned,
        )
