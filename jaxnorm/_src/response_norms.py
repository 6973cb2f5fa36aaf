"""Batch-free activation norms: local response norm and filter response norm.

Neither uses statistics over the batch, so both behave the same in training
and inference and at any batch size.

Local response normalization (Krizhevsky, Sutskever & Hinton 2012, AlexNet;
early Inception) divides each activation by a power of the sum of squares of
its neighbours across channels. :func:`local_response_norm` is exactly
``torch.nn.LocalResponseNorm``::

    b_c = a_c / (k + alpha / n * sum_{c' = c - n // 2}^{c + (n - 1) // 2} a_{c'}^2) ** beta

with zeros outside the channel range (an even ``n`` looks one channel further
back than forward, as PyTorch pads) and ``alpha`` divided by the window size
``n`` (PyTorch's average pool; AlexNet's paper writes alpha without it). The
window sum is a ``lax.reduce_window`` over the channel axis: linear, so every
transformation (forward mode included) goes through plain autodiff.

Filter response normalization (Singh & Krishnan 2020) divides each example
and channel by the root mean square over its spatial axes, then applies an
affine map and the thresholded linear unit (TLU)::

    nu2 = mean(x ** 2 over H, W);  y = scale * x / sqrt(nu2 + eps) + bias;  z = max(y, tau)

No mean is subtracted, so there is nothing to the batch. ``eps`` may be learned
(the paper's remedy for 1x1 activations, where ``x / sqrt(x**2 + eps)`` is
close to ``sign(x)``): ``eps = epsilon + |learned_epsilon|`` keeps it at least
``epsilon``. The mean square comes from :func:`jaxnorm._src.stats.compute_moments`
(uncentred, accumulated in at least float32) and the division from
:func:`jaxnorm._src.normalize.normalize`, both plain ``jax.numpy``, so forward
mode works too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src.axes import canonical_axes
from jaxnorm._src.checks import check_epsilon, check_floating
from jaxnorm._src.moments import accumulation_dtype, compute_moments
from jaxnorm._src.normalize import normalize
from jaxnorm._src.per_example import place

Array = jax.Array


def _single_axis(fn: str, channel_axis: Any, shape: tuple[int, ...]) -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise ValueError(
            f"{fn}: `channel_axis` must be a single int, got {channel_axis!r}; pass e.g. "
            f"`channel_axis=-1` (NHWC) or `channel_axis=1` (NCHW)."
        )
    return canonical_axes(fn, "channel_axis", channel_axis, shape)[0]


def _check_number(fn: str, name: str, value: Any, example: str) -> None:
    """A static hyperparameter must be a finite real number; traced ones pass."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = None
    if v is None or v.ndim != 0 or not np.isfinite(v):
        raise ValueError(f"{fn}: `{name}` must be a finite real number, got {value!r}; pass e.g. `{name}={example}`.")


def local_response_norm(
    x: Array,
    *,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    channel_axis: int = -1,
) -> Array:
    """Local response normalization across channels, as ``torch.nn.LocalResponseNorm``.

    Shapes: N batch, C channels, ``...`` spatial axes; x is (N, ..., C) with the
    default ``channel_axis=-1`` or (N, C, ...) (PyTorch's layout) with
    ``channel_axis=1``. For each channel c::

        y_c = x_c / (k + alpha / size * sum(x_{c'}**2 for c' in [c - size//2, c + (size-1)//2])) ** beta

    with zero padding beyond the channels (Krizhevsky et al. 2012; PyTorch's
    formula, which divides ``alpha`` by ``size``).

    Args:
      x: floating array with a channel axis.
      size: the number of neighbouring channels summed over (a positive int;
        even sizes look one channel further back than forward, as PyTorch does).
      alpha: multiplicative factor (divided by ``size``); may be traced.
      beta: exponent; may be traced.
      k: additive constant; may be traced.
      channel_axis: the channel axis.

    Returns:
      Array of x's shape and dtype (computed in at least float32).

    Raises:
      ValueError: non-floating ``x``, a ``size`` that is not a positive int, a
        bad ``channel_axis``, or non-finite static ``alpha``, ``beta``, ``k``.

    Example:
      >>> import jax, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
      >>> jn.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0).shape
      (2, 8, 8, 16)
    """
    fn = "local_response_norm"
    check_floating(fn, x)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{fn}: `x` must have a channel axis, got a scalar; pass e.g. an (N, H, W, C) array.")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(
            f"{fn}: `size` must be a positive Python int (the number of neighbouring channels), "
            f"got {size!r}; pass e.g. `size=5` (AlexNet's)."
        )
    size = int(size)
    for name, value, example in (("alpha", alpha, "1e-4"), ("beta", beta, "0.75"), ("k", k, "1.0")):
        _check_number(fn, name, value, example)
    axis = _single_axis(fn, channel_axis, x.shape)
    acc = accumulation_dtype(x.dtype)
    xf = x.astype(acc)
    window = tuple(size if a == axis else 1 for a in range(x.ndim))
    padding = tuple((size // 2, (size - 1) // 2) if a == axis else (0, 0) for a in range(x.ndim))
    # A NumPy zero is a concrete identity, so JAX lowers this as a windowed sum
    # (linear: transpose and forward mode come for free).
    sums = lax.reduce_window(xf * xf, np.array(0, acc), lax.add, window, (1,) * x.ndim, padding)
    div = (k + (alpha / size) * sums) ** beta
    return (xf / div).astype(x.dtype)


def filter_response_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    tau: Array | None = None,
    *,
    epsilon: float = 1e-6,
    channel_axis: int = -1,
    learned_epsilon: Array | None = None,
) -> Array:
    """Filter response normalization with its thresholded linear unit (Singh & Krishnan 2020).

    Shapes: N batch, C channels, ``...`` spatial axes; x is (N, ..., C)
    (``channel_axis=-1``) or (N, C, ...) (``channel_axis=1``). Per example and
    channel, with ``nu2`` the mean square over the spatial axes (none for
    (N, C), where ``nu2 = x**2``)::

        y = scale * x / sqrt(nu2 + eps) + bias;   z = max(y, tau)   (TLU, when tau is given)
        eps = epsilon + |learned_epsilon|           (when learned_epsilon is given)

    Args:
      x: floating array, batch axis 0.
      scale, bias: optional gamma and beta: (C,), or per example, any shape of
        x's rank with each size 1 or x's, e.g. (N, 1, 1, C).
      tau: optional TLU threshold, shaped like ``scale``; None: no TLU (plain FRN).
      epsilon: added to ``nu2`` (the lower bound of eps with a learned one);
        may be traced.
      channel_axis: the channel axis.
      learned_epsilon: optional learned part of eps: a scalar (the paper's and
        TF Addons' choice), (C,), or per example; its absolute value is added.

    Returns:
      Array of x's shape and dtype.

    Raises:
      ValueError: non-floating inputs, a channel axis that is the batch axis,
        parameters of the wrong shape, or a bad epsilon.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
      >>> z = jn.filter_response_norm(x, jnp.ones(4), jnp.zeros(4), jnp.zeros(4))
      >>> bool((z >= 0).all())   # tau = 0 makes the TLU a ReLU
      True
    """
    fn = "filter_response_norm"
    check_floating(fn, x)
    check_epsilon(fn, epsilon)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{fn}: `x` must have a batch axis and a channel axis, got shape {x.shape}; "
            f"add a batch axis, e.g. `x[None]`."
        )
    axis = _single_axis(fn, channel_axis, x.shape)
    if axis == 0:
        raise ValueError(
            f"{fn}: `channel_axis`={channel_axis!r} is the batch axis 0 of `x` (shape {x.shape}); "
            f"the channel axis must be another one, e.g. -1 (NHWC) or 1 (NCHW)."
        )
    scale, bias, tau = (place(fn, n, p, x.shape, (axis,)) for n, p in (("scale", scale), ("bias", bias), ("tau", tau)))
    learned = place(fn, "learned_epsilon", learned_epsilon, x.shape, (axis,), allow_scalar=True)
    spatial = tuple(a for a in range(1, x.ndim) if a != axis)
    nu2 = compute_moments(x, spatial, center=False).var
    if learned is not None:
        # eps = epsilon + |learned|, added to nu2 here and epsilon inside normalize.
        nu2 = nu2 + jnp.abs(learned).astype(nu2.dtype)
    y = normalize(x, jnp.zeros((), nu2.dtype), nu2, scale, bias, epsilon=epsilon)
    if tau is not None:
        y = jnp.maximum(y, tau.astype(y.dtype))
    return y
