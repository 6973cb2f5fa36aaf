"""The XLA:CPU workarounds of jaxnorm/_src/lowering.py are chosen per lowering platform, not by the default backend."""

import jax
import jax.numpy as jnp
import pytest

import jaxnorm as jn


def _lowered_text(f, x, platform):
    return jax.export.export(jax.jit(f), platforms=[platform])(x).mlir_module()


@pytest.mark.parametrize(
    "f",
    [
        lambda x: jax.grad(lambda x: (jn.layer_norm(x) ** 2).sum())(x),  # the row backward
        lambda x: jax.grad(lambda x: (jn.batch_norm(x, jn.init_batch_stats(8), training=True)[0] ** 2).sum())(x),
        # forward mode: the tangent primitive lowers for every platform, and the primal keeps its CPU handles
        lambda x: jax.jvp(lambda x: jn.layer_norm(x) ** 2, (x,), (jnp.cos(x),))[1],
    ],
)
def test_barriers_only_when_lowering_for_cpu(f):
    x = jnp.ones((4, 8))
    assert "optimization_barrier" in _lowered_text(f, x, "cpu")
    # the same program exported for a GPU from this CPU-only machine holds none of the CPU handles
    gpu = _lowered_text(f, x, "cuda")
    assert "optimization_barrier" not in gpu
    # only the branch of the platform is lowered (a case on a constant), which XLA removes when compiling
    assert "conditional" not in jax.jit(f).lower(x).compile().as_text()


def test_row_backward_and_saved_backward_agree():
    """The CPU-only row backward and the backward from saved statistics give the same gradients."""
    from jaxnorm._src import standardize as st

    x = jax.random.normal(jax.random.key(0), (3, 16)) * 3 + 1
    g = jax.random.normal(jax.random.key(1), (3, 16))
    scale, bias = jnp.linspace(0.5, 2, 16), jnp.linspace(-1, 1, 16)
    static = st.Static((1,), True, None, None, jnp.dtype(jnp.float32), True)
    out, res = st.standardize_fwd(static, x, None, scale, bias, jnp.float32(1e-5))
    ct = out._replace(y=g, shift=None, offset=jnp.zeros_like(out.offset), var=jnp.zeros_like(out.var), count=None)
    for a, b in zip(st.row_backward(static, res, ct), st.saved_backward(static, res, ct)):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5)
