"""batch_norm and its state against a float64 NumPy reference of Ioffe & Szegedy 2015."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.test_util import check_grads

import jaxnorm as jn

LAYOUTS = [
    # (shape, axis, feature axes)
    ((16, 5), -1, (1,)),  # BatchNorm1d on (N, C), channels-last
    ((6, 3, 7), 1, (1,)),  # BatchNorm1d on (N, C, L)
    ((4, 5, 5, 3), -1, (3,)),  # NHWC
    ((4, 3, 5, 5), 1, (1,)),  # NCHW, BatchNorm2d
    ((2, 3, 2, 3, 4), 1, (1,)),  # NCDHW, BatchNorm3d
    ((4, 3, 5, 6), (2, 3), (2, 3)),  # several kept axes
]


def data(shape, seed=0, loc=1.5, spread=3.0):
    rng = np.random.default_rng(seed)
    return (loc + spread * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape,axis,feature_axes", LAYOUTS)
def test_training_matches_algorithm_1(shape, axis, feature_axes, transform):
    x = data(shape)
    fshape = tuple(shape[a] for a in feature_axes)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
    bias = rng.standard_normal(fshape).astype(np.float32)
    stats = jn.init_batch_stats(fshape)
    f = transform(lambda x, s, g, b: jn.batch_norm(x, s, g, b, training=True, axis=axis, momentum=0.9))
    y, new = f(x, stats, scale, bias)
    y_ref, mean, var, _ = ref.bn_train(x, feature_axes, scale, bias)
    chex.assert_shape(y, shape)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(new.mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 + 0.1 * var, rtol=1e-5)
    assert int(new.count) == 1 and new.mean.dtype == jnp.float32 and new.count.dtype == jnp.int32


@pytest.mark.parametrize("shape,axis,feature_axes", LAYOUTS[:4])
def test_eval_matches_algorithm_2(shape, axis, feature_axes, transform):
    x = data(shape)
    fshape = tuple(shape[a] for a in feature_axes)
    rng = np.random.default_rng(2)
    stats = jn.BatchStats(
        jnp.asarray(rng.standard_normal(fshape), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 4.0, fshape), jnp.float32),
        jnp.asarray(7, jnp.int32),
    )
    scale = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
    f = transform(lambda x, s, g: jn.batch_norm(x, s, g, training=False, axis=axis))
    y, same = f(x, stats, scale)
    np.testing.assert_allclose(y, ref.bn_eval(x, stats.mean, stats.var, feature_axes, scale), atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_equal(same, stats)


def test_eval_returns_the_same_state_object():
    stats = jn.init_batch_stats(3)
    _, out = jn.batch_norm(jnp.ones((4, 3)), stats, training=False)
    assert out is stats


def test_eval_before_training_is_x_over_sqrt_one_plus_eps():
    x = data((5, 4))
    y, _ = jn.batch_norm(x, jn.init_batch_stats(4), training=False, epsilon=1e-3)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_ema_is_flax_direction_over_steps():
    stats = jn.init_batch_stats(3)
    mean_ref, var_ref = np.zeros(3), np.ones(3)
    for k in range(4):
        x = data((10, 3), seed=k)
        _, bm, bv, _ = ref.bn_train(x, (1,))
        mean_ref = 0.8 * mean_ref + 0.2 * bm
        var_ref = 0.8 * var_ref + 0.2 * bv
        _, stats = jn.batch_norm(x, stats, training=True, momentum=0.8)
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-5)
    assert int(stats.count) == 4


def test_cumulative_average_is_the_plain_mean_of_batches():
    stats = jn.init_batch_stats(3)
    means, vars_ = [], []
    step = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, average="cumulative"))
    for k in range(5):
        x = data((8, 3), seed=10 + k, loc=k)
        _, bm, bv, _ = ref.bn_train(x, (1,))
        means.append(bm)
        vars_.append(bv)
        _, stats = step(x, stats)
    np.testing.assert_allclose(stats.mean, np.mean(means, 0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, np.mean(vars_, 0), rtol=1e-5)
    assert int(stats.count) == 5


def test_unbiased_update_uses_m_over_m_minus_1():
    x = data((4, 6, 6, 2))
    _, new = jn.batch_norm(x, jn.init_batch_stats(2), training=True, momentum=0.0, unbiased=True)
    m = 4 * 6 * 6
    np.testing.assert_allclose(new.var, ref.f64(x).reshape(-1, 2).var(0) * m / (m - 1), rtol=1e-5)
    # normalization itself still uses the biased variance
    y, _ = jn.batch_norm(x, jn.init_batch_stats(2), training=True, unbiased=True)
    np.testing.assert_allclose(y, ref.bn_train(x, (3,))[0], atol=2e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_leaves_every_feature_and_count_unchanged(bad):
    stats = jn.BatchStats(jnp.arange(3.0), jnp.arange(1.0, 4.0), jnp.asarray(5, jnp.int32))
    x = data((6, 3))
    x[2, 1] = bad  # only one feature is non-finite
    for average in ("ema", "cumulative"):
        _, new = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, average=average))(x, stats)  # noqa: B023
        chex.assert_trees_all_equal(new, stats)


def test_feature_without_valid_values_leaves_the_state_unchanged():
    stats = jn.BatchStats(jnp.arange(3.0), jnp.arange(1.0, 4.0), jnp.asarray(5, jnp.int32))
    x = data((6, 3))
    mask = np.ones((6, 3), bool)
    mask[:, 2] = False  # feature 2 has no valid value in this batch
    _, new = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, mask=mask))(x, stats)
    chex.assert_trees_all_equal(new, stats)
    mask[0, 2] = True  # one valid value is a batch of one: still no variance estimate
    _, new = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, mask=mask))(x, stats)
    chex.assert_trees_all_equal(new, stats)
    mask[1, 2] = True  # two are enough to update
    _, new = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, mask=mask))(x, stats)
    assert int(new.count) == 6


def test_count_saturates_instead_of_wrapping():
    top = jnp.iinfo(jnp.int32).max
    stats = jn.BatchStats(jnp.zeros(2), jnp.ones(2), jnp.asarray(top, jnp.int32))
    _, new = jn.batch_norm(data((4, 2)), stats, training=True)
    assert int(new.count) == top
    assert new.count.dtype == jnp.int32


def test_mask_excludes_values_even_when_nan():
    x = data((10, 4))
    mask = np.ones((10, 1), bool)
    mask[[1, 7]] = False
    x_bad = x.copy()
    x_bad[[1, 7]] = np.nan
    y, new = jn.batch_norm(x_bad, jn.init_batch_stats(4), training=True, momentum=0.0, mask=mask)
    y_ref, mean, var, _ = ref.bn_train(x, (1,), mask=mask)
    np.testing.assert_allclose(np.asarray(y)[mask[:, 0]], y_ref[mask[:, 0]], atol=2e-5)
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)

    def loss(x):
        y, _ = jn.batch_norm(x, jn.init_batch_stats(4), training=True, mask=mask)
        return jnp.sum(jnp.where(mask, y, 0.0) ** 3)

    g = jax.grad(loss)(x_bad)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(np.asarray(g)[~mask[:, 0]], 0.0)
    np.testing.assert_allclose(g, jax.grad(loss)(x), atol=1e-5)


def test_padded_sequences_mask_per_time_step():
    x = data((3, 5, 2))
    lengths = np.array([5, 2, 4])
    mask = (np.arange(5)[None, :] < lengths[:, None])[..., None]
    _, new = jn.batch_norm(x, jn.init_batch_stats(2), training=True, momentum=0.0, mask=mask)
    valid = ref.f64(x)[np.broadcast_to(mask, x.shape)].reshape(-1, 2)
    np.testing.assert_allclose(new.mean, valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new.var, valid.var(0), rtol=1e-5)


def test_gradients_match_the_papers_analytic_backward():
    x = data((12, 4))
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 2, 4).astype(np.float32)
    beta = rng.standard_normal(4).astype(np.float32)
    dy = rng.standard_normal((12, 4)).astype(np.float32)

    def loss(x, g, b):
        return jnp.sum(jn.batch_norm(x, jn.init_batch_stats(4), g, b, training=True)[0] * dy)

    dx, dg, db = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)
    dx_ref, dg_ref, db_ref = ref.bn_backward(x, dy, gamma)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(dg, dg_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(db, db_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((3, 2, 4), 1)])
def test_check_grads_first_and_second_order(shape, axis, x64):
    x = jnp.asarray(data(shape), jnp.float64)
    fshape = (shape[-1],) if axis == -1 else (shape[1],)
    scale = jnp.linspace(0.5, 1.5, fshape[0], dtype=jnp.float64)
    stats = jn.init_batch_stats(fshape, dtype=jnp.float64)

    def f(x, scale):
        return jnp.tanh(jn.batch_norm(x, stats, scale, training=True, axis=axis)[0])

    check_grads(jax.jit(f), (x, scale), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_vmap_over_an_ensemble_of_states():
    xs = np.stack([data((8, 3), seed=s, loc=s) for s in range(4)])
    stats = jax.vmap(lambda _: jn.init_batch_stats(3))(jnp.arange(4))
    ys, new = jax.vmap(lambda x, s: jn.batch_norm(x, s, training=True, momentum=0.0))(xs, stats)
    for k in range(4):
        y_ref, mean, var, _ = ref.bn_train(xs[k], (1,))
        np.testing.assert_allclose(ys[k], y_ref, atol=2e-5)
        np.testing.assert_allclose(new.mean[k], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.var[k], var, rtol=1e-5)
    chex.assert_shape(new.count, (4,))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_in_half_out_float32_state(dtype):
    x = data((32, 4), loc=50.0, spread=2.0)
    xh = jnp.asarray(x, dtype)
    y, new = jn.batch_norm(xh, jn.init_batch_stats(4), training=True, momentum=0.0)
    assert y.dtype == dtype and new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    x_rounded = np.asarray(xh.astype(jnp.float32))
    y_ref, mean, var, _ = ref.bn_train(x_rounded, (1,))
    np.testing.assert_allclose(new.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=2e-2)
    y_eval, _ = jn.batch_norm(xh, new, training=False)
    assert y_eval.dtype == dtype


def test_large_offset_float32():
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((256, 3))).astype(np.float32)
    y, new = jn.batch_norm(x, jn.init_batch_stats(3), training=True, momentum=0.0)
    y_ref, _, var, _ = ref.bn_train(x, (1,))
    np.testing.assert_allclose(new.var, var, rtol=1e-2)
    np.testing.assert_allclose(y, y_ref, atol=1e-3)


def test_jitted_training_loop_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(stats, x):
        y, stats = jn.batch_norm(x, stats, training=True)
        return stats, jnp.mean(y)

    stats = jn.init_batch_stats(3)
    for k in range(4):
        stats, _ = step(stats, data((8, 3), seed=k))
    stats, _ = jax.lax.scan(step, stats, jnp.stack([data((8, 3), seed=k) for k in range(3)]))
    assert int(stats.count) == 7


def test_one_value_per_feature_is_an_error_in_training_only():
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match=r"batch_norm: training needs more than one value per feature.*\(1, 3\)"):
        jn.batch_norm(x, jn.init_batch_stats(3), training=True)
    y, _ = jn.batch_norm(x, jn.init_batch_stats(3), training=False)
    chex.assert_shape(y, (1, 3))
    # one example but spatial positions: fine (BatchNorm2d with N=1)
    jn.batch_norm(jnp.ones((1, 4, 4, 3)), jn.init_batch_stats(3), training=True)
