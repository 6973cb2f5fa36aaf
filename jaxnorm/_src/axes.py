"""Axes and layouts: which axes of ``x`` are reduced and which are kept.

:func:`canonical_axes` turns a user's ``axis`` (int or tuple, negatives allowed)
into sorted non-negative axes, with the one message format of
:mod:`jaxnorm._src.checks`; :class:`Layout` splits ``x``'s axes into kept
feature axes and reduced ones (batch norm's ``axis``, flax's convention).
Pure shape arithmetic: nothing here touches array values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


def canonical_axes(fn: str, name: str, axes: int | Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Turns an int or a sequence of ints into sorted non-negative axes of ``shape``.

    Raises for axes out of range, repeated axes (also after wrapping negatives)
    and non-integers.
    """
    ndim = len(shape)
    raw = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    for a in raw:
        if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
            raise ValueError(
                f"{fn}: `{name}` must be an int or a tuple of ints, got {axes!r}; "
                f"e.g. `{name}=-1`."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `{name}`={axes!r} is out of range for `x` of shape {shape} "
                f"({ndim} axes); use axes in [{-ndim}, {ndim - 1}]."
            )
    wrapped = tuple(int(a) % ndim for a in raw)
    if len(set(wrapped)) != len(wrapped):
        raise ValueError(
            f"{fn}: `{name}`={axes!r} names an axis more than once for `x` of shape "
            f"{shape} (as non-negative axes: {wrapped}); list each axis once."
        )
    return tuple(sorted(wrapped))



class Layout(NamedTuple):
    """Where the features of ``x`` are, for a given ``axis`` (the kept axes)."""

    feature_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    feature_shape: tuple[int, ...]
    broadcast_shape: tuple[int, ...]  # x's rank, 1 on reduced axes
    values_per_feature: int


def layout(fn: str, shape: tuple[int, ...], axis: Any) -> Layout:
    """Splits the axes of an array of ``shape`` into kept feature axes (``axis``) and reduced ones."""
    shape = tuple(shape)
    feature_axes = canonical_axes(fn, "axis", axis, shape)
    reduction_axes = tuple(a for a in range(len(shape)) if a not in feature_axes)
    feature_shape = tuple(shape[a] for a in feature_axes)
    broadcast_shape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
    per_feature = math.prod(shape[a] for a in reduction_axes)
    return Layout(feature_axes, reduction_axes, feature_shape, broadcast_shape, per_feature)


def reduces_trailing(axes: Sequence[int], ndim: int) -> bool:
    """Whether ``axes`` are the last ``len(axes)`` axes: each statistic is one contiguous row."""
    return len(axes) > 0 and tuple(sorted(axes)) == tuple(range(ndim - len(axes), ndim))


def right_aligned_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``shape`` padded with leading 1s to ``ndim`` axes (numpy broadcasting from the right)."""
    return (1,) * (ndim - len(shape)) + tuple(shape)


def broadcast_axes(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Axes of an ``ndim``-d array along which an array of ``shape`` (broadcasting from the right) is constant."""
    full = right_aligned_shape(shape, ndim)
    return tuple(a for a in range(ndim) if full[a] == 1)
