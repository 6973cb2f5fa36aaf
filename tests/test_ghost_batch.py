"""Ghost batch norm (Hoffer et al. 2017) against per-group float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    # a different offset per example, so that the groups' statistics differ
    offsets = np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    return (offsets + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def ghost_reference(x, k, feature_axes, scale=None, bias=None, mask=None):
    """Algorithm 1 on each consecutive group of k examples, concatenated; the groups' statistics."""
    groups = x.shape[0] // k
    masks = (
        [None] * groups if mask is None else np.split(np.broadcast_to(mask, (x.shape[0],) + np.shape(mask)[1:]), groups)
    )
    out = [ref.bn_train(g, feature_axes, scale, bias, mask=m) for g, m in zip(np.split(x, groups), masks)]
    y = np.concatenate([o[0] for o in out])
    return y, np.stack([o[1] for o in out]), np.stack([o[2] for o in out]), np.stack([o[3] for o in out])


LAYOUTS = [
    # (shape, axis, feature axes, ghost batch size)
    ((12, 5), -1, (1,), 4),
    ((8, 3, 3, 2), -1, (3,), 2),  # NHWC
    ((6, 2, 5), 1, (1,), 3),  # (N, C, L), PyTorch layout
    ((4, 3, 2), (1, 2), (1, 2), 2),  # several feature axes
]


@pytest.mark.parametrize("shape,axis,feature_axes,k", LAYOUTS)
def test_ghost_batches_equal_per_group_batch_norm(shape, axis, feature_axes, k):
    x = data(shape)
    fshape = tuple(shape[a] for a in feature_axes)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
    bias = rng.standard_normal(fshape).astype(np.float32)
    stats = jn.init_batch_stats(fshape)
    f = jax.jit(
        lambda x, s: jn.batch_norm(x, s, scale, bias, training=True, axis=axis, momentum=0.8, ghost_batch_size=k)
    )
    y, new = f(x, stats)
    y_ref, means, variances, _ = ghost_reference(x, k, feature_axes, scale, bias)
    np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)
    # the plain batch's statistics would differ: the groups have different offsets
    assert not np.allclose(y, ref.bn_train(x, feature_axes, scale, bias)[0], atol=1e-2)
    np.testing.assert_allclose(new.mean, 0.2 * means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.8 + 0.2 * variances.mean(0), rtol=1e-5)
    assert int(new.count) == 1


def test_unbiased_and_cumulative_average_per_group():
    x = data((12, 3))
    stats = jn.BatchStats(jnp.ones(3), jnp.full(3, 2.0), jnp.asarray(3, jnp.int32))
    _, new = jax.jit(
        lambda x: jn.batch_norm(x, stats, training=True, average="cumulative", unbiased=True, ghost_batch_size=3)
    )(x)
    _, means, variances, n = ghost_reference(x, 3, (1,))
    np.testing.assert_allclose(new.mean, 1 + (means.mean(0) - 1) / 4, rtol=1e-5)
    np.testing.assert_allclose(new.var, 2 + ((variances * n / (n - 1)).mean(0) - 2) / 4, rtol=1e-5)
    assert int(new.count) == 4


def test_gradient_matches_per_group_backward():
    """Each ghost batch has its own analytic backward (Ioffe & Szegedy, section 3)."""
    x = data((8, 3))
    scale = jnp.asarray([0.5, 1.5, 2.0])
    w = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    loss = lambda x, g: jnp.sum(w * jn.batch_norm(x, jn.init_batch_stats(3), g, training=True, ghost_batch_size=4)[0])  # noqa: E731
    dx, dg = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
    parts = [ref.bn_backward(xg, wg, scale) for xg, wg in zip(np.split(x, 2), np.split(w, 2))]
    np.testing.assert_allclose(dx, np.concatenate([p[0] for p in parts]), atol=3e-5, rtol=1e-4)
    np.testing.assert_allclose(dg, sum(p[1] for p in parts), atol=3e-5, rtol=1e-4)


def test_masks_per_group_and_empty_group_left_out():
    x = data((9, 2, 3))
    mask = np.ones((9, 2, 1), bool)
    mask[1, 0] = mask[4] = False  # a value missing in group 0, one example in group 1
    mask[6:] = False  # group 2 holds no valid value at all
    x_bad = np.where(mask, x, np.nan).astype(np.float32)
    stats = jn.init_batch_stats(3)
    y, new = jax.jit(lambda x: jn.batch_norm(x, stats, training=True, momentum=0.5, ghost_batch_size=3, mask=mask))(
        x_bad
    )
    y_ref, means, variances, _ = ghost_reference(x[:6], 3, (2,), mask=mask[:6])
    valid = np.broadcast_to(mask[:6], y_ref.shape)
    np.testing.assert_allclose(np.asarray(y[:6])[valid], y_ref[valid], atol=3e-5, rtol=1e-5)
    # the empty group is left out: the mean over the two groups that have values
    np.testing.assert_allclose(new.mean, 0.5 * means.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.5 + 0.5 * variances.mean(0), rtol=1e-5)
    grad = jax.jit(
        jax.grad(lambda x: jnp.sum(jn.batch_norm(x, stats, training=True, ghost_batch_size=3, mask=mask)[0] * mask))
    )(x_bad)
    assert np.all(np.isfinite(np.asarray(grad)[np.broadcast_to(mask, x.shape)]))


def test_one_ghost_batch_is_batch_norm_and_eval_ignores_it():
    x = data((6, 4))
    stats = jn.init_batch_stats(4)
    y, new = jax.jit(lambda x: jn.batch_norm(x, stats, training=True, ghost_batch_size=6))(x)
    y_ref, mean, var, _ = ref.bn_train(x, (1,))
    np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, 0.01 * mean, rtol=1e-5, atol=1e-7)
    # evaluation uses the running statistics; the size need not divide the batch
    y_eval, same = jn.batch_norm(x[:5], new, training=False, ghost_batch_size=4)
    np.testing.assert_allclose(y_eval, ref.bn_eval(x[:5], new.mean, new.var, (1,)), atol=3e-5, rtol=1e-5)
    assert same is new


def test_ghost_batches_under_vmap():
    x = data((3, 8, 2))
    f = jax.vmap(lambda x: jn.batch_norm(x, jn.init_batch_stats(2), training=True, ghost_batch_size=4)[0])
    y_ref = np.stack([ghost_reference(xi, 4, (1,))[0] for xi in x])
    np.testing.assert_allclose(jax.jit(f)(x), y_ref, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        (
            (10, 3),
            dict(ghost_batch_size=4),
            r"batch_norm: `ghost_batch_size`=4 must divide the batch of 10 examples .* \(2, 5, 10\)",
        ),
        (
            (8, 3),
            dict(ghost_batch_size=0),
            r"batch_norm: `ghost_batch_size` must be a positive Python int or None, got 0",
        ),
        ((8, 3), dict(ghost_batch_size=True), r"`ghost_batch_size` must be a positive Python int or None, got True"),
        ((8, 3), dict(ghost_batch_size=2.0), r"`ghost_batch_size` must be a positive Python int or None, got 2.0"),
        (
            (8, 3),
            dict(ghost_batch_size=1),
            r"ghost batches of `ghost_batch_size`=1 example\(s\) .* give 1 value per feature",
        ),
        ((8, 3), dict(ghost_batch_size=2, axis=0), r"axis 0 is a feature axis here"),
        ((8, 3), dict(ghost_batch_size=2, axis_name="batch"), r"cannot be combined with `axis_name`='batch'"),
    ],
)
def test_bad_ghost_batch_size(shape, kwargs, match):
    x = jnp.ones(shape)
    axis = kwargs.get("axis", -1)
    stats = jn.init_batch_stats(shape[axis])
    with pytest.raises(ValueError, match=match):
        jn.batch_norm(x, stats, training=True, **kwargs)


def test_a_ghost_batch_of_one_is_fine_with_spatial_axes():
    """k=1 on (N, H, W, C) is instance-norm-like per example: H*W values per feature."""
    x = data((4, 3, 3, 2))
    y, _ = jax.jit(lambda x: jn.batch_norm(x, jn.init_batch_stats(2), training=True, ghost_batch_size=1))(x)
    np.testing.assert_allclose(y, ghost_reference(x, 1, (3,))[0], atol=3e-5, rtol=1e-5)
