"""Spectral normalization (Miyato et al. 2018) with explicit power-iteration state.

``spectral_norm(kernel, state)`` divides the kernel by an estimate of its
largest singular value, so that a layer's Lipschitz constant is about 1 (the
GAN discriminator's normalization; Miyato, Kataoka, Koyama & Yoshida 2018,
"Spectral Normalization for Generative Adversarial Networks").

The estimate is flax's, step for step (``flax.linen.SpectralNorm`` and
``flax.nnx.SpectralNorm`` of flax 0.12): the kernel is viewed as the matrix
``W = kernel.reshape(-1, out)``; from the stored row vector ``u`` (1, out),
each of ``n_steps`` iterations is

    v = l2n(u @ W.T),   u = l2n(v @ W),   l2n(a) = a * rsqrt(sum(a**2) + epsilon)

then ``u`` and ``v`` are held constant (``stop_gradient``: the gradient is
Miyato et al.'s, through ``W`` only), ``sigma = v @ W @ u.T``, and the result
is ``kernel / sigma`` (by 1 where sigma is 0). The iteration runs from the
stored ``u`` in evaluation too, as flax's does; ``update_stats`` only decides
whether the new ``u`` and ``sigma`` are returned as the new state. The stored
``sigma`` is therefore the one the last training step divided by, and
:func:`jaxnorm.fold_spectral_norm` (in ``folding.py``) freezes a layer with it.

Kernels of rank 0 or 1 (biases, scales) are returned unchanged with the state
as it was, as flax leaves them; flax's ``error_on_non_matrix`` is a field of
the layers, which pass it to :func:`check_matrix`. Arithmetic runs in at least float32 and the state's dtype.

PyTorch (``torch.nn.utils.spectral_norm``) iterates on the (out, in) matrix
with ``u`` over the outputs too, so its ``weight_u`` is this ``u``; it skips
the iteration in ``eval()`` and divides by ``u @ W @ v`` of the stored
vectors. See :mod:`jaxnorm.interop` for the conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src import checks
from jaxnorm._src.moments import accumulation_dtype
from jaxnorm._src.state import SpectralState

Array = jax.Array


def init_spectral_state(key: Array, kernel_shape: Sequence[int], *, dtype: Any = jnp.float32) -> SpectralState:
    """A fresh :class:`SpectralState`: ``u ~ N(0, 1)`` of shape (1, out), ``sigma = 1``.

    ``u`` is ``jax.random.normal(key, (1, kernel_shape[-1]), dtype)``, what
    ``flax.linen.SpectralNorm`` draws, so the same key gives flax's state.

    Args:
      key: a PRNG key.
      kernel_shape: the shape of the kernel, rank >= 2; its last axis is ``out``.
      dtype: dtype of ``u`` and ``sigma`` (flax's ``param_dtype``).

    Returns:
      ``SpectralState(u, sigma)``.

    Raises:
      ValueError: a kernel shape of rank < 2 (spectral norm leaves such
        arrays unchanged and keeps no state for them).

    Example:
      >>> import jax, jaxnorm as jn
      >>> state = jn.init_spectral_state(jax.random.key(0), (3, 4))
      >>> state.u.shape, float(state.sigma)
      ((1, 4), 1.0)
    """
    fn = "init_spectral_state"
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) < 2:
        raise ValueError(
            f"{fn}: `kernel_shape`={shape} has rank {len(shape)}, but spectral norm needs a "
            f"matrix (rank >= 2; higher ranks are viewed as (-1, out)); arrays of rank < 2 "
            f"pass through jn.spectral_norm unchanged and need no state."
        )
    return SpectralState(jax.random.normal(key, u_shape(shape), dtype), jnp.ones((), dtype))


def u_shape(kernel_shape: Sequence[int]) -> tuple[int, int]:
    """(1, out): the shape of the power-iteration vector ``u`` of a kernel (its last axis is ``out``)."""
    return (1, int(kernel_shape[-1]))


def matrix_shape(kernel_shape: Sequence[int]) -> tuple[int, int]:
    """(rows, out): the matrix a kernel of rank >= 2 is viewed as, ``kernel.reshape(-1, out)``."""
    return (int(np.prod(kernel_shape[:-1])), int(kernel_shape[-1]))


def check_matrix(fn: str, what: str, kernel_shape: Sequence[int], *, error_on_non_matrix: bool) -> None:
    """flax's ``error_on_non_matrix``: with it, a wrapped variable of rank > 2 is an error.

    Args:
      fn: the layer's name for the message.
      what: the variable, e.g. ``"variable 'layer_instance/kernel'"``.
      kernel_shape: its shape.
      error_on_non_matrix: the layer's field.

    Raises:
      ValueError: ``error_on_non_matrix`` and a rank above 2.
    """
    shape = tuple(int(d) for d in kernel_shape)
    if error_on_non_matrix and len(shape) > 2:
        raise ValueError(
            f"{fn}: `error_on_non_matrix`=True, but the wrapped {what} has shape {shape} (rank {len(shape)}); "
            f"pass `error_on_non_matrix=False` to normalize it as a {matrix_shape(shape)} matrix."
        )


def check_n_steps(fn: str, n_steps: Any) -> int:
    """``n_steps`` must be a static Python int >= 1 (a loop count)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(
            f"{fn}: `n_steps` must be a Python int >= 1 (the number of power iterations), "
            f"got {n_steps!r}; pass e.g. `n_steps=1` (one step per training step converges "
            f"over training because `u` is kept)."
        )
    return int(n_steps)


def check_spectral_state(fn: str, state: Any, kernel_shape: tuple[int, ...]) -> None:
    """``state`` must be a SpectralState with ``u`` (1, out) and a scalar ``sigma``."""
    if not (hasattr(state, "u") and hasattr(state, "sigma")):
        raise ValueError(
            f"{fn}: `state` must be a jn.SpectralState, got {type(state).__name__}; create it "
            f"with `jn.init_spectral_state(key, kernel.shape)`."
        )
    for name, want in (("u", u_shape(kernel_shape)), ("sigma", ())):
        got = tuple(np.shape(getattr(state, name)))
        if got != want:
            raise ValueError(
                f"{fn}: `state.{name}` has shape {got}, but `kernel` of shape "
                f"{tuple(kernel_shape)} (viewed as {matrix_shape(kernel_shape)}) "
                f"needs {want}; create the state with `jn.init_spectral_state(key, "
                f"{tuple(kernel_shape)})`."
            )
        checks.check_floating(fn, getattr(state, name), f"state.{name}")


def _l2_normalize(a: Array, epsilon: Any) -> Array:
    return a * lax.rsqrt(jnp.sum(a * a, keepdims=True) + epsilon)


def spectral_norm(
    kernel: Array,
    state: SpectralState,
    *,
    n_steps: int = 1,
    update_stats: bool,
    epsilon: float = 1e-12,
    dtype: Any = None,
) -> tuple[Array, SpectralState]:
    """``kernel / sigma`` with ``sigma`` from ``n_steps`` power iterations from ``state.u``.

    See the module docstring for the iteration (flax 0.12's, exactly). ``u``
    and ``v`` carry no gradient. A kernel of rank < 2 is returned unchanged
    with ``state`` as it was (flax's behaviour; ``state`` is then not read).

    Shapes: ``kernel`` (in, out) or (..., in, out) (flax's layouts), viewed as
    (-1, out); ``state.u`` (1, out); ``state.sigma`` ().

    Args:
      kernel: floating array.
      state: :class:`SpectralState` from :func:`init_spectral_state` or a
        previous call.
      n_steps: power iterations per call, a Python int >= 1.
      update_stats: static bool; True returns the new ``u`` and ``sigma``,
        False returns ``state`` itself (the kernel is normalized the same way).
      epsilon: added to the squared norm in each l2 normalization.
      dtype: dtype of the normalized kernel; default the kernel's.

    Returns:
      ``(kernel / sigma, new_state)``; the new state keeps the old one's dtypes.

    Raises:
      ValueError: non-floating input, ``n_steps`` not an int >= 1, a state of
        the wrong shape, a traced ``update_stats``, a bad ``epsilon``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxnorm as jn
      >>> kernel = jnp.array([[3., 0.], [0., 1.]])
      >>> state = jn.init_spectral_state(jax.random.key(0), kernel.shape)
      >>> w, state = jn.spectral_norm(kernel, state, n_steps=5, update_stats=True)
      >>> round(float(state.sigma), 4), np.round(np.asarray(w, np.float64), 4).tolist()
      (3.0, [[1.0, 0.0], [0.0, 0.3333]])
    """
    fn = "spectral_norm"
    checks.check_floating(fn, kernel, "kernel")
    update_stats = checks.check_static_bool(fn, "update_stats", update_stats)
    n_steps = check_n_steps(fn, n_steps)
    checks.check_epsilon(fn, epsilon)
    checks.check_out_dtype(fn, dtype)
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        return kernel if dtype is None else kernel.astype(dtype), state
    check_spectral_state(fn, state, kernel.shape)
    acc = jnp.promote_types(accumulation_dtype(kernel.dtype), jnp.result_type(state.u))
    w = jnp.reshape(kernel.astype(acc), (-1, kernel.shape[-1]))
    u = jnp.asarray(state.u, acc)
    for _ in range(n_steps):
        v = _l2_normalize(u @ w.T, epsilon)
        u = _l2_normalize(v @ w, epsilon)
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = ((v @ w) @ u.T)[0, 0]
    out = (w / jnp.where(sigma != 0, sigma, 1)).reshape(kernel.shape)
    out = out.astype(kernel.dtype if dtype is None else dtype)
    if not update_stats:
        return out, state
    return out, SpectralState(u.astype(jnp.result_type(state.u)), sigma.astype(jnp.result_type(state.sigma)))
