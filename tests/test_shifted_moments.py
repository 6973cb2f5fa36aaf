"""The shifted variance stays accurate when the first value (the shift) is far from the mean."""

import jax
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


@pytest.mark.parametrize("first", [0.0, 1e4 + 5.0, -3e4])
def test_outlying_first_value_keeps_the_variance(first):
    # Column 0: mean 1e4, std 1e-2 after the first row; the first row is an
    # outlier as far from the rest as float32 allows it to matter.
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((4096, 3))).astype(np.float32)
    x[0, 0] = first
    mean, var = jax.jit(lambda x: jn.moments(x, 0))(x)
    np.testing.assert_allclose(var, ref.f64(x).var(0), rtol=1e-2)
    np.testing.assert_allclose(mean, ref.f64(x).mean(0), rtol=1e-6)


def test_layer_and_group_norm_with_large_offset_match_float64():
    rng = np.random.default_rng(1)
    x = (1e4 + 1e-2 * rng.standard_normal((2, 4, 4, 16))).astype(np.float32)
    y = jax.jit(lambda x: jn.group_norm(x, num_groups=4, epsilon=0.0))(x)
    np.testing.assert_allclose(y, ref.group_norm(x, 4, -1, None, eps=0.0), atol=5e-2)
    y = jax.jit(lambda x: jn.layer_norm(x, axis=(1, 2, 3), epsilon=0.0))(x)
    np.testing.assert_allclose(y, ref.layer_norm(x, (1, 2, 3), eps=0.0), atol=5e-2)
