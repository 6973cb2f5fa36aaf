"""layer_norm and rms_norm against float64 NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


def data(shape, seed=0, loc=0.5):
    return (loc + 2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize(
    "shape,axis,param_shape",
    [((4, 8), -1, (8,)), ((2, 5, 6), -1, (6,)), ((2, 3, 4, 5), (1, 2, 3), (5,)), ((2, 3, 4, 5), (2, 3), (4, 5))],
)
def test_layer_norm_values(shape, axis, param_shape, transform):
    x = data(shape)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2, param_shape).astype(np.float32)
    bias = rng.standard_normal(param_shape).astype(np.float32)
    y = transform(lambda x, s, b: jn.layer_norm(x, s, b, axis=axis))(x, scale, bias)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % len(shape) for a in axes)
    chex.assert_shape(y, shape)
    np.testing.assert_allclose(y, ref.layer_norm(x, axes, scale, bias), atol=2e-5, rtol=1e-5)


def test_layer_norm_mask_over_features():
    x = data((3, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0]] * 3, bool)
    x_bad = np.where(mask, x, np.nan).astype(np.float32)
    y = jn.layer_norm(x_bad, axis=-1, mask=mask)
    np.testing.assert_allclose(np.asarray(y)[mask], ref.layer_norm(x, (1,), mask=mask)[mask], atol=2e-5)
    g = jax.grad(lambda x: jnp.sum(jnp.where(mask, jn.layer_norm(x, mask=mask), 0) ** 3))(x_bad)
    assert np.all(np.isfinite(g))


def test_rms_norm_values(transform):
    x = data((3, 4, 8))
    scale = np.linspace(0.5, 2, 8, dtype=np.float32)
    y = transform(lambda x, s: jn.rms_norm(x, s))(x, scale)
    np.testing.assert_allclose(y, ref.rms_norm(x, (2,), scale), atol=2e-5, rtol=1e-5)


def test_rms_norm_mask():
    x = data((2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    y = jn.rms_norm(np.where(mask, x, np.inf).astype(np.float32), mask=mask)
    for i in range(2):
        v = ref.f64(x[i][mask[i]])
        np.testing.assert_allclose(np.asarray(y[i])[mask[i]], v / np.sqrt((v**2).mean() + 1e-6), atol=2e-5)


def test_layer_norm_gradients_match_float64_autodiff(x64):
    x = jnp.asarray(data((3, 7)), jnp.float64)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7)))

    def plain(x):
        m = x.mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-6)

    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda x: jnp.sum(jn.layer_norm(x) * dy)))(x),
        jax.jit(jax.grad(lambda x: jnp.sum(plain(x) * dy)))(x),
        rtol=1e-10,
        atol=1e-12,
    )
    jax.test_util.check_grads(jax.jit(jn.rms_norm), (x,), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("fn", [jn.layer_norm, jn.rms_norm])
def test_half_precision_and_large_offset(fn):
    x = data((4, 64), loc=0.0)
    y = fn(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    x_off = (1e4 + 1e-2 * np.random.default_rng(5).standard_normal((4, 256))).astype(np.float32)
    if fn is jn.layer_norm:
        np.testing.assert_allclose(fn(x_off), ref.layer_norm(x_off, (1,)), atol=1e-3)
    else:
        np.testing.assert_allclose(fn(x_off), ref.rms_norm(x_off, (1,)), rtol=1e-5)


def test_vmap_over_examples_equals_batched():
    x = data((5, 3, 4))
    np.testing.assert_allclose(jax.vmap(jn.layer_norm)(x), jn.layer_norm(x), atol=1e-6)
