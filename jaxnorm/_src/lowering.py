"""Backend-specific lowering: every XLA:CPU workaround of jaxnorm, and nothing else.

The formula code (:mod:`moments`, :mod:`standardize`) is written once, for
every backend; where XLA:CPU needs the program written differently to run at
full speed, it calls a helper from here. Each helper decides per *lowering
platform*, never by ``jax.default_backend()``, so a program compiled for a
device that is not the default one (or for several platforms at once,
``jax.export``) gets the right code: the barrier is a primitive of its own,
:data:`cpu_barrier_p`, with an ``optimization_barrier`` lowering registered
for CPU and the identity for every other platform (it keeps its operands'
shard_map types, which ``lax.optimization_barrier`` does not); a choice
between two algorithms goes through :func:`on_cpu_else`
(``jax.lax.platform_dependent``), whose branches are both traced and only
the one for the platform being compiled for is lowered.

The workarounds and their measurements (XLA:CPU, jax 0.10, 2-core AMD EPYC;
README "Speed" has the full tables):

- :func:`copies`: an elementwise intermediate of x's size that feeds two
  fusions is written to memory by XLA:CPU (a fresh allocation, several times
  the cost of reading x), and common-subexpression elimination merges the
  cheap recomputations that would avoid it. Handles from one
  ``optimization_barrier`` are not merged, so each reduction rebuilds its own
  input inside its fusion (no data is copied). This is what keeps batch norm's
  fused backward at about 0.9x of flax's time in float32 and 0.5x in
  bfloat16 (the float32 copy of a bf16 x is never materialized). Other
  backends fuse multi-output reductions themselves: there the handles are the
  arrays themselves.
- :func:`sum_over`: group norm's layout (..., G, S) with the short trailing
  run S reduced is slow on XLA:CPU; reducing the (..., G * S) layout over the
  leading axes first and S second is about 2.5x faster (group norm's forward
  statistics, 15.6 ms instead of 6.6 ms per pass over a (32, 32, 32, 32, 8)
  float32 x), with an ``optimization_barrier`` between the two so that the
  simplifier does not fold the reduce of a reduce back into the slow form.
  A plain reduction of a fused elementwise expression is as fast as its
  ``dot_general`` form there, so no einsum is used.
- :func:`expand_minor`: in that layout a per-group statistic broadcast along
  the minor axis inside a fused reduction is the slow part too; stored with
  the minor axis expanded (a small array) it only broadcasts along the
  leading axes. The expansion is a shape decision (both platforms see the
  same shapes); on other backends the broadcast is fused and free.
- the row backward (:func:`standardize.row_backward`, chosen by
  :func:`on_cpu_else` in :mod:`standardize`): where every statistic is a
  contiguous row of x, XLA:CPU fuses a row's reductions with the elementwise
  work that consumes them, so recomputing the statistics in the backward
  gives three passes over the data for layer norm instead of five.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch  # apply_primitive: eager calls of cpu_barrier_p (tests/test_lowering.py)
from jax._src.lib.mlir.dialects import hlo
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

Array = jax.Array
T = TypeVar("T")

SMALL_MINOR = 64
"""Longest trailing reduced run (values) that :func:`sum_over` splits off on CPU."""


def on_cpu_else(cpu: Callable[..., T], default: Callable[..., T], *args: Any) -> T:
    """``cpu(*args)`` when lowering for XLA:CPU, else ``default(*args)``; both must give the same types.

    Decided per lowering platform (``jax.lax.platform_dependent``), not by
    ``jax.default_backend()``.
    """
    return lax.platform_dependent(*args, cpu=cpu, default=default)


def _barrier_lowering_cpu(ctx: Any, *xs: Any) -> list[Any]:
    return list(hlo.OptimizationBarrierOp(list(xs)).results)


def _barrier_jvp(primals: Sequence[Array], tangents: Sequence[Any]) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return cpu_barrier_p.bind(*primals), cpu_barrier_p.bind(*tangents)


def _barrier_transpose(cts: Sequence[Any], *primals: Any) -> list[Any]:
    return list(cpu_barrier_p.bind(*[ad.instantiate_zeros(c) for c in cts]))


cpu_barrier_p = Primitive("jaxnorm_cpu_barrier")
"""``optimization_barrier`` when lowered for XLA:CPU, the identity on every other platform.

Its abstract evaluation returns its operands' types unchanged (shard_map's
varying axes included, unlike ``lax.optimization_barrier``, which joins
them), so code that uses it types the same on every platform and under
``shard_map(check_vma=True)``. Identity under jvp, transpose and vmap.
"""
cpu_barrier_p.multiple_results = True
cpu_barrier_p.def_impl(lambda *xs: dispatch.apply_primitive(cpu_barrier_p, *xs))
cpu_barrier_p.def_abstract_eval(lambda *avals: avals)
mlir.register_lowering(cpu_barrier_p, lambda ctx, *xs: list(xs))
mlir.register_lowering(cpu_barrier_p, _barrier_lowering_cpu, platform="cpu")
ad.primitive_jvps[cpu_barrier_p] = _barrier_jvp
ad.primitive_transposes[cpu_barrier_p] = _barrier_transpose
batching.primitive_batchers[cpu_barrier_p] = lambda args, dims: (cpu_barrier_p.bind(*args), dims)


def barrier(values: tuple[Array, ...]) -> tuple[Array, ...]:
    """``values`` through one :data:`cpu_barrier_p`: an ``optimization_barrier`` on CPU only."""
    return tuple(cpu_barrier_p.bind(*values))


def copies(n: int, *arrays: Array | None) -> list[tuple[Array | None, ...]]:
    """``n`` sets of handles to the same arrays that XLA:CPU will not merge (None passes through).

    The sets come out of one :func:`barrier` (see the module docstring; sets
    from separate barriers would be merged again once XLA drops the
    barriers). The barrier is lowered per platform: on every backend but CPU
    every set is the arrays themselves.
    """
    present = tuple(a for a in arrays if a is not None)
    if not present or n == 0:
        return [arrays] * n
    flat = iter(barrier(present * n))
    return [tuple(None if a is None else next(flat) for a in arrays) for _ in range(n)]


def minor_split(shape: tuple[int, ...], axes: Sequence[int]) -> tuple[int, int] | None:
    """``(j, k)`` where :func:`sum_over` splits a reduction on CPU, else None (a shape decision).

    ``shape[k:]`` is the trailing reduced run (at most ``SMALL_MINOR`` values),
    ``shape[j:k]`` the kept axes before it, and some reduced axis lies before ``j``.
    """
    nd = len(shape)
    if not (len(axes) > 1 and nd - 1 in axes):
        return None
    k = nd - 1
    while k - 1 in axes:
        k -= 1
    j = k
    while j - 1 >= 0 and j - 1 not in axes:
        j -= 1
    if j < k and any(a < j for a in axes) and math.prod(shape[k:]) <= SMALL_MINOR:
        return j, k
    return None


def sum_over(v: Array, axes: Sequence[int]) -> Array:
    """``jnp.sum(v, axes, keepdims=True)``, split in two on CPU for a short trailing reduced run."""
    axes = tuple(sorted(axes))
    split = minor_split(v.shape, axes)
    if split is None:
        return jnp.sum(v, axes, keepdims=True)
    j, k = split

    def split_sum(v: Array) -> Array:
        merged = jnp.reshape(v, v.shape[:j] + (math.prod(v.shape[j:]),))
        part = jnp.sum(merged, tuple(a for a in axes if a < j), keepdims=True)
        # The barrier keeps XLA from merging the two reductions back into
        # the slow one (its simplifier folds a reduce of a reduce).
        (part,) = barrier((jnp.reshape(part, part.shape[:j] + v.shape[j:]),))
        return jnp.sum(part, tuple(range(k, v.ndim)), keepdims=True)

    return on_cpu_else(split_sum, lambda v: jnp.sum(v, axes, keepdims=True), v)


def expand_minor(stat: Array, shape: tuple[int, ...], axes: Sequence[int]) -> Array:
    """A statistic broadcast along a short reduced minor axis where :func:`sum_over` splits.

    Passed through :func:`copies` afterwards so that it stays materialized on
    CPU (see the module docstring); elsewhere the broadcast is fused.
    """
    if minor_split(shape, axes) is not None and stat.shape[-1] == 1:
        return jnp.broadcast_to(stat, stat.shape[:-1] + (shape[-1],))
    return stat
