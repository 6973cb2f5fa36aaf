"""``linear_call``: a linear map with a hand-written transpose, as one JAX primitive (forward mode of the norms).

Why it exists. jaxnorm's backward passes are hand-fused (three passes over the
data for layer norm where autodiff needs five; :mod:`standardize`). A
``jax.custom_vjp`` keeps that speed but refuses forward mode (``jax.jvp``,
``jacfwd``, ``linearize``, ``hessian`` in either order). A ``jax.custom_jvp``
gives forward mode, but JAX then builds the backward by transposing the
tangent formula, which loses the fusion (layer norm's (8192, 1024) float32
gradient ran at plain autodiff's speed, about 1.8x the fused one's, on a
2-core CPU), and a ``custom_vjp`` called inside a ``custom_jvp`` rule cannot be
transposed at all. So :mod:`standardize` is a ``custom_jvp`` whose tangent is
:func:`linear_call`: one primitive, linear in its tangent operands, whose

- evaluation (``jax.jvp``, ``jax.linearize``) is the plain tangent formula,
  ``rule.apply`` (lowered through ``mlir.lower_fun``, so every backend and
  collective that jnp supports works);
- transpose (``jax.grad``, ``vjp``) is ``rule.transpose``: the fused backward;
- JVP (second derivatives that differentiate the tangent map itself:
  ``jacrev`` of ``jacfwd``, ``jacfwd`` of ``jacfwd``) is forward mode of the
  plain formula, so higher orders keep working (more slowly);
- batching (``vmap``) re-binds the primitive with a :class:`Batched` rule that
  vmaps both ``apply`` and ``transpose``, so ``vmap`` of ``grad`` keeps the
  fused backward.

A rule is any hashable object (a NamedTuple of static values) with
``n_residuals``, ``out_avals`` (the output types, shard_map's varying axes
included), ``apply(residuals, tangents) -> outputs`` and
``transpose(residuals, cotangents) -> tangent cotangents``, over flat tuples of
arrays. ``residuals`` are the primal values the map depends on (never
differentiated through this primitive's transpose); ``tangents`` are the
operands it is linear in.

The registration hooks used here (``jax.interpreters.ad``, ``batching``,
``mlir``, ``batching.fancy_primitive_batchers``, ``jax._src.dispatch.apply_primitive``,
``jax._src.core.no_axis_name``) are not all public API in
jax 0.10; they are used in this file only, and ``tests/test_linear_primitive.py``
exercises each one so that a JAX upgrade that moves them fails there first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import (
    core,  # no_axis_name: the name of an unnamed vmap axis
    dispatch,  # apply_primitive: eager (un-jitted) evaluation
)
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

Array = jax.Array


linear_p = Primitive("jaxnorm_linear")
"""The primitive behind :func:`linear_call`; its one parameter is the hashable ``rule``."""
linear_p.multiple_results = True


def linear_call(rule: Any, residuals: Sequence[Array], tangents: Sequence[Array]) -> list[Array]:
    """``rule.apply(residuals, tangents)``, transposed by ``rule.transpose`` under reverse mode.

    Args:
      rule: hashable; see the module docstring. ``rule.n_residuals == len(residuals)``.
      residuals: the arrays the linear map depends on (no None).
      tangents: the arrays it is linear in (no None), each of the type its
        cotangent from ``rule.transpose`` will have.

    Returns:
      The outputs, of the types ``rule.out_avals``.
    """
    if len(residuals) != rule.n_residuals:
        raise ValueError(f"linear_call: {len(residuals)} residuals for a rule that takes {rule.n_residuals}")
    return linear_p.bind(*residuals, *tangents, rule=rule)


def _apply(*operands: Array, rule: Any) -> list[Array]:
    n = rule.n_residuals
    return list(rule.apply(tuple(operands[:n]), tuple(operands[n:])))


linear_p.def_impl(lambda *operands, rule: dispatch.apply_primitive(linear_p, *operands, rule=rule))
linear_p.def_abstract_eval(lambda *avals, rule: list(rule.out_avals))
mlir.register_lowering(linear_p, mlir.lower_fun(_apply, multiple_results=True))


def _jvp(primals: Sequence[Array], tangents: Sequence[Any], *, rule: Any) -> tuple[list[Array], list[Array]]:
    """Forward mode of the plain formula (its residuals vary too): second derivatives."""
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    out, t_out = jax.jvp(lambda *ops: _apply(*ops, rule=rule), tuple(primals), tuple(tangents))
    return list(out), list(t_out)


def _transpose(cts: Sequence[Any], *operands: Any, rule: Any) -> list[Array | None]:
    """``rule.transpose`` for the tangent operands; the residuals get no cotangent."""
    n = rule.n_residuals
    residuals = operands[:n]
    if any(ad.is_undefined_primal(r) for r in residuals):
        raise NotImplementedError(
            "jaxnorm linear_call: a residual is a linear input here; differentiate the plain formula instead"
        )
    cts = [ad.instantiate_zeros(c) for c in cts]
    tangent_cts = rule.transpose(tuple(residuals), tuple(cts))
    return [None] * n + [
        ct if ad.is_undefined_primal(t) else None for ct, t in zip(tangent_cts, operands[n:], strict=True)
    ]


class Batched(NamedTuple):
    """A rule vmapped over a leading axis of size ``size``: every tangent batched, residuals as ``residual_axes``.

    ``axis_name`` and ``spmd_axis_name`` are those of the ``vmap`` being
    applied, so collectives over a named ``vmap`` axis inside the rule (sync
    batch norm under ``vmap(axis_name=...)``) still find it.
    """

    inner: Any
    residual_axes: tuple[int | None, ...]
    size: int
    axis_name: Any = None
    spmd_axis_name: Any = None

    @property
    def n_residuals(self) -> int:
        return self.inner.n_residuals

    @property
    def out_avals(self) -> tuple[Any, ...]:
        return tuple(a.update(shape=(self.size, *a.shape)) for a in self.inner.out_avals)

    def _vmap(self, f: Any) -> Any:
        return jax.vmap(
            f, in_axes=(self.residual_axes, 0), axis_name=self.axis_name, spmd_axis_name=self.spmd_axis_name
        )

    def apply(self, residuals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[Array, ...]:
        return tuple(self._vmap(self.inner.apply)(residuals, tangents))

    def transpose(self, residuals: tuple[Array, ...], cts: tuple[Array, ...]) -> tuple[Array, ...]:
        return tuple(self._vmap(self.inner.transpose)(residuals, cts))


def _batch(
    axis_data: Any, operands: Sequence[Array], dims: Sequence[int | None], *, rule: Any
) -> tuple[list[Array], list[int]]:
    n = rule.n_residuals
    size = next(a.shape[d] for a, d in zip(operands, dims, strict=True) if d is not None)

    def leading(a: Array, d: int | None) -> Array:
        return a if d is None else jnp.moveaxis(a, d, 0)

    residuals = [leading(a, d) for a, d in zip(operands[:n], dims[:n], strict=True)]
    residual_axes = tuple(None if d is None else 0 for d in dims[:n])
    # Every tangent gets the batch axis (its cotangent then has it too; the
    # transpose of this broadcast sums it away for an unbatched tangent).
    tangents = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(operands[n:], dims[n:], strict=True)
    ]
    name = None if axis_data.name is core.no_axis_name else axis_data.name
    out = linear_p.bind(*residuals, *tangents, rule=Batched(rule, residual_axes, size, name, axis_data.spmd_name))
    return out, [0] * len(out)


ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
# The batcher that is told the vmap's axis (name, size, spmd name), as JAX's own collectives use.
batching.fancy_primitive_batchers[linear_p] = _batch
