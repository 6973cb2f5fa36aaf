"""Across devices: the exact merge of per-device moments, grouped sums, and shard_map's typing.

With ``axis_name``, each device computes its local ``(shift, offset, var, count)``
(:mod:`jaxnorm._src.moments`) and the devices exchange them in **one** ``psum``
(four numbers per statistic per device, never the data). Every device then
merges them exactly and identically with Chan et al.'s pairwise formula,
count-weighted (devices may hold different numbers of valid values, so the
global mean is not the mean of per-device means, which is what flax computes)
and relative to a common reference shift, so no cross-device
``E[x^2] - E[x]^2`` appears either. A ``psum`` of ``(n, n*mean, M2 + n*mean^2)``
would also be one collective but reintroduces exactly that cancellation.

Collectives, forward and backward (what the compiled HLO shows; the tests count them):

- ``axis_name`` (``shard_map``, ``pmap``, ``vmap``): **one** all-reduce in the
  forward pass (:func:`merge_across_devices`) and **one** in the backward pass
  (the fused backward of :mod:`jaxnorm._src.standardize` stacks its
  per-feature sums into a single :func:`sum_across`).
- Sharded ``jax.jit`` without ``axis_name``: XLA partitions the reductions
  itself: two all-reduces forward (the two-pass variance needs the global
  shift first; :func:`split_across_devices` detects that case on an Explicit
  mesh), one backward, none of them an all-gather of the data. On an Auto
  mesh the sharding is invisible while tracing, so the one-pass shift (the
  first value) is read from the device that holds it: five small all-reduces
  in the forward pass, still no all-gather.

``axis_index_groups`` (e.g. ``[[0, 1, 2, 3], [4, 5, 6, 7]]``) are applied after
the one exchange, so they work under ``vmap`` and ``shard_map`` as well as
``pmap`` and cost no extra collective.

shard_map's replication typing (``check_vma=True``): :func:`varying_axes` and
:func:`varies_over` read the type; :func:`match_replication` sums a custom
derivative's cotangent over the axes where its primal is replicated, as
autodiff of the implicit broadcast would.

Gradients: the gradient of each device's local loss with respect to its local
input is the gradient of the global loss (the sum of the devices' losses) with
respect to that input, as if the whole batch were on one device; this is what
data-parallel training needs (PyTorch's SyncBatchNorm does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._src.checks import check_axis_index_groups

Array = jax.Array
M = TypeVar("M")  # jaxnorm._src.moments.Moments, which imports this module


def split_across_devices(x: Array, axes: Sequence[int]) -> bool:
    """Whether a reduced axis of ``x`` is sharded in its type (sharded jit on an Explicit mesh).

    There the first value lives on one device and slicing it is refused, so the
    shift falls back to the mean (the two-pass, whose reductions XLA turns into
    all-reduces of per-device partial sums).
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None:
        return False
    return any(a < len(spec) and spec[a] is not None for a in axes)


def merge_across_devices(local: M, axis_name: Any, axis_index_groups: Any = None) -> M:
    """Exact count-weighted merge of per-device moments in one ``psum``.

    Chan et al.: with per-device counts n_i, means m_i and variances v_i,
    N = sum n_i, m = sum n_i m_i / N, v = (sum n_i v_i + sum n_i (m_i - m)^2) / N.
    Means are taken relative to one reference shift (the device holding the
    most values) so that differences of large means stay exact.

    The exchange is an all-gather written as a ``psum``: each device writes its
    four numbers per statistic into its own slot of a zero buffer with one slot
    per device, and the sum fills every slot (adding zeros is exact, and
    ``.at[].set`` keeps a device's NaN in its own slot). ``lax.all_gather``
    would move half the bytes, but under ``shard_map`` its result is typed as
    varying over the axis, so the merged statistics could not be returned with
    ``out_specs=P()``; the ``psum`` result is replicated by type. Groups are
    applied after the exchange, by giving the other groups' slots zero
    weight, so ``axis_index_groups`` works under ``vmap`` and ``shard_map`` too
    (``lax.psum`` supports it under ``pmap`` only).
    """
    shape = jnp.broadcast_shapes(local.var.shape, local.count.shape)
    packed = jnp.stack([jnp.broadcast_to(a, shape) for a in local])
    size = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    slots = jnp.zeros((size,) + packed.shape, packed.dtype).at[me].set(packed)
    gathered = lax.psum(slots, axis_name)
    shift, offset, var, n = gathered[:, 0], gathered[:, 1], gathered[:, 2], gathered[:, 3]
    if axis_index_groups is not None:
        groups = check_axis_index_groups("moments", axis_index_groups, axis_name)
        member = jnp.asarray(_membership(groups, size))[me]
        member = jnp.reshape(member, (size,) + (1,) * len(shape))
        shift, offset, var, n = (jnp.where(member, a, 0) for a in (shift, offset, var, n))
    return merge_stacked(local._replace(shift=shift, offset=offset, var=var, count=n))


def merge_stacked(parts: M) -> M:
    """Chan et al.'s exact count-weighted merge of moments stacked along axis 0.

    The formula behind :func:`merge_across_devices` (one part per device) and
    :mod:`jaxnorm._src.feature_stats` (a state and a batch, or two states).
    """
    shift, offset, var, n = parts.shift, parts.offset, parts.var, parts.count
    total = jnp.sum(n, axis=0)
    weight = n / jnp.maximum(total, 1)
    ref = jnp.argmax(n, axis=0)
    ref_shift = lax.stop_gradient(jnp.take_along_axis(shift, ref[None], axis=0)[0])
    # A device without valid values has weight 0; its delta is zeroed too so a
    # huge reference shift cannot square to inf and turn 0 * inf into NaN.
    delta = jnp.where(n > 0, (shift - ref_shift) + offset, 0)
    mean_delta = jnp.sum(weight * delta, axis=0)
    spread = delta - mean_delta
    merged_var = jnp.sum(weight * (var + spread * spread), axis=0)
    return parts._replace(shift=ref_shift, offset=mean_delta, var=merged_var, count=total)


def _membership(groups: tuple[tuple[int, ...], ...], size: int) -> Any:
    """(size, size) bool NumPy table: row i marks the indices in i's group."""
    table = np.zeros((size, size), bool)
    for g in groups:
        for i in g:
            table[i, list(g)] = True
    return table


def varies_over(x: Array, axis_name: Any) -> bool:
    """Whether ``shard_map``'s type system (``check_vma=True``) marks ``x`` as varying over ``axis_name``.

    False under ``vmap``, ``pmap`` and ``shard_map(check_vma=False)``, which do
    not track this. The attribute moved between JAX versions, hence the lookups.
    """
    vma = varying_axes(x)
    if not vma:
        return False
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(n in vma for n in names)


def varying_axes(x: Any) -> frozenset:
    """The mesh axes over which ``shard_map``'s type system says ``x`` varies (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(vma or ())


def match_replication(cotangent: Array | None, primal: Array | None) -> Array | None:
    """``cotangent`` summed over the mesh axes where it varies but ``primal`` does not.

    Under ``shard_map(check_vma=True)`` a replicated value (a scale, a bias)
    meets per-device data through an implicit broadcast, whose transpose is a
    ``psum``; a hand-written backward must return its cotangents with the
    primal's type, so it does that sum itself. Elsewhere nothing varies by type and the
    cotangent passes unchanged.
    """
    if cotangent is None or primal is None:
        return cotangent
    extra = varying_axes(cotangent) - varying_axes(primal)
    if not extra:
        return cotangent
    return lax.psum(cotangent, tuple(sorted(extra)))


def sum_across(values: Array, axis_name: Any, axis_index_groups: Any = None) -> Array:
    """Sum over ``axis_name`` (identity when it is None), within groups if given: one ``psum``.

    With groups, each device writes ``values`` into its group's slot of a zero
    buffer (one slot per group), so one ``psum`` sums every group at once and
    each device reads its own group's slot.
    """
    if axis_name is None:
        return values
    if axis_index_groups is None:
        return lax.psum(values, axis_name)
    size = lax.axis_size(axis_name)
    groups = check_axis_index_groups("moments", axis_index_groups, axis_name)
    group_of = [0] * size
    for k, g in enumerate(groups):
        for i in g:
            group_of[i] = k
    mine = jnp.asarray(group_of)[lax.axis_index(axis_name)]
    slots = jnp.zeros((len(groups),) + values.shape, values.dtype).at[mine].set(values)
    return lax.psum(slots, axis_name)[mine]
