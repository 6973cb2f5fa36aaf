"""batch_renorm and renorm_schedule against a float64 NumPy reference of Ioffe 2017, Algorithm 1."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


def data(shape, seed=0, loc=1.5, spread=3.0):
    rng = np.random.default_rng(seed)
    return (loc + spread * rng.standard_normal(shape)).astype(np.float32)


def running(fshape):
    """Running statistics around data()'s (mean 1.5, var 9) and far from them, so
    that with r_max=2, d_max=1 some features clip r or d and others do not."""
    n = int(np.prod(fshape))
    return jn.BatchStats(
        jnp.asarray(np.resize([1.5, 6.0, -4.0, 2.0], n).reshape(fshape), jnp.float32),
        jnp.asarray(np.resize([0.3, 9.0, 40.0, 5.0], n).reshape(fshape), jnp.float32),
        jnp.asarray(5, jnp.int32),
    )


@pytest.mark.parametrize(
    "shape,axis,feature_axes,transform",
    [((16, 6), -1, (1,), lambda f: f), ((4, 3, 5, 5), 1, (1,), jax.jit)],
    ids=["NC-eager", "NCHW-jit"],
)
def test_training_matches_algorithm_1(shape, axis, feature_axes, transform):
    x = data(shape)
    fshape = tuple(shape[a] for a in feature_axes)
    stats = running(fshape)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
    bias = rng.standard_normal(fshape).astype(np.float32)
    f = transform(
        lambda x, s: jn.batch_renorm(x, s, scale, bias, training=True, r_max=2.0, d_max=1.0, axis=axis, momentum=0.9)
    )
    y, new = f(x, stats)
    y_ref, r, d, mean, var = ref.batch_renorm(x, stats.mean, stats.var, 2.0, 1.0, feature_axes, scale, bias)
    # The running statistics are far from the batch's: both clips must be active somewhere.
    assert np.any(np.isclose(r, 2.0)) or np.any(np.isclose(r, 0.5))
    assert np.any(np.isclose(np.abs(d), 1.0)) and np.any(np.abs(d) < 1.0)
    np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)
    # Running statistics update as batch norm's do (EMA of the batch's mean and biased var).
    np.testing.assert_allclose(new.mean, 0.9 * ref.f64(stats.mean) + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, 0.9 * ref.f64(stats.var) + 0.1 * var, rtol=1e-5)
    assert int(new.count) == 6


def test_limits_one_and_zero_equal_batch_norm():
    """r_max=1, d_max=0 is batch norm: outputs, gradients and statistics (Algorithm 1 of 2015)."""
    x = data((12, 4))
    stats = running((4,))
    scale, bias = jnp.asarray([0.5, 1.0, 2.0, 3.0]), jnp.asarray([0.1, -0.2, 0.3, 0.0])
    w = jnp.asarray(data((12, 4), seed=5))

    def loss(fn, **kw):
        def f(x, g, b):
            y, new = fn(x, stats, g, b, training=True, unbiased=True, **kw)
            return jnp.sum(w * y), (y, new)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)

    grads, (y, new) = loss(jn.batch_renorm, r_max=1.0, d_max=0.0)
    grads_bn, (y_bn, new_bn) = loss(jn.batch_norm)
    y_ref, mean, var, n = ref.bn_train(x, (1,), scale, bias)
    dx_ref, dg_ref, db_ref = ref.bn_backward(x, w, scale)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(grads[0], dx_ref, atol=2e-5)
    np.testing.assert_allclose(grads[1], dg_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[2], db_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.var, 0.99 * ref.f64(stats.var) + 0.01 * var * n / (n - 1), rtol=1e-5)
    chex.assert_trees_all_close((y, grads, new), (y_bn, grads_bn, new_bn), atol=1e-6, rtol=1e-6)


def test_unclipped_training_output_is_the_inference_output():
    """Without clipping, (x - mu_B)/sigma_B * r + d == (x - mu)/sigma: Algorithm 2 of 2015."""
    x = data((10, 2, 3))
    stats = running((3,))
    scale = jnp.asarray([1.5, 0.5, 2.0])
    y, _ = jax.jit(lambda x: jn.batch_renorm(x, stats, scale, training=True, r_max=1e3, d_max=1e3))(x)
    np.testing.assert_allclose(y, ref.bn_eval(x, stats.mean, stats.var, (2,), scale), atol=3e-5, rtol=1e-5)


def test_gradient_is_r_times_batch_norms():
    x = data((16, 5))
    stats = running((5,))
    scale = jnp.asarray(np.random.default_rng(2).uniform(0.5, 2.0, 5), jnp.float32)
    w = jnp.asarray(data((16, 5), seed=8))
    r_max, d_max = 2.5, 1.5
    grad = jax.jit(
        jax.grad(lambda x: jnp.sum(w * jn.batch_renorm(x, stats, scale, training=True, r_max=r_max, d_max=d_max)[0]))
    )(x)
    _, r, d, _, _ = ref.batch_renorm(x, stats.mean, stats.var, r_max, d_max, (1,))
    assert len(np.unique(np.round(r, 4))) > 2, "r should differ across features"
    dx_bn, _, _ = ref.bn_backward(x, w, scale)
    np.testing.assert_allclose(grad, r * dx_bn, atol=3e-5, rtol=1e-4)
    # and w.r.t. scale: sum(dy * x_hat_renorm), with r and d held constant
    g_scale = jax.jit(
        jax.grad(lambda g: jnp.sum(w * jn.batch_renorm(x, stats, g, training=True, r_max=r_max, d_max=d_max)[0]))
    )(scale)
    y_unit, *_ = ref.batch_renorm(x, stats.mean, stats.var, r_max, d_max, (1,))
    np.testing.assert_allclose(g_scale, (ref.f64(w) * y_unit).sum(0), rtol=1e-4, atol=1e-4)


def test_evaluation_equals_batch_norms():
    x = data((6, 4, 4, 3))
    stats = running((3,))
    y, same = jn.batch_renorm(x, stats, jnp.full(3, 2.0), training=False, r_max=3.0, d_max=5.0)
    np.testing.assert_allclose(y, ref.bn_eval(x, stats.mean, stats.var, (3,), np.full(3, 2.0)), atol=3e-5, rtol=1e-5)
    assert same is stats


def test_traced_limits_compile_once_across_the_schedule():
    x = jnp.asarray(data((8, 3)))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(stats, x, t):
        r_max, d_max = jn.renorm_schedule(t, warmup_steps=10, r_max_steps=40, d_max_steps=25)
        y, stats = jn.batch_renorm(x, stats, training=True, r_max=r_max, d_max=d_max, momentum=0.5)
        return stats, y

    stats = running((3,))
    for t in (0, 10, 20, 30, 50):
        before = stats
        stats, y = step(stats, x, jnp.asarray(t))
        r_max, d_max = (
            (1.0, 0.0)
            if t <= 10
            else [float(v) for v in jn.renorm_schedule(t, warmup_steps=10, r_max_steps=40, d_max_steps=25)]
        )
        np.testing.assert_allclose(
            y, ref.batch_renorm(x, before.mean, before.var, r_max, d_max, (1,))[0], atol=3e-5, rtol=1e-5
        )
    chex.clear_trace_counter()


def test_schedule_follows_the_paper():
    """Ioffe 2017: batch norm for 5k steps, then r_max reaches 3 at 40k and d_max 5 at 25k."""
    steps = np.array([0, 2_500, 5_000, 15_000, 25_000, 32_500, 40_000, 90_000])
    r, d = jax.vmap(jn.renorm_schedule)(jnp.asarray(steps))
    np.testing.assert_allclose(r, [1, 1, 1, 1 + 2 * 10 / 35, 1 + 2 * 20 / 35, 1 + 2 * 27.5 / 35, 3, 3], rtol=1e-6)
    np.testing.assert_allclose(d, [0, 0, 0, 2.5, 5, 5, 5, 5], rtol=1e-6, atol=1e-6)
    r, d = jn.renorm_schedule(7, warmup_steps=0, r_max_steps=10, d_max_steps=20, r_max=2.0, d_max=1.0)
    np.testing.assert_allclose([r, d], [1.7, 0.35], rtol=1e-6)


def test_ghost_batches_are_renormalized_one_by_one():
    x = data((12, 3))
    stats = running((3,))
    y, new = jax.jit(lambda x: jn.batch_renorm(x, stats, training=True, r_max=2.0, d_max=1.0, ghost_batch_size=4))(x)
    groups = [ref.batch_renorm(g, stats.mean, stats.var, 2.0, 1.0, (1,)) for g in np.split(x, 3)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]), atol=3e-5, rtol=1e-5)
    mean = np.mean([g[3] for g in groups], axis=0)
    np.testing.assert_allclose(new.mean, 0.99 * ref.f64(stats.mean) + 0.01 * mean, rtol=1e-5, atol=1e-6)


def test_masked_values_reach_nothing():
    x = data((8, 3))
    mask = np.array([True] * 6 + [False] * 2)[:, None]
    x_bad = x.copy()
    x_bad[6:] = np.nan
    stats = running((3,))
    f = jax.jit(lambda x: jn.batch_renorm(x, stats, training=True, r_max=2.0, d_max=1.0, mask=mask))
    y, new = f(x_bad)
    y_ref = ref.batch_renorm(x[:6], stats.mean, stats.var, 2.0, 1.0, (1,))[0]
    np.testing.assert_allclose(y[:6], y_ref, atol=3e-5, rtol=1e-5)
    assert np.all(np.isfinite(new.mean)) and np.all(np.isfinite(new.var))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x)[0][:6])))(x_bad)
    assert np.all(np.isfinite(grad[:6]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r_max=0.5), r"batch_renorm: `r_max` must be >= 1, got 0.5"),
        (dict(d_max=-1.0), r"batch_renorm: `d_max` must be >= 0, got -1.0"),
        (dict(training=None), r"batch_renorm: `training` must be a Python bool"),
        (dict(average="mean"), r"batch_renorm: `average`='mean' is not one of"),
        (dict(ghost_batch_size=3), r"batch_renorm: `ghost_batch_size`=3 must divide the batch of 4"),
    ],
)
def test_bad_input(kwargs, match):
    options = dict(training=True) | kwargs
    with pytest.raises(ValueError, match=match):
        jn.batch_renorm(jnp.ones((4, 3)), jn.init_batch_stats(3), **options)


def test_bad_input_shapes_and_batch_of_one():
    with pytest.raises(ValueError, match=r"batch_renorm: `stats.mean` has shape \(4,\)"):
        jn.batch_renorm(jnp.ones((4, 3)), jn.init_batch_stats(4), training=True)
    with pytest.raises(ValueError, match=r"batch_renorm: training needs more than one value per feature"):
        jn.batch_renorm(jnp.ones((1, 3)), jn.init_batch_stats(3), training=True)
    # in evaluation a single example is fine
    y, _ = jn.batch_renorm(jnp.ones((1, 3)), jn.init_batch_stats(3), training=False)
    chex.assert_shape(y, (1, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r_max_steps=5_000), r"renorm_schedule: `r_max_steps`=5000 must come after `warmup_steps`=5000"),
        (dict(d_max_steps=100), r"renorm_schedule: `d_max_steps`=100 must come after"),
        (dict(warmup_steps=-1), r"renorm_schedule: `warmup_steps` must be >= 0"),
        (dict(r_max=0.9), r"renorm_schedule: `r_max` must be >= 1"),
        (dict(d_max=-0.1), r"renorm_schedule: `d_max` must be >= 0"),
    ],
)
def test_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jn.renorm_schedule(0, **kwargs)
