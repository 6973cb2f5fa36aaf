"""Shared layouts, inputs and the float64 NumPy reference for the Flax parity tests.

Used by tests/test_linen.py, tests/test_nnx.py and benchmarks/flax_parity.py.
The reference is the textbook formula (Ioffe & Szegedy 2015, Algorithm 1) in
float64, written independently of jaxnorm.
"""

from __future__ import annotations

import numpy as np

# name -> (x shape, BatchNorm axis, mask shape or None)
LAYOUTS = {
    "NHWC": ((4, 3, 3, 6), -1, None),
    "NCHW": ((4, 6, 3, 3), 1, None),
    "NC": ((8, 6), -1, None),
    "BTC_masked": ((3, 5, 6), -1, (3, 5, 1)),
}

# Per-example layers, per layout: flax keyword arguments (shared by linen and
# NNX) and, for the reference, the reduced axes, the parameter axes and the
# group count (None: no groups).
STATELESS = {
    "NHWC": {
        "LayerNorm": ({}, (3,), (3,), None),
        "RMSNorm": ({}, (3,), (3,), None),
        "GroupNorm": ({"num_groups": 3}, (1, 2, 3), (3,), 3),
        "InstanceNorm": ({}, (1, 2), (3,), None),
    },
    "NCHW": {
        "LayerNorm": ({"reduction_axes": (1, 2, 3), "feature_axes": 1}, (1, 2, 3), (1,), None),
        "RMSNorm": ({"reduction_axes": (1, 2, 3), "feature_axes": 1}, (1, 2, 3), (1,), None),
        "InstanceNorm": ({"feature_axes": 1}, (2, 3), (1,), None),
    },
    "NC": {
        "LayerNorm": ({}, (1,), (1,), None),
        "RMSNorm": ({}, (1,), (1,), None),
        "GroupNorm": ({"num_groups": 2}, (1,), (1,), 2),
    },
    "BTC_masked": {
        "LayerNorm": ({}, (2,), (2,), None),
        "RMSNorm": ({}, (2,), (2,), None),
        "GroupNorm": ({"num_groups": 3}, (1, 2), (2,), 3),
        "InstanceNorm": ({}, (1,), (2,), None),
    },
}


def make_input(shape, seed, offset=1.5, spread=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + offset).astype(np.float32)


def make_mask(shape, seed):
    """Padding mask: example b has its first ``lengths[b] >= 2`` positions valid."""
    if shape is None:
        return None
    rng = np.random.default_rng(1000 + seed)
    lengths = rng.integers(2, shape[1] + 1, size=shape[0])
    lengths[0] = shape[1]
    valid = np.arange(shape[1])[None, :] < lengths[:, None]
    return valid.reshape(shape[0], shape[1], *([1] * (len(shape) - 2)))


def feature_mask(shape, seed):
    """A mask over every value that keeps at least 2 features per row valid."""
    rng = np.random.default_rng(2000 + seed)
    mask = rng.random(shape) > 0.3
    mask[..., :2] = True
    return mask


def ref_standardize(x, axes, mask=None, eps=1e-5, center=True):
    """float64 (x - mean) / sqrt(var + eps) over ``axes``, counting only masked-in values."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / n if center else np.zeros_like(n)
    var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / n
    return (x - mean) / np.sqrt(var + eps), mean, var


def ref_group_norm(x, groups, axes, eps, mask=None):
    """Channels-last group norm in float64: split C into (G, C/G) and reduce ``axes`` + C/G."""
    x = np.asarray(x, np.float64)
    split = x.shape[:-1] + (groups, x.shape[-1] // groups)
    xs = x.reshape(split)
    m = None if mask is None else np.broadcast_to(mask, x.shape).reshape(split)
    red = tuple(a for a in axes if a != x.ndim - 1) + (x.ndim,)
    y, _, _ = ref_standardize(xs, red, m, eps)
    return y.reshape(x.shape)


def ref_stateless(x, name, reduced, groups, eps, mask=None):
    """Reference output (scale 1, bias 0) of a per-example layer."""
    if name == "GroupNorm":
        return ref_group_norm(x, groups, reduced, eps, mask)
    return ref_standardize(x, reduced, mask, eps, center=name != "RMSNorm")[0]


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
