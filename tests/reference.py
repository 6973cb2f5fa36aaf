"""Independent float64 NumPy references of the papers' formulas (no jaxnorm code)."""

from __future__ import annotations

import numpy as np


def f64(a):
    return np.asarray(a, dtype=np.float64)


def masked_moments(x, axes, mask=None):
    """Mean and biased variance over ``axes`` (keepdims), counting only mask=True values."""
    x = f64(x)
    w = np.ones_like(x) if mask is None else np.broadcast_to(np.asarray(mask), x.shape).astype(np.float64)
    xz = np.where(w > 0, x, 0.0)
    n = w.sum(axis=axes, keepdims=True)
    mean = xz.sum(axis=axes, keepdims=True) / n
    var = (np.where(w > 0, (x - mean) ** 2, 0.0)).sum(axis=axes, keepdims=True) / n
    return mean, var, n


def bn_train(x, feature_axes, scale=None, bias=None, eps=1e-5, mask=None):
    """Algorithm 1: returns y, batch mean, biased batch var (feature shape), count."""
    x = f64(x)
    axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    mean, var, n = masked_moments(x, axes, mask)
    y = (x - mean) / np.sqrt(var + eps)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    if scale is not None:
        y = y * f64(scale).reshape(bshape)
    if bias is not None:
        y = y + f64(bias).reshape(bshape)
    fshape = tuple(x.shape[a] for a in feature_axes)
    return y, mean.reshape(fshape), var.reshape(fshape), np.broadcast_to(n, mean.shape).reshape(fshape)


def bn_eval(x, mean, var, feature_axes, scale=None, bias=None, eps=1e-5):
    """Algorithm 2: the fixed affine map with population statistics."""
    x = f64(x)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    y = (x - f64(mean).reshape(bshape)) / np.sqrt(f64(var).reshape(bshape) + eps)
    if scale is not None:
        y = y * f64(scale).reshape(bshape)
    if bias is not None:
        y = y + f64(bias).reshape(bshape)
    return y


def layer_norm(x, axes, scale=None, bias=None, eps=1e-6, mask=None):
    mean, var, _ = masked_moments(x, axes, mask)
    y = (f64(x) - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return y


def rms_norm(x, axes, scale=None, eps=1e-6):
    x = f64(x)
    y = x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)
    return y if scale is None else y * f64(scale)


def group_norm(x, groups, channel_axis=-1, reduction_axes=None, scale=None, bias=None, eps=1e-6):
    """Wu & He 2018: per example and group of consecutive channels."""
    x = f64(x)
    c = channel_axis % x.ndim
    xc = np.moveaxis(x, c, -1)  # (N, ..., C)
    n_ch = xc.shape[-1]
    axes = tuple(range(1, x.ndim)) if reduction_axes is None else tuple(a % x.ndim for a in reduction_axes)
    # positions of reduced non-channel axes after moving the channel last
    moved = [a for a in range(x.ndim) if a != c]
    red = tuple(moved.index(a) for a in axes if a != c)
    xg = xc.reshape(xc.shape[:-1] + (groups, n_ch // groups))
    red_g = red + (xg.ndim - 1,)
    mean = xg.mean(axis=red_g, keepdims=True)
    var = xg.var(axis=red_g, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(xc.shape)
    if scale is not None:
        y = y * f64(scale)
    if bias is not None:
        y = y + f64(bias)
    return np.moveaxis(y, -1, c)


def bn_backward(x, dy, gamma, eps=1e-5):
    """Ioffe & Szegedy section 3, for (m, C) input: dx, dgamma, dbeta."""
    x, dy, gamma = f64(x), f64(dy), f64(gamma)
    m = x.shape[0]
    mu = x.mean(0)
    s = np.sqrt(x.var(0) + eps)
    x_hat = (x - mu) / s
    dx = gamma / (m * s) * (m * dy - dy.sum(0) - x_hat * (dy * x_hat).sum(0))
    return dx, (dy * x_hat).sum(0), dy.sum(0)
