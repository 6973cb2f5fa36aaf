"""group_norm and instance_norm against float64 NumPy references."""

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
    "shape,kwargs,groups",
    [
        ((2, 4, 4, 32), dict(num_groups=8), 8),
        ((2, 4, 4, 32), dict(group_size=16), 2),
        ((2, 32, 4, 4), dict(num_groups=4, channel_axis=1), 4),
        ((3, 6, 12), dict(num_groups=3), 3),
        ((3, 6, 12), dict(num_groups=3, reduction_axes=(-1,)), 3),
        ((2, 5, 4, 6), dict(num_groups=2, reduction_axes=(2, 3)), 2),
    ],
)
def test_group_norm_values(shape, kwargs, groups, transform):
    x = data(shape)
    c = shape[kwargs.get("channel_axis", -1)]
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    y = transform(lambda x, s, b: jn.group_norm(x, s, b, **kwargs))(x, scale, bias)
    channel_axis = kwargs.get("channel_axis", -1)
    expected = ref.group_norm(x, groups, channel_axis, kwargs.get("reduction_axes"))
    bshape = [1] * len(shape)
    bshape[channel_axis] = c
    expected = expected * scale.reshape(bshape) + bias.reshape(bshape)
    chex.assert_shape(y, shape)
    np.testing.assert_allclose(y, expected, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,channel_axis", [((2, 5, 5, 3), -1), ((2, 3, 5, 5), 1), ((2, 7, 4), -1)])
def test_instance_norm_values(shape, channel_axis):
    x = data(shape)
    y = jn.instance_norm(x, channel_axis=channel_axis)
    c = channel_axis % len(shape)
    spatial = tuple(a for a in range(1, len(shape)) if a != c)
    m = ref.f64(x).mean(spatial, keepdims=True)
    v = ref.f64(x).var(spatial, keepdims=True)
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-6), atol=2e-5)


def test_group_norm_mask_on_padded_time_steps():
    x = data((2, 6, 4))
    mask = (np.arange(6)[None, :] < np.array([6, 3])[:, None])[..., None]
    x_bad = np.where(mask, x, np.nan).astype(np.float32)
    y = jn.group_norm(x_bad, num_groups=2, mask=mask)
    for i, n in enumerate([6, 3]):
        ex = ref.group_norm(x[i : i + 1, :n], 2)
        np.testing.assert_allclose(y[i, :n], ex[0], atol=2e-5)
    g = jax.grad(lambda x: jnp.sum(jnp.where(mask, jn.group_norm(x, num_groups=2, mask=mask), 0) ** 3))(x_bad)
    assert np.all(np.isfinite(g))


def test_gradients_match_float64_autodiff(x64):
    x = jnp.asarray(data((2, 3, 8)), jnp.float64)

    def plain(x):
        xg = x.reshape(2, 3, 2, 4)
        m = xg.mean((1, 3), keepdims=True)
        v = ((xg - m) ** 2).mean((1, 3), keepdims=True)
        return ((xg - m) / jnp.sqrt(v + 1e-6)).reshape(x.shape)

    w = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape))
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(jn.group_norm(x, num_groups=2)) * w)))(x),
        jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(plain(x)) * w)))(x),
        rtol=1e-9, atol=1e-11,
    )
    jax.test_util.check_grads(jax.jit(jn.instance_norm), (x,), order=2, modes=["fwd", "rev"])


def test_half_precision_and_large_offset():
    x = jnp.asarray(data((2, 4, 8)), jnp.bfloat16)
    assert jn.group_norm(x, num_groups=2).dtype == jnp.bfloat16
    x_off = (1e4 + 1e-2 * np.random.default_rng(5).standard_normal((2, 64, 8))).astype(np.float32)
    np.testing.assert_allclose(jn.group_norm(x_off, num_groups=4), ref.group_norm(x_off, 4), atol=1e-3)
    np.testing.assert_allclose(jn.instance_norm(x_off), ref.group_norm(x_off, 8), atol=1e-3)
