"""The fused backward (gradients for x, scale and bias) against float64 autodiff of plain formulas.

The references below are written from the papers' formulas in plain
``jax.numpy`` (no jaxnorm code) and differentiated by JAX's autodiff in
float64; jaxnorm's custom VJP must agree to float64 rounding, with and without
masks, and pass ``jax.test_util.check_grads`` to second order (reverse mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm as jn


def _plain(x, axes, scale, bias, eps, mask=None, center=True):
    """Masked mean/variance over ``axes``, then the affine map (textbook formulas)."""
    w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    xz = jnp.where(w > 0, x, 0.0)
    n = jnp.sum(w, axes, keepdims=True)
    if center:
        mean = jnp.sum(xz, axes, keepdims=True) / n
        var = jnp.sum(w * (xz - mean) ** 2, axes, keepdims=True) / n
        y = (x - mean) / jnp.sqrt(var + eps)
    else:
        y = x / jnp.sqrt(jnp.sum(xz * xz, axes, keepdims=True) / n + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def _gn_plain(x, scale, bias, groups, eps, channel_axis=-1):
    xc = jnp.moveaxis(x, channel_axis, -1)
    n, c = xc.shape[0], xc.shape[-1]
    xg = xc.reshape(n, -1, groups, c // groups)
    y = _plain(xg, (1, 3), None, None, eps).reshape(xc.shape) * scale + bias
    return jnp.moveaxis(y, -1, channel_axis)


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 1.5 + 0.7)


CASES = {
    # name: (shape, ours(x, scale, bias), plain(x, scale, bias), parameter shape)
    "layer_norm": (
        (4, 6),
        lambda x, s, b: jn.layer_norm(x, s, b, epsilon=1e-5),
        lambda x, s, b: _plain(x, (1,), s, b, 1e-5),
        (6,),
    ),
    "layer_norm_torch_params": (
        (3, 4, 5),
        lambda x, s, b: jn.layer_norm(x, s, b, axis=(1, 2), epsilon=1e-5),
        lambda x, s, b: _plain(x, (1, 2), s, b, 1e-5),
        (4, 5),
    ),
    "rms_norm": (
        (4, 6),
        lambda x, s, b: jn.rms_norm(x, s, epsilon=1e-5) + b,
        lambda x, s, b: _plain(x, (1,), s, None, 1e-5, center=False) + b,
        (6,),
    ),
    "batch_norm_nhwc": (
        (4, 3, 2, 5),
        lambda x, s, b: jn.batch_norm(x, jn.init_batch_stats(5, dtype=x.dtype), s, b, training=True)[0],
        lambda x, s, b: _plain(x, (0, 1, 2), s, b, 1e-5),
        (5,),
    ),
    "batch_norm_nchw": (
        (4, 5, 2, 3),
        lambda x, s, b: jn.batch_norm(x, jn.init_batch_stats(5, dtype=x.dtype), s, b, training=True, axis=1)[0],
        lambda x, s, b: _plain(x, (0, 2, 3), s.reshape(5, 1, 1), b.reshape(5, 1, 1), 1e-5),
        (5,),
    ),
    "group_norm": (
        (2, 3, 3, 8),
        lambda x, s, b: jn.group_norm(x, s, b, num_groups=2, epsilon=1e-5),
        lambda x, s, b: _gn_plain(x, s, b, 2, 1e-5),
        (8,),
    ),
    "group_norm_nchw": (
        (2, 8, 3, 2),
        lambda x, s, b: jn.group_norm(x, s, b, num_groups=4, channel_axis=1, epsilon=1e-5),
        lambda x, s, b: _gn_plain(x, s, b, 4, 1e-5, channel_axis=1),
        (8,),
    ),
    "instance_norm": (
        (2, 3, 3, 4),
        lambda x, s, b: jn.instance_norm(x, s, b, epsilon=1e-5),
        lambda x, s, b: _gn_plain(x, s, b, 4, 1e-5),
        (4,),
    ),
    # Rows of H * W values: the backward that recomputes its statistics (standardize.row_backward).
    "instance_norm_nchw": (
        (2, 4, 3, 3),
        lambda x, s, b: jn.instance_norm(x, s, b, channel_axis=1, epsilon=1e-5),
        lambda x, s, b: _gn_plain(x, s, b, 4, 1e-5, channel_axis=1),
        (4,),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_for_x_scale_and_bias_match_float64_autodiff(name, x64):
    shape, ours, plain, pshape = CASES[name]
    x = _data(shape, 0)
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, pshape))
    bias = jnp.asarray(np.random.default_rng(2).standard_normal(pshape))
    w = jnp.asarray(np.random.default_rng(3).standard_normal(shape))

    def grads(f):
        # sin makes the cotangent depend on y, so second order is not trivial.
        return jax.jit(jax.grad(lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)) * w), argnums=(0, 1, 2)))(x, scale, bias)

    for got, want in zip(grads(ours), grads(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    if name in SECOND_ORDER:
        check_grads(jax.jit(ours), (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


# One case per backward path (partial sums shared over all reduced axes, over
# some of them, or none; centred and uncentred) keeps the suite quick.
SECOND_ORDER = {"layer_norm", "rms_norm", "batch_norm_nchw", "group_norm"}


@pytest.mark.parametrize("name", ["layer_norm", "batch_norm_nhwc", "group_norm"])
def test_masked_gradients_with_parameters(name, x64):
    shape, _, _, pshape = CASES[name]
    x = _data(shape, 4)
    scale = jnp.asarray(np.random.default_rng(5).uniform(0.5, 2.0, pshape))
    bias = jnp.asarray(np.random.default_rng(6).standard_normal(pshape))
    rng = np.random.default_rng(7)
    if name == "layer_norm":
        mask = jnp.asarray(rng.random(shape) > 0.3).at[:, 0].set(True)
        ours = lambda x, s, b: jn.layer_norm(x, s, b, mask=mask, epsilon=1e-5)  # noqa: E731
        plain = lambda x, s, b: _plain(x, (1,), s, b, 1e-5, mask)  # noqa: E731
    elif name == "batch_norm_nhwc":
        mask = jnp.asarray(rng.random(shape[:1] + (1, 1, 1)) > 0.4).at[0].set(True)
        ours = lambda x, s, b: jn.batch_norm(  # noqa: E731
            x, jn.init_batch_stats(pshape[0], dtype=x.dtype), s, b, training=True, mask=mask
        )[0]
        plain = lambda x, s, b: _plain(x, (0, 1, 2), s, b, 1e-5, mask)  # noqa: E731
    else:
        mask = jnp.asarray(rng.random(shape[:3] + (1,)) > 0.3).at[:, 0, 0].set(True)
        ours = lambda x, s, b: jn.group_norm(x, s, b, num_groups=2, mask=mask, epsilon=1e-5)  # noqa: E731

        def plain(x, s, b):
            xg = x.reshape(shape[0], -1, 2, shape[-1] // 2)
            mg = jnp.broadcast_to(mask, shape).reshape(xg.shape)
            return _plain(xg, (1, 3), None, None, 1e-5, mg).reshape(shape) * s + b

    w = jnp.asarray(rng.standard_normal(shape))
    for keep in (mask, True):  # loss ignoring masked outputs, and one reading them

        def grads(f, keep=keep):
            return jax.jit(
                jax.grad(lambda x, s, b: jnp.sum(jnp.where(keep, f(x, s, b), 0) ** 3 * w), argnums=(0, 1, 2))
            )(x, scale, bias)

        for got, want in zip(grads(ours), grads(plain)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    if name == "batch_norm_nhwc":
        check_grads(jax.jit(ours), (x, scale, bias), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)
    # NaN at masked positions stays out when the loss ignores them.
    x_bad = jnp.where(jnp.broadcast_to(mask, shape), x, jnp.nan)
    g = jax.jit(jax.grad(lambda x, s, b: jnp.sum(jnp.where(mask, ours(x, s, b), 0) * w), argnums=(0, 1, 2)))(
        x_bad, scale, bias
    )
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in g)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_half_precision_gradients_accumulate_in_float32(dtype):
    x32 = _data((64, 16), 8).astype(jnp.float32) + 30.0
    scale = jnp.linspace(0.5, 2.0, 16, dtype=jnp.float32)
    bias = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32)
    w = _data((64, 16), 9).astype(jnp.float32)
    x = x32.astype(dtype)

    def grads(f, x):
        return jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b).astype(jnp.float32) * w), argnums=(0, 1, 2)))(
            x, scale, bias
        )

    got = grads(lambda x, s, b: jn.layer_norm(x, s, b), x)
    want = grads(lambda x, s, b: jn.layer_norm(x, s, b), x.astype(jnp.float32))
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    # Parameter gradients see only the rounding of x and of the cotangent of
    # y to bf16 (relative 4e-3 each), not a bf16 accumulation over 64 values.
    np.testing.assert_allclose(got[1], want[1], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("axes, center", [((2,), True), ((2,), False), ((1, 2), True), ((0,), True), ((0, 2), True)])
def test_cotangents_of_the_returned_statistics(axes, center, x64):
    """A loss reading y, the mean and the variance: rows (recomputed statistics) and the saved path."""
    from jaxnorm._src.standardize import standardize

    x = _data((5, 6, 3), 8)
    scale = jnp.asarray(np.random.default_rng(9).uniform(0.5, 2.0, (1, 6, 1)))
    w = jnp.asarray(np.random.default_rng(10).standard_normal((5, 6, 3)))

    def ours(x, s):
        y, m = standardize(x, axes, epsilon=1e-5, center=center, scale=s)
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(m.mean**2) + jnp.sum(jnp.sqrt(m.var + 1.0))

    def plain(x, s):
        n = np.prod([x.shape[a] for a in axes])
        if center:
            mean = jnp.sum(x, axes, keepdims=True) / n
            var = jnp.sum((x - mean) ** 2, axes, keepdims=True) / n
        else:
            mean = jnp.zeros((1,) * x.ndim)
            var = jnp.sum(x * x, axes, keepdims=True) / n
        y = (x - mean) / jnp.sqrt(var + 1e-5) * s
        return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var + 1.0))

    for got, want in zip(jax.grad(ours, (0, 1))(x, scale), jax.grad(plain, (0, 1))(x, scale)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
