"""moments: values, stability, masks and dtypes against a float64 NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


@pytest.mark.parametrize("shape,axes", [((7, 3), 0), ((4, 5, 6), (0, 2)), ((2, 3, 4, 5), (1, 2, 3)), ((6,), -1)])
def test_values_and_shapes(shape, axes, transform):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 2 + 1
    mean, var = transform(lambda x: jn.moments(x, axes))(x)
    axes_t = (axes,) if isinstance(axes, int) else axes
    m_ref, v_ref, _ = ref.masked_moments(x, axes_t)
    np.testing.assert_allclose(mean, np.squeeze(m_ref, axes_t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, np.squeeze(v_ref, axes_t), rtol=1e-5)
    mean_k, var_k = jn.moments(x, axes, keepdims=True)
    chex.assert_shape([mean_k, var_k], m_ref.shape)


def test_large_offset_float32_variance_within_one_percent():
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((4096, 4))).astype(np.float32)
    _, var = jax.jit(lambda x: jn.moments(x, 0))(x)
    var_ref = ref.f64(x).var(0)
    np.testing.assert_allclose(var, var_ref, rtol=1e-2)
    # The one-pass formula (flax's default) is wrong by orders of magnitude here.
    one_pass = jnp.mean(x * x, 0) - jnp.mean(x, 0) ** 2
    assert np.max(np.abs(np.asarray(one_pass) - var_ref) / var_ref) > 1.0


def test_mask_excludes_nan_from_values_and_gradients():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 3)).astype(np.float32)
    mask = rng.random((9, 3)) > 0.3
    x_bad = np.where(mask, x, np.nan).astype(np.float32)
    mean, var = jn.moments(x_bad, 0, mask=mask)
    m_ref, v_ref, _ = ref.masked_moments(x, (0,), mask)
    np.testing.assert_allclose(mean, m_ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, v_ref[0], rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jn.moments(x, 0, mask=mask)[1]))(x_bad)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(np.asarray(g)[~mask], 0.0)
    # d var / d x_i = 2 (x_i - mean) / n over valid values
    n = mask.sum(0)
    np.testing.assert_allclose(np.asarray(g)[mask], (2 * (x - m_ref[0]) / n)[mask], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_accumulates_in_float32(dtype):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2048, 2)) + 30.0, dtype)
    mean, var = jn.moments(x, 0)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(mean, x32.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, x32.var(0), rtol=1e-4)


def test_float64_stays_float64(x64):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 2)), jnp.float64)
    mean, var = jn.moments(x, 0)
    assert mean.dtype == jnp.float64
    np.testing.assert_allclose(var, np.asarray(x).var(0), rtol=1e-12)
