"""PyTorch's weight norm and spectral norm state dicts to and from jaxnorm: arrays in, arrays out.

No torch import: values are NumPy/JAX arrays or tensors (read through
``.detach().cpu().numpy()``). Keys, per layer (``prefix`` names it):

=========================================== ======================================
PyTorch                                     jaxnorm
=========================================== ======================================
``parametrizations.weight.original0`` (g)   ``scale`` (C,) of :func:`jaxnorm.weight_norm`
``parametrizations.weight.original1`` (v)   ``kernel`` (the direction)
``weight_g``, ``weight_v`` (legacy)         the same
``parametrizations.weight.original``        ``kernel`` of :func:`jaxnorm.spectral_norm`
``parametrizations.weight.0._u`` / ``_v``   ``SpectralState.u`` (1, C) / used for ``sigma``
``weight_orig``, ``weight_u``, ``weight_v``  the same (legacy ``torch.nn.utils.spectral_norm``)
``bias``                                    ``bias``
=========================================== ======================================

Layouts: with ``layout="flax"`` (default) kernels are moved between PyTorch's
(out, in, *spatial) (``Linear`` (out, in), ``Conv2d`` OIHW) and flax's
(..., in, out) (``Dense`` (in, out), ``Conv`` HWIO), so the arrays drop
into ``jaxnorm.linen.WeightNorm(nn.Dense(...))`` / ``SpectralNorm`` (use
``feature_axes=-1``); ``layout="torch"`` keeps PyTorch's arrays as they are
(then ``feature_axes=0`` and ``scale`` keeps its (C, 1, ...) shape). Both
normalize over every axis but the output features (PyTorch's default
``dim=0``; ``ConvTranspose`` weights, whose output axis is 1, are not
covered). PyTorch's weight norm has no epsilon; jaxnorm's 1e-12 inside the
square root changes nothing visible for real weights.

Spectral norm. PyTorch's ``u`` lives on the output features, as flax's does,
so ``weight_u`` is ``SpectralState.u`` (as a row). In ``eval()`` PyTorch does
not iterate and divides by ``u @ W @ v`` of the stored vectors; that value
becomes ``SpectralState.sigma``, so :func:`jaxnorm.fold_spectral_norm` of the
converted kernel is PyTorch's evaluation weight. In the other direction
``weight_v`` is written along ``W^T u`` with the length that makes PyTorch's
``u @ W @ v`` equal the stored ``sigma`` exactly (1 once the iteration has
converged); PyTorch's next training step recomputes ``v`` from ``u`` anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxnorm._src import checks
from jaxnorm._src.state import SpectralState

LAYOUTS = ("flax", "torch")
WEIGHT_NORM_KEYS = {
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    "legacy": ("weight_g", "weight_v"),
}
SPECTRAL_KEYS = {
    "parametrizations": (
        "parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v",
    ),
    "legacy": ("weight_orig", "weight_u", "weight_v"),
}


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.array(value)


def _p(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _find(fn: str, state_dict: Mapping[str, Any], prefix: str, styles: Mapping[str, tuple[str, ...]]) -> tuple:
    """``(style, arrays, bias)`` of the first style whose keys are all under ``prefix``."""
    p = _p(prefix)
    for style, keys in styles.items():
        if all(p + k in state_dict for k in keys):
            bias = state_dict.get(p + "bias")
            return style, [_np(state_dict[p + k]) for k in keys], None if bias is None else _np(bias)
    wanted = " or ".join("(" + ", ".join(p + k for k in keys) + ")" for keys in styles.values())
    raise ValueError(
        f"{fn}: `state_dict` ({len(state_dict)} keys, e.g. {sorted(state_dict)[:4]}) has none of {wanted} "
        f"under `prefix`={prefix!r}; pass the layer's name as `prefix=` (e.g. `prefix='fc1'`)."
    )


def kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch's (out, in, *spatial) weight as flax's (..., in, out) kernel."""
    n = weight.ndim
    return np.transpose(weight, tuple(range(2, n)) + (1, 0)) if n >= 2 else weight


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """flax's (..., in, out) kernel as PyTorch's (out, in, *spatial) weight."""
    n = kernel.ndim
    return np.transpose(kernel, (n - 1, n - 2) + tuple(range(n - 2))) if n >= 2 else kernel


def _layout(fn: str, layout: Any) -> str:
    return checks.check_choice(fn, "layout", layout, LAYOUTS)


def _style(fn: str, style: Any) -> str:
    return checks.check_choice(fn, "style", style, ("parametrizations", "legacy"))


def _out(out: dict[str, np.ndarray], as_tensor: Callable[[np.ndarray], Any] | None) -> dict[str, Any]:
    return out if as_tensor is None else {k: as_tensor(v) for k, v in out.items()}


def weight_norm_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "", layout: str = "flax") -> dict[str, Any]:
    """A PyTorch weight-normalized layer's ``g``, ``v`` (and bias) as jaxnorm arrays.

    Reads ``torch.nn.utils.parametrizations.weight_norm``'s
    ``parametrizations.weight.original0/1`` or the legacy ``weight_g`` /
    ``weight_v``.

    Args:
      state_dict: the layer's (or a model's, with ``prefix``) state dict.
      prefix: the layer's name in the state dict, e.g. ``"fc1"``.
      layout: ``"flax"`` (kernel (..., in, out), scale (out,)) or
        ``"torch"`` (arrays as PyTorch has them).

    Returns:
      ``{"kernel", "scale"}`` and ``"bias"`` when the layer has one, for
      ``jn.weight_norm(kernel, scale)`` (``feature_axes=0`` for ``"torch"``).

    Raises:
      ValueError: no weight-norm entries under ``prefix``, or a bad ``layout``.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> sd = {"parametrizations.weight.original0": np.ones((4, 1)),
      ...       "parametrizations.weight.original1": np.ones((4, 3)), "bias": np.zeros(4)}
      >>> {k: v.shape for k, v in ji.weight_norm_from_torch(sd).items()}
      {'kernel': (3, 4), 'scale': (4,), 'bias': (4,)}
    """
    fn = "weight_norm_from_torch"
    layout = _layout(fn, layout)
    _, (g, v), bias = _find(fn, state_dict, prefix, WEIGHT_NORM_KEYS)
    if layout == "flax":
        g = g.reshape(-1) if g.ndim > 0 and g.size == v.shape[0] else g.reshape(())
        v = kernel_from_torch(v)
    out = {"kernel": jnp.asarray(v), "scale": jnp.asarray(g)}
    if bias is not None:
        out["bias"] = jnp.asarray(bias)
    return out


def weight_norm_to_torch(
    params: Mapping[str, Any],
    *,
    prefix: str = "",
    layout: str = "flax",
    style: str = "parametrizations",
    as_tensor: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """jaxnorm/flax weight-norm arrays as a PyTorch weight-normalized layer's state dict.

    Args:
      params: ``{"kernel", "scale"}`` and optionally ``"bias"``; with flax's
        ``WeightNorm`` these are ``params["Dense_0"]["kernel"]`` and
        ``params["WeightNorm_0"]["Dense_0/kernel/scale"]``.
      prefix: the layer's name, prepended to every key.
      layout: ``"flax"`` (the kernel is (..., in, out)) or ``"torch"``.
      style: ``"parametrizations"`` (``parametrizations.weight.original0/1``)
        or ``"legacy"`` (``weight_g``, ``weight_v``).
      as_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      The state dict, for ``module.load_state_dict`` of a module wrapped with
      the same kind of ``weight_norm``.

    Raises:
      ValueError: missing ``kernel``/``scale``, a bad ``layout`` or ``style``.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> sd = ji.weight_norm_to_torch({"kernel": np.ones((3, 4)), "scale": np.ones(4)})
      >>> {k: v.shape for k, v in sd.items()}
      {'parametrizations.weight.original0': (4, 1), 'parametrizations.weight.original1': (4, 3)}
    """
    fn = "weight_norm_to_torch"
    layout, style = _layout(fn, layout), _style(fn, style)
    if "kernel" not in params or "scale" not in params:
        raise ValueError(f"{fn}: `params` needs 'kernel' and 'scale', got {sorted(params)}.")
    v, g = _np(params["kernel"]), _np(params["scale"])
    if layout == "flax":
        v = kernel_to_torch(v)
        g = g.reshape((-1,) + (1,) * (v.ndim - 1)) if g.ndim > 0 else g
    g_key, v_key = WEIGHT_NORM_KEYS[style]
    p = _p(prefix)
    out = {p + g_key: g, p + v_key: v}
    if params.get("bias") is not None:
        out[p + "bias"] = _np(params["bias"])
    return _out(out, as_tensor)


def spectral_norm_from_torch(
    state_dict: Mapping[str, Any], *, prefix: str = "", layout: str = "flax",
) -> tuple[dict[str, Any], SpectralState]:
    """A PyTorch spectrally normalized layer as a kernel and a :class:`jaxnorm.SpectralState`.

    Reads ``torch.nn.utils.parametrizations.spectral_norm``'s
    ``parametrizations.weight.original`` / ``.0._u`` / ``.0._v`` or the legacy
    ``weight_orig`` / ``weight_u`` / ``weight_v``. ``sigma`` is PyTorch's
    evaluation-mode ``u @ W @ v``, so ``jn.fold_spectral_norm(kernel, state)``
    is the weight the PyTorch module uses in ``eval()``.

    Args:
      state_dict: the layer's (or a model's, with ``prefix``) state dict.
      prefix: the layer's name in the state dict.
      layout: ``"flax"`` (kernel (..., in, out)) or ``"torch"``.

    Returns:
      ``(params, state)``: ``params`` ``{"kernel"}`` plus ``"bias"`` when
      present; ``state`` with float32 ``u`` (1, out) and ``sigma`` ().

    Raises:
      ValueError: no spectral-norm entries under ``prefix``, or a bad ``layout``.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> sd = {"weight_orig": np.diag([3., 1.]), "weight_u": np.array([1., 0.]), "weight_v": np.array([1., 0.])}
      >>> params, state = ji.spectral_norm_from_torch(sd)
      >>> float(state.sigma), state.u.shape
      (3.0, (1, 2))
    """
    fn = "spectral_norm_from_torch"
    layout = _layout(fn, layout)
    _, (w, u, v), bias = _find(fn, state_dict, prefix, SPECTRAL_KEYS)
    mat = w.reshape(w.shape[0], -1).astype(np.float64)
    sigma = np.asarray(u, np.float64) @ mat @ np.asarray(v, np.float64)
    params = {"kernel": jnp.asarray(kernel_from_torch(w) if layout == "flax" else w)}
    if bias is not None:
        params["bias"] = jnp.asarray(bias)
    return params, SpectralState(jnp.asarray(u.reshape(1, -1), jnp.float32), jnp.asarray(sigma, jnp.float32))


def spectral_norm_to_torch(
    params: Mapping[str, Any],
    state: SpectralState,
    *,
    prefix: str = "",
    layout: str = "flax",
    style: str = "parametrizations",
    as_tensor: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """A kernel and its :class:`jaxnorm.SpectralState` as a PyTorch spectrally normalized layer.

    ``weight_u`` is ``state.u``; ``weight_v`` points along ``W^T u`` with the
    length that makes PyTorch's evaluation ``u @ W @ v`` equal ``state.sigma``,
    so the PyTorch module in ``eval()`` uses ``jn.fold_spectral_norm(kernel,
    state)``.

    Args:
      params: ``{"kernel"}`` and optionally ``"bias"`` (e.g. flax's
        ``params["Dense_0"]``).
      state: the kernel's state (e.g. ``SpectralState(u, sigma)`` from flax's
        ``batch_stats["SpectralNorm_0"]["Dense_0/kernel/u"]`` and ``.../sigma``).
      prefix: the layer's name, prepended to every key.
      layout: ``"flax"`` (the kernel is (..., in, out)) or ``"torch"``.
      style: ``"parametrizations"`` or ``"legacy"`` (``weight_orig``, ...).
      as_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      The state dict.

    Raises:
      ValueError: a missing kernel, a kernel of rank < 2, a bad ``layout`` or ``style``.

    Example:
      >>> import numpy as np, jaxnorm as jn, jaxnorm.interop as ji
      >>> state = jn.SpectralState(np.array([[1., 0.]]), np.array(3.0))
      >>> sd = ji.spectral_norm_to_torch({"kernel": np.diag([3., 1.])}, state, style="legacy")
      >>> sorted(sd), sd["weight_v"].tolist()
      (['weight_orig', 'weight_u', 'weight_v'], [1.0, 0.0])
    """
    fn = "spectral_norm_to_torch"
    layout, style = _layout(fn, layout), _style(fn, style)
    if "kernel" not in params or np.ndim(params["kernel"]) < 2:
        raise ValueError(
            f"{fn}: `params` needs a 'kernel' of rank >= 2 (PyTorch's spectral norm normalizes a matrix), "
            f"got {sorted(params)}."
        )
    w = _np(params["kernel"])
    w = kernel_to_torch(w) if layout == "flax" else w
    u = _np(state.u).reshape(-1).astype(np.float64)
    mat = w.reshape(w.shape[0], -1).astype(np.float64)
    wu = mat.T @ u
    v = float(np.asarray(state.sigma)) * wu / max(float(wu @ wu), 1e-300)
    keys = SPECTRAL_KEYS[style]
    p = _p(prefix)
    out = {p + keys[0]: w, p + keys[1]: u.astype(np.float32), p + keys[2]: v.astype(np.float32)}
    if params.get("bias") is not None:
        out[p + "bias"] = _np(params["bias"])
    return _out(out, as_tensor)
