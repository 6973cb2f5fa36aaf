"""The fused backward with a mask is the exact derivative of the forward.

Outputs at masked positions are normalized with the statistics of the valid
values, so a loss that reads them sends gradient to the valid values through
those statistics; a loss that ignores them (zero cotangent) sends none, and NaN
held at masked positions stays out of the gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn


def _plain(x, mask, axes, eps):
    # Autodiff of the textbook masked formula, written without jaxnorm.
    w = mask.astype(x.dtype)
    n = jnp.sum(w * jnp.ones_like(x), axes, keepdims=True)
    mean = jnp.sum(w * x, axes, keepdims=True) / n
    var = jnp.sum(w * (x - mean) ** 2, axes, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + eps)


def test_masked_gradient_includes_masked_outputs(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4)) * 2 + 1
    mask = (np.arange(5)[None, :] < np.array([5, 2, 4])[:, None])[..., None]
    w = rng.standard_normal(x.shape)
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(w * f(x))))(x)  # noqa: E731
    ours = grad(
        lambda x: jn.batch_norm(x, jn.init_batch_stats(4, dtype=jnp.float64), training=True, mask=mask, epsilon=1e-5)[0]
    )
    np.testing.assert_allclose(ours, grad(lambda x: _plain(x, mask, (0, 1), 1e-5)), rtol=1e-9, atol=1e-9)
    ours_ln = grad(lambda x: jn.layer_norm(x, mask=mask, axis=(1, 2), epsilon=1e-5))
    np.testing.assert_allclose(ours_ln, grad(lambda x: _plain(x, mask, (1, 2), 1e-5)), rtol=1e-9, atol=1e-9)


def test_masked_nan_stays_out_when_the_loss_ignores_padding():
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    mask = np.ones((6, 1), bool)
    mask[[2, 4]] = False
    x_bad = x.copy()
    x_bad[[2, 4]] = np.nan

    def loss(x):
        y, _ = jn.batch_norm(x, jn.init_batch_stats(3), training=True, mask=mask)
        return jnp.sum(jnp.where(mask, y, 0.0) ** 3)

    grad = jax.jit(jax.grad(loss))
    g = grad(x_bad)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, grad(x), atol=1e-5)
