"""jaxnorm/_src/linear_primitive.py: every JAX hook it registers, on a toy rule with a known answer.

The rule is ``y = a * t`` (elementwise, ``a`` the residual) with the transpose
``ct -> a * ct`` written by hand. Each test exercises one registration (eager
impl, abstract evaluation, lowering, jvp, transpose, batching), so a JAX
upgrade that moves one of the non-public hooks fails here by name.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm._src.linear_primitive import Batched, linear_call, linear_p


class Scaling(NamedTuple):
    """``y = a * t``; ``transpose`` counts nothing, it is the exact adjoint (a marker checks it ran)."""

    out_avals: tuple[Any, ...]
    marker: float = 1.0  # the transpose multiplies by it: 1 is exact, anything else shows it was used

    n_residuals: int = 1

    def apply(self, residuals, tangents):
        (a,), (t,) = residuals, tangents
        return (a * t,)

    def transpose(self, residuals, cts):
        (a,), (ct,) = residuals, cts
        return (self.marker * a * ct,)


A = jnp.array([1.0, -2.0, 3.0])
T = jnp.array([0.5, 0.25, -1.0])


def rule(marker=1.0):
    return Scaling((jax.typeof(A).to_tangent_aval(),), marker)


def scaled(a, t, marker=1.0):
    return linear_call(rule(marker), [a], [t])[0]


def test_eager_jit_and_abstract_evaluation():
    np.testing.assert_allclose(scaled(A, T), A * T)
    np.testing.assert_allclose(jax.jit(scaled)(A, T), A * T)
    assert jax.eval_shape(scaled, A, T).shape == (3,)
    assert "jaxnorm_linear" in str(jax.make_jaxpr(scaled)(A, T))


def test_transpose_is_the_hand_written_rule():
    # the marker proves that reverse mode calls rule.transpose, not a transpose of rule.apply
    (ct,) = jax.linear_transpose(lambda t: scaled(A, t, marker=2.0), T)(jnp.ones(3))
    np.testing.assert_allclose(ct, 2.0 * A)
    g = jax.grad(lambda t: jnp.sum(jnp.sin(scaled(A, t))))(T)
    np.testing.assert_allclose(g, A * jnp.cos(A * T), rtol=1e-6)


def test_jvp_differentiates_the_residual_too():
    # d/da (a * t) = t: second derivatives go through the plain formula
    _, t_out = jax.jvp(lambda a: scaled(a, T), (A,), (jnp.ones(3),))
    np.testing.assert_allclose(t_out, T)
    hess = jax.hessian(lambda a: jnp.sum(scaled(a, a) ** 2))(A)
    np.testing.assert_allclose(hess, np.diag(12.0 * np.asarray(A) ** 2), rtol=1e-6)


def test_batching_keeps_the_primitive_and_its_transpose():
    a_b, t_b = jnp.stack([A, 2 * A]), jnp.stack([T, -T])
    np.testing.assert_allclose(jax.vmap(scaled)(a_b, t_b), a_b * t_b)
    np.testing.assert_allclose(jax.vmap(scaled, in_axes=(None, 0))(A, t_b), A * t_b)
    np.testing.assert_allclose(jax.vmap(scaled, in_axes=(1, 1), out_axes=1)(a_b.T, t_b.T), (a_b * t_b).T)
    jaxpr = str(jax.make_jaxpr(jax.vmap(scaled))(a_b, t_b))
    assert "jaxnorm_linear" in jaxpr and "Batched" in jaxpr
    # the batched primitive is transposed by the vmapped hand-written rule (the marker shows it)
    (ct,) = jax.linear_transpose(lambda t: jax.vmap(lambda a, t: scaled(a, t, 3.0))(a_b, t), t_b)(jnp.ones((2, 3)))
    np.testing.assert_allclose(ct, 3.0 * a_b)
    # an unbatched tangent gets its cotangent summed over the batch
    (ct,) = jax.linear_transpose(lambda t: jax.vmap(scaled, in_axes=(0, None))(a_b, t), T)(jnp.ones((2, 3)))
    np.testing.assert_allclose(ct, 3.0 * A)  # A + 2 * A
    # the batched rule's output types gain the batch axis in front
    assert Batched(rule(), (0,), 2).out_avals[0].shape == (2, 3)


def test_refuses_a_residual_count_mismatch():
    with pytest.raises(ValueError, match="linear_call"):
        linear_call(rule(), [A, A], [T])
    assert linear_p.multiple_results
