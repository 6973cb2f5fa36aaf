"""Invariances the papers state, checked with hypothesis on random data."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnorm as jn

SETTINGS = settings(max_examples=20, deadline=None)


def arrays(seed, shape, loc=0.0):
    return (loc + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@SETTINGS
@given(seed=st.integers(0, 2**16), log_a=st.floats(-2, 2), b=st.floats(-5, 5))
def test_batch_norm_invariant_to_per_feature_positive_affine(seed, log_a, b):
    x = arrays(seed, (16, 3))
    a = np.exp(np.array([log_a, -log_a, 0.5 * log_a])).astype(np.float32)
    stats = jn.init_batch_stats(3)
    y1, _ = jn.batch_norm(x, stats, training=True, epsilon=0.0)
    y2, _ = jn.batch_norm(a * x + b, stats, training=True, epsilon=0.0)
    np.testing.assert_allclose(y1, y2, atol=5e-4)


@SETTINGS
@given(seed=st.integers(0, 2**16), log_a=st.floats(-2, 2))
def test_layer_norm_invariant_to_rescaling_one_example(seed, log_a):
    x = arrays(seed, (4, 16))
    x2 = x.copy()
    x2[1] *= np.float32(np.exp(log_a))
    np.testing.assert_allclose(jn.layer_norm(x, epsilon=0.0), jn.layer_norm(x2, epsilon=0.0), atol=5e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_group_norm_one_group_is_layer_norm_over_hwc(seed):
    x = arrays(seed, (2, 3, 3, 4), loc=1.0)
    np.testing.assert_allclose(jn.group_norm(x, num_groups=1), jn.layer_norm(x, axis=(1, 2, 3)), atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_group_norm_group_size_one_is_instance_norm(seed):
    x = arrays(seed, (2, 3, 3, 4), loc=-1.0)
    np.testing.assert_allclose(jn.group_norm(x, group_size=1), jn.instance_norm(x), atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**16), loc=st.floats(-100, 100))
def test_outputs_have_zero_mean_unit_variance_over_reduced_axes(seed, loc):
    x = arrays(seed, (8, 4, 6), loc=loc)
    y, _ = jn.batch_norm(x, jn.init_batch_stats(6), training=True, epsilon=0.0)
    np.testing.assert_allclose(jnp.mean(y, (0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(jnp.var(y, (0, 1)), 1, atol=1e-3)
    ln = jn.layer_norm(x, axis=-1, epsilon=0.0)
    np.testing.assert_allclose(jnp.mean(ln, -1), 0, atol=1e-4)
    np.testing.assert_allclose(jnp.var(ln, -1), 1, atol=1e-3)
    inn = jn.instance_norm(x, epsilon=0.0)
    np.testing.assert_allclose(jnp.mean(inn, 1), 0, atol=1e-4)
    np.testing.assert_allclose(jnp.var(inn, 1), 1, atol=1e-3)
    rms = jn.rms_norm(x, epsilon=0.0)
    np.testing.assert_allclose(jnp.mean(rms**2, -1), 1, atol=1e-3)
