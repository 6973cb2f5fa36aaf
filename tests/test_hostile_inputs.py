"""Hostile inputs (issue 14): each a clear ValueError or a right result, no state lost."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
import jaxnorm.linen as jnl


def _x(shape=(8, 3), seed=0, scale=1.0, dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


def _copy(stats):
    return jax.tree.map(lambda a: np.array(a, copy=True), stats)


def _same(a, b):
    """Equal values and equal dtypes, leaf by leaf."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(u).dtype == np.asarray(v).dtype, (np.asarray(u).dtype, np.asarray(v).dtype)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# 1. flax's data-parallel recipe: pmean over the batch_stats tree.


def test_float_count_from_pmean_is_restored():
    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(4.0, jnp.float32))
    before = _copy(stats)
    _, new = jn.batch_norm(_x(), stats, training=True)
    assert new.count.dtype == jnp.int32 and int(new.count) == 5
    _same(stats, before)
    _, new = jax.jit(lambda s: jn.batch_norm(_x(), s, training=True))(stats)
    assert new.count.dtype == jnp.int32 and int(new.count) == 5


def test_float_count_not_integer_is_refused():
    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(2.5))
    with pytest.raises(ValueError, match=r"batch_norm: `stats.count`=.*2.5.*non-negative integer"):
        jn.batch_norm(_x(), stats, training=True)


def test_linen_pmap_pmean_batch_stats_loop():
    import optax

    n = jax.local_device_count()
    assert n == 8

    class Model(jnl.BatchNorm.__base__):  # nn.Module
        @__import__("flax.linen", fromlist=["compact"]).compact
        def __call__(self, x, train):
            import flax.linen as nn

            x = nn.Dense(4)(x)
            x = jnl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(1)(x)

    model = Model()
    x = _x((n, 4, 3), seed=1)
    y = _x((n, 4, 1), seed=2)
    variables = model.init(jax.random.key(0), x[0], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1)
    opt = tx.init(params)

    def step(params, batch_stats, opt, x, y):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.lax.pmean(grads, "batch")
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        new_stats = jax.lax.pmean(new_stats, "batch")  # flax's ImageNet example
        return params, new_stats, opt, jax.lax.pmean(loss, "batch")

    pstep = jax.pmap(step, axis_name="batch")
    rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), t)  # noqa: E731
    params, batch_stats, opt = rep(params), rep(batch_stats), rep(opt)
    for _ in range(3):
        params, batch_stats, opt, loss = pstep(params, batch_stats, opt, x, y)
    bs = batch_stats["BatchNorm_0"]
    assert bs["count"].dtype == jnp.float32  # what pmean makes of it
    np.testing.assert_array_equal(np.asarray(bs["count"]), 3.0)
    assert np.all(np.isfinite(np.asarray(loss)))
    # and evaluation with the pmean'd tree works too
    one = jax.tree.map(lambda a: a[0], {"params": params, "batch_stats": batch_stats})
    out = model.apply(one, x[0], train=False)
    assert np.all(np.isfinite(np.asarray(out)))


# 2. momentum.


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan"), True])
def test_concrete_momentum_refused(momentum):
    stats = jn.init_batch_stats(3)
    before = _copy(stats)
    with pytest.raises(ValueError, match=r"batch_norm: `momentum`=.* must be a number in \[0, 1\]"):
        jn.batch_norm(_x(), stats, training=True, momentum=momentum)
    with pytest.raises(ValueError, match=r"batch_renorm: `momentum`=.* must be a number in \[0, 1\]"):
        jn.batch_renorm(_x(), stats, training=True, momentum=momentum)
    _same(stats, before)


def test_momentum_refused_in_linen_layer():
    layer = jnl.BatchNorm(use_running_average=False, momentum=1.5)
    x = _x()
    with pytest.raises(ValueError, match=r"`momentum`=1.5"):
        variables = layer.init(jax.random.key(0), x)
    variables = jnl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"`momentum`=1.5"):
        layer.apply(variables, x, mutable=["batch_stats"])


def test_momentum_bounds_accepted():
    stats = jn.init_batch_stats(3)
    _, s1 = jn.batch_norm(_x(), stats, training=True, momentum=1)
    _same(s1.mean, stats.mean)
    _, s0 = jn.batch_norm(_x(), stats, training=True, momentum=np.float32(0.0))
    np.testing.assert_allclose(np.asarray(s0.mean), _x().astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_traced_nan_momentum_leaves_state_untouched():
    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(7, jnp.int32))
    before = _copy(stats)
    step = jax.jit(lambda s, m: jn.batch_norm(_x(), s, training=True, momentum=m))
    _, new = step(stats, jnp.float32(np.nan))
    _same(new, before)
    _, new = jax.jit(lambda s, m: jn.batch_renorm(_x(), s, training=True, momentum=m))(stats, jnp.float32(np.nan))
    _same(new, before)
    _same(stats, before)


def test_traced_momentum_r_max_d_max_train_under_jit():
    x = _x((16, 3), seed=3, scale=2.0) + 1.0
    stats = jn.BatchStats(jnp.asarray([0.5, -0.5, 1.0]), jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray(3, jnp.int32))
    step = jax.jit(lambda s, m, r, d: jn.batch_renorm(x, s, training=True, momentum=m, r_max=r, d_max=d))
    y, new = step(stats, jnp.float32(0.8), jnp.float32(1.5), jnp.float32(0.25))
    # float64 reference of the paper's formulas
    xd = x.astype(np.float64)
    mu_b, var_b = xd.mean(0), xd.var(0)
    mu, sigma = np.asarray(stats.mean, np.float64), np.sqrt(np.asarray(stats.var, np.float64) + 1e-5)
    sig_b = np.sqrt(var_b + 1e-5)
    r = np.clip(sig_b / sigma, 1 / 1.5, 1.5)
    d = np.clip((mu_b - mu) / sigma, -0.25, 0.25)
    np.testing.assert_allclose(np.asarray(y), (xd - mu_b) / sig_b * r + d, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(new.mean), 0.8 * mu + 0.2 * mu_b, rtol=1e-5, atol=1e-6)
    assert int(new.count) == 4
    _, new_bn = jax.jit(lambda s, m: jn.batch_norm(x, s, training=True, momentum=m))(stats, jnp.float32(0.8))
    np.testing.assert_allclose(np.asarray(new_bn.mean), 0.8 * mu + 0.2 * mu_b, rtol=1e-5, atol=1e-6)


# 3. statistics as a mapping or a tuple.


def test_stats_as_mapping_or_tuple():
    ref_y, ref = jn.batch_norm(_x(), jn.init_batch_stats(3), training=True)
    base = jn.init_batch_stats(3)
    for stats in ({"mean": base.mean, "var": base.var, "count": base.count}, (base.mean, base.var, base.count)):
        before = _copy(stats)
        y, new = jn.batch_norm(_x(), stats, training=True)
        assert isinstance(new, jn.BatchStats)
        _same(new, ref)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y))
        _same(stats, before)
        _, new = jn.batch_renorm(_x(), stats, training=True)
        assert isinstance(new, jn.BatchStats)


@pytest.mark.parametrize(
    "stats",
    [{"mean": np.zeros(3), "var": np.ones(3)}, (np.zeros(3), np.ones(3)), np.zeros(3), None],
)
def test_stats_of_wrong_kind_refused(stats):
    with pytest.raises(ValueError, match=r"batch_norm: `stats` must be a BatchStats, a mapping with exactly"):
        jn.batch_norm(_x(), stats, training=True)


# 4. nothing non-finite enters a state; integers are integers.


def test_float16_state_overflow_not_stored():
    stats = jn.init_batch_stats(3, dtype=jnp.float16)
    before = _copy(stats)
    x = _x((8, 3), scale=1e3)  # variance ~1e6 overflows float16 (max 65504)
    _, new = jn.batch_norm(x, stats, training=True, momentum=0.0)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in (new.mean, new.var))
    _same(new, before)  # refused whole, count not bumped
    _same(stats, before)


def test_int_running_statistics_refused():
    stats = jn.BatchStats(jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32), jnp.asarray(0, jnp.int32))
    with pytest.raises(ValueError, match=r"batch_norm: `stats.mean` has dtype int32.*must be floating"):
        jn.batch_norm(_x(), stats, training=True)


def test_int_output_dtype_refused():
    with pytest.raises(ValueError, match=r"batch_norm: `dtype`=int32 must be a floating dtype"):
        jn.batch_norm(_x(), jn.init_batch_stats(3), training=True, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"batch_renorm: `dtype`=int8 must be a floating dtype"):
        jn.batch_renorm(_x(), jn.init_batch_stats(3), training=False, dtype=np.int8)


@pytest.mark.parametrize("average", ["ema", "cumulative"])
def test_negative_count_refused(average):
    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(-1, jnp.int32))
    with pytest.raises(ValueError, match=r"batch_norm: `stats.count`=.*-1.*non-negative integer"):
        jn.batch_norm(_x(), stats, training=True, average=average)


def test_traced_negative_count_cumulative_writes_no_inf():
    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(-1, jnp.int32))
    _, new = jax.jit(lambda s: jn.batch_norm(_x(), s, training=True, average="cumulative"))(stats)
    _same(new, stats)


def test_init_batch_stats_integers():
    s = jn.init_batch_stats(np.int64(3))
    assert s.mean.shape == (3,) and int(s.count) == 0
    assert jn.init_batch_stats((np.int32(2), 3)).var.shape == (2, 3)
    for bad in (-1, 2.0, True, (3, -2)):
        with pytest.raises(ValueError, match=r"init_batch_stats: `feature_shape`=.* must be a non-negative int"):
            jn.init_batch_stats(bad)


def test_float_axis_refused():
    with pytest.raises(ValueError, match=r"batch_norm: `axis` must be an int or a tuple of ints, got 1.0"):
        jn.batch_norm(_x((4, 3)), jn.init_batch_stats(3), training=True, axis=1.0)


@pytest.mark.parametrize("epsilon", [True, np.bool_(False)])
def test_bool_epsilon_refused(epsilon):
    with pytest.raises(ValueError, match=r"batch_norm: `epsilon` must be a finite number >= 0"):
        jn.batch_norm(_x(), jn.init_batch_stats(3), training=True, epsilon=epsilon)
    for name, call in (("layer_norm", jn.layer_norm), ("rms_norm", jn.rms_norm),
                       ("instance_norm", lambda x, epsilon: jn.instance_norm(x[None], epsilon=epsilon))):
        with pytest.raises(ValueError, match=rf"{name}: `epsilon` must be a finite number >= 0"):
            call(_x(), epsilon=epsilon)


def test_numpy_int_num_groups():
    x = _x((2, 5, 6), seed=4)
    y = jn.group_norm(x, num_groups=np.int64(2))
    xg = x.astype(np.float64).reshape(2, 5, 2, 3)
    ref = ((xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(jnp.asarray(y).mean()), 0.0, abs_tol=1e-5)


# 5. interop with PyTorch state dicts.


def _sd(**drop):
    torch = pytest.importorskip("torch")
    sd = {
        "bn.weight": torch.ones(3), "bn.bias": torch.zeros(3), "bn.running_mean": torch.full((3,), 0.5),
        "bn.running_var": torch.full((3,), 2.0), "bn.num_batches_tracked": torch.tensor(5),
    }
    for k in drop:
        del sd["bn." + k]
    return sd


@pytest.mark.parametrize(("drop", "missing"), [("running_var", "running_var"), ("running_mean", "running_mean"),
                                               ("weight", "weight"), ("bias", "bias")])
def test_torch_state_dict_missing_key(drop, missing):
    import jaxnorm.interop as ji

    sd = _sd(**{drop: None})
    keys = sorted(sd)
    with pytest.raises(ValueError, match=rf"batch_norm_from_torch: .* is missing `bn.{missing}`"):
        ji.batch_norm_from_torch(sd, prefix="bn")
    assert sorted(sd) == keys


def test_torch_state_dict_without_affine_or_stats_still_converts():
    import jaxnorm.interop as ji

    params, stats = ji.batch_norm_from_torch(_sd(weight=None, bias=None), prefix="bn")
    assert params == {} and int(stats.count) == 5
    params, stats = ji.batch_norm_from_torch(_sd(running_mean=None, running_var=None, num_batches_tracked=None),
                                             prefix="bn")
    assert stats is None and sorted(params) == ["bias", "scale"]
    with pytest.raises(ValueError, match=r"has `bn.num_batches_tracked` but no running_mean/running_var"):
        ji.batch_norm_from_torch(_sd(running_mean=None, running_var=None), prefix="bn")


def test_torch_bfloat16_converts():
    torch = pytest.importorskip("torch")
    import jaxnorm.interop as ji

    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _sd().items()}
    params, stats = ji.batch_norm_from_torch(sd, prefix="bn")
    np.testing.assert_array_equal(np.asarray(stats.var), 2.0)
    np.testing.assert_array_equal(np.asarray(params["scale"], np.float32), 1.0)
    assert int(stats.count) == 5


def test_torch_negative_num_batches_tracked_refused():
    torch = pytest.importorskip("torch")
    import jaxnorm.interop as ji

    sd = _sd()
    sd["bn.num_batches_tracked"] = torch.tensor(-3)
    with pytest.raises(ValueError, match=r"`bn.num_batches_tracked`=.*-3.* must be a non-negative integer"):
        ji.batch_norm_from_torch(sd, prefix="bn")


def test_momentum_from_torch_scalars():
    torch = pytest.importorskip("torch")
    import jaxnorm.interop as ji

    assert ji.momentum_from_torch(torch.tensor(0.1)) == pytest.approx(0.9)
    assert ji.momentum_from_torch(np.float32(0.1)) == pytest.approx(0.9)
    assert ji.momentum_from_torch(np.array(0.25)) == 0.75
    assert ji.momentum_to_torch(jnp.asarray(0.99)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"momentum_from_torch: `momentum`=.* must be a number in \[0, 1\]"):
        ji.momentum_from_torch(torch.tensor([0.1, 0.2]))


def test_batch_norm_to_torch_without_count():
    torch = pytest.importorskip("torch")
    import jaxnorm.interop as ji

    sd = ji.batch_norm_to_torch({}, {"mean": np.zeros(3), "var": np.ones(3)}, as_tensor=torch.from_numpy)
    assert int(sd["num_batches_tracked"]) == 0
    bn = torch.nn.BatchNorm1d(3, affine=False)
    bn.load_state_dict(sd)  # a state torch loads as it is
    sd = ji.batch_norm_to_torch({}, {"mean": np.zeros(3), "var": np.ones(3), "count": np.float32(4.0)})
    assert sd["num_batches_tracked"] == 4
    with pytest.raises(ValueError, match=r"batch_norm_to_torch: `stats.count`=.* non-negative integer"):
        ji.batch_norm_to_torch({}, jn.init_batch_stats(3)._replace(count=jnp.asarray(-2)))


# 6. documented edge behaviour (docs/guides/hostile_inputs.md).


def test_all_false_mask_feature_documented_value():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mask = np.zeros((4, 3), bool)
    mask[:, 0] = True
    stats = jn.init_batch_stats(3)
    before = _copy(stats)
    y, new = jn.batch_norm(x, stats, training=True, mask=mask)
    xd = x.astype(np.float64)
    # a feature without any valid value: mean 0, variance 0, so x / sqrt(eps)
    np.testing.assert_allclose(np.asarray(y[:, 1:]), xd[:, 1:] / np.sqrt(1e-5), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y[:, 0]), (xd[:, 0] - xd[:, 0].mean()) / np.sqrt(xd[:, 0].var() + 1e-5),
                               rtol=1e-5)
    _same(new, before)  # the whole state is kept, count included
    _same(stats, before)


def test_nnx_layer_survives_float_count():
    from flax import nnx

    import jaxnorm.nnx as jnn

    bn = jnn.BatchNorm(3, rngs=nnx.Rngs(0))
    bn.count = nnx.BatchStat(jnp.asarray(2.0, jnp.float32))  # what a pmean of the state leaves
    bn(jnp.asarray(_x()))
    assert int(bn.count[...]) == 3
    bn(jnp.asarray(_x(seed=1)))
    assert int(bn.count[...]) == 4


# 7. masks: a batch of one, a lower-rank mask that fits x two ways, no valid value at all.


@pytest.mark.parametrize("fn", [jn.batch_norm, jn.batch_renorm])
def test_masked_batch_of_one_refused_when_concrete(fn):
    stats = jn.init_batch_stats(3)
    before = _copy(stats)
    mask = np.zeros((6, 1), bool)
    mask[2] = True  # one example left: the batch of one that (1, 3) without a mask is
    with pytest.raises(ValueError, match=rf"{fn.__name__}: training needs more than one valid value per feature.*"
                                         r"`mask` \(shape \(6, 1\)\) leaves a feature .* exactly one"):
        fn(_x((6, 3)), stats, training=True, mask=mask)
    mask = np.ones((4, 1), bool)
    mask[1:] = False  # ghost batches of 2: the first holds one valid example
    with pytest.raises(ValueError, match=r"leaves a feature in a ghost batch .* exactly one"):
        fn(_x((4, 3)), stats, training=True, mask=mask, ghost_batch_size=2)
    with pytest.raises(ValueError, match=r"training needs more than one value per feature"):
        fn(_x((1, 3)), stats, training=True)  # the same batch without a mask
    _same(stats, before)


@pytest.mark.parametrize("average", ["ema", "cumulative"])
def test_traced_masked_batch_of_one_keeps_the_state(average):
    stats = jn.BatchStats(jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray(3, jnp.int32))
    before = _copy(stats)
    x = _x((6, 3), seed=5)
    bias = np.asarray([0.1, 0.2, 0.3], np.float32)
    mask = np.zeros((6, 3), bool)
    mask[:, 0] = True  # feature 0: six values; features 1 and 2: one value each
    mask[4, 1:] = True
    step = jax.jit(lambda x, s, m: jn.batch_norm(x, s, bias=bias, training=True, mask=m, average=average,
                                                 unbiased=True))
    y, new = step(x, stats, mask)
    _same(new, before)  # no variance from one value: nothing folded in, count included
    _same(stats, before)
    np.testing.assert_allclose(np.asarray(y[4, 1:]), bias[1:], atol=1e-6)  # the batch of one's output: the bias
    mask[5, 1:] = True  # two values: folded in as usual
    _, new = step(x, stats, mask)
    assert int(new.count) == 4


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("batch_norm", lambda x, m: jn.batch_norm(x, jn.init_batch_stats(3), training=True, mask=m)),
        ("batch_renorm", lambda x, m: jn.batch_renorm(x, jn.init_batch_stats(3), training=True, mask=m)),
        ("layer_norm", lambda x, m: jn.layer_norm(x, mask=m)),
        ("rms_norm", lambda x, m: jn.rms_norm(x, mask=m)),
        ("group_norm", lambda x, m: jn.group_norm(x, num_groups=3, mask=m)),
        ("instance_norm", lambda x, m: jn.instance_norm(x, mask=m)),
        ("adaptive_instance_norm", lambda x, m: jn.adaptive_instance_norm(x, x, mask=m)),
        ("moments", lambda x, m: jn.moments(x, (0, 1), mask=m)),
    ],
)
def test_lower_rank_mask_that_fits_two_ways_refused(name, call):
    x = _x((3, 3, 3), seed=6)
    mask = np.asarray([[True, True, False]] * 3)  # (3, 3): (1, 3, 3) by NumPy, or per example and time (3, 3, 1)?
    with pytest.raises(ValueError, match=rf"{name}: `mask` of shape \(3, 3\) has fewer axes than `x` .*fits it in "
                                         r"2 ways \(\(3, 3, 1\) or \(1, 3, 3\)\)"):
        call(x, mask)
    # x's rank says which; a lower rank that fits one way only is read NumPy's way
    call(x, mask.reshape(3, 3, 1))


def test_lower_rank_mask_read_one_way():
    x = _x((8, 3), seed=7)
    feature = np.asarray([True, False, True])
    y1, s1 = jn.batch_norm(x, jn.init_batch_stats(3), training=True, mask=np.ones(3, bool))  # (3,) on (8, 3)
    y2, s2 = jn.batch_norm(x, jn.init_batch_stats(3), training=True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s1.var), np.asarray(s2.var), rtol=1e-6)
    y = jn.layer_norm(x, mask=feature)  # one way only: per feature, for every row
    xd = x.astype(np.float64)[:, feature]
    ref = (x - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


_STYLE = _x((2, 5, 3), seed=9, scale=2.0) + 1.0


@pytest.mark.parametrize(
    ("call", "eps", "affine"),
    [
        (lambda x, m, g, b: jn.layer_norm(x, g, b, mask=m), 1e-6, "param"),
        (lambda x, m, g, b: jn.rms_norm(x, g, mask=m) + b, 1e-6, "param"),
        (lambda x, m, g, b: jn.group_norm(x, g, b, num_groups=1, mask=m), 1e-6, "param"),
        (lambda x, m, g, b: jn.instance_norm(x, g, b, mask=m), 1e-6, "param"),
        (lambda x, m, g, b: jn.adaptive_instance_norm(x, _STYLE, mask=m), 1e-5, "style"),
    ],
)
def test_all_false_mask_value_per_example_norms(call, eps, affine):
    # documented: a statistic without any valid value has mean 0 and variance 0,
    # so its positions get x / sqrt(eps), then the norm's affine map
    x = _x((2, 4, 3), seed=8)
    mask = np.ones((2, 4, 1), bool)
    mask[1] = False  # example 1 is all padding
    g, b = np.asarray([1.0, 2.0, 0.5], np.float32), np.asarray([0.1, 0.0, -0.1], np.float32)
    y = np.asarray(call(x, mask, g, b))
    x_hat = x[1].astype(np.float64) / np.sqrt(eps)
    if affine == "param":
        ref = x_hat * g + b
    else:
        style = _STYLE[1].astype(np.float64)
        ref = x_hat * np.sqrt(style.var(0) + eps) + style.mean(0)
    np.testing.assert_allclose(y[1], ref, rtol=1e-5)
    assert np.all(np.isfinite(y[0]))


# 8. complex inputs: refused with the reason (flax's |x|^2 semantics are not implemented).

_C = (np.ones((4, 2, 3)) + 1j * np.ones((4, 2, 3))).astype(np.complex64)


@pytest.mark.parametrize(
    ("name", "arg", "call"),
    [
        ("batch_norm", "x", lambda x: jn.batch_norm(x, jn.init_batch_stats(3), training=True)),
        ("batch_renorm", "x", lambda x: jn.batch_renorm(x, jn.init_batch_stats(3), training=False)),
        ("layer_norm", "x", lambda x: jn.layer_norm(x)),
        ("rms_norm", "x", lambda x: jn.rms_norm(x)),
        ("group_norm", "x", lambda x: jn.group_norm(x, num_groups=1)),
        ("instance_norm", "x", lambda x: jn.instance_norm(x)),
        ("adaptive_instance_norm", "x", lambda x: jn.adaptive_instance_norm(x, x.real)),
        ("local_response_norm", "x", lambda x: jn.local_response_norm(x, size=3)),
        ("filter_response_norm", "x", lambda x: jn.filter_response_norm(x)),
        ("moments", "x", lambda x: jn.moments(x, 0)),
        ("normalize", "x", lambda x: jn.normalize(x, 0.0, 1.0, epsilon=1e-5)),
        ("weight_norm", "kernel", lambda x: jn.weight_norm(x)),
        ("layer_norm", "scale", lambda x: jn.layer_norm(x.real, x[0, 0])),
    ],
)
def test_complex_refused_with_reason(name, arg, call):
    with pytest.raises(ValueError, match=rf"^{name}: `{arg}` has dtype complex64 .*complex inputs are unsupported "
                                         r"\(flax's layers normalize by \|x\|\^2"):
        call(_C)


@pytest.mark.parametrize("layer", ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"])
def test_complex_refused_by_flax_layers(layer):
    from flax import nnx

    import jaxnorm.nnx as jnx

    kwargs = {"GroupNorm": dict(num_groups=1)}.get(layer, {})
    lin = getattr(jnl, layer)(**kwargs, **({"use_running_average": False} if layer == "BatchNorm" else {}))
    with pytest.raises(ValueError, match=r"`x` has dtype complex64 .*complex inputs are unsupported"):
        lin.init(jax.random.key(0), _C)
    mod = getattr(jnx, layer)(3, **kwargs, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`x` has dtype complex64 .*complex inputs are unsupported"):
        mod(_C)


def test_complex_refusal_listed_among_flax_differences():
    import pathlib

    text = pathlib.Path(__file__).parents[1].joinpath("docs/guides/flax.md").read_text()
    section = text[text.index("## Where jaxnorm differs from flax"):]
    assert "**Complex inputs.**" in section and "|x|" in section


# 9. the supported float32 range (docs/guides/numerics.md, "Supported range").


def test_float32_range_boundary_as_documented():
    import pathlib
    import re

    text = pathlib.Path(__file__).parents[1].joinpath("docs/guides/numerics.md").read_text()
    stated = float(re.search(r"\|x\| ≤ ([0-9.]+e[0-9]+) / sqrt\(n\)", text).group(1))
    f32max = float(np.finfo(np.float32).max)
    assert stated == pytest.approx(math.sqrt(f32max / 4), rel=0.01)
    n = 16
    stats = jn.init_batch_stats(3)
    before = _copy(stats)
    inside = 0.999 * math.sqrt(f32max / (4 * n))
    x = np.full((n, 3), -inside, np.float32)
    x[0] = inside  # the worst case: every other value 2 * inside from the shift
    xd = x.astype(np.float64)
    for mask in (None, np.ones((n, 1), bool)):
        y, new = jn.batch_norm(x, stats, training=True, momentum=0.0, mask=mask)
        np.testing.assert_allclose(np.asarray(new.var), xd.var(0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(y), (xd - xd.mean(0)) / np.sqrt(xd.var(0)), rtol=1e-4, atol=1e-4)
    for y in (jn.layer_norm(x.T), jn.rms_norm(x.T), jn.group_norm(x.T[..., None], num_groups=1)):
        assert np.all(np.isfinite(np.asarray(y))) and float(jnp.max(jnp.abs(y))) > 0.5
    beyond = 1.01 * math.sqrt(f32max / (4 * (n - 1)))
    x = np.full((n, 3), -beyond, np.float32)
    x[0] = beyond
    _, new = jn.batch_norm(x, stats, training=True)
    _same(new, before)  # the overflowed variance is not folded in
    _same(stats, before)


# 10. traced momentum, r_max, d_max: jit arguments, vmap sweeps, schedules, the Flax layers.


def _ema_ref(stats_mean, stats_var, x, momentum):
    xd = x.astype(np.float64)
    return momentum * stats_mean + (1 - momentum) * xd.mean(0), momentum * stats_var + (1 - momentum) * xd.var(0)


def test_vmap_sweep_over_momentum_and_limits():
    x = _x((8, 3), seed=10, scale=2.0) + 1.0
    stats = jn.BatchStats(jnp.asarray([0.5, -0.5, 1.0]), jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray(3, jnp.int32))
    mu, var = np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)
    ms = np.asarray([0.0, 0.5, 0.9, 1.0], np.float32)
    _, swept = jax.vmap(lambda m: jn.batch_norm(x, stats, training=True, momentum=m))(ms)
    _, swept_rn = jax.vmap(lambda m: jn.batch_renorm(x, stats, training=True, momentum=m))(ms)
    for i, m in enumerate(ms.astype(np.float64)):
        ref_mean, ref_var = _ema_ref(mu, var, x, m)
        for s in (swept, swept_rn):
            np.testing.assert_allclose(np.asarray(s.mean[i]), ref_mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(s.var[i]), ref_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(swept.count), 4)
    rs, ds = np.asarray([1.0, 1.2, 3.0], np.float32), np.asarray([0.0, 0.1, 5.0], np.float32)
    ys, _ = jax.jit(jax.vmap(lambda r, d: jn.batch_renorm(x, stats, training=True, r_max=r, d_max=d)))(rs, ds)
    xd = x.astype(np.float64)
    sig_b, sigma = np.sqrt(xd.var(0) + 1e-5), np.sqrt(var + 1e-5)
    for i in range(3):
        r = np.clip(sig_b / sigma, 1 / rs[i], rs[i])
        d = np.clip((xd.mean(0) - mu) / sigma, -ds[i], ds[i])
        np.testing.assert_allclose(np.asarray(ys[i]), (xd - xd.mean(0)) / sig_b * r + d, rtol=1e-4, atol=1e-4)


def test_momentum_and_renorm_schedules_in_one_scan():
    xs = _x((5, 8, 2), seed=11, scale=3.0) + 2.0

    def momentum_at(step):  # a warm-up schedule: fast averaging first, slower later
        return jnp.minimum(0.5 + 0.1 * step, 0.9)

    def body(stats, inputs):
        step, x = inputs
        r_max, d_max = jn.renorm_schedule(step, warmup_steps=1, r_max_steps=3, d_max_steps=3)
        _, stats = jn.batch_renorm(x, stats, training=True, momentum=momentum_at(step), r_max=r_max, d_max=d_max)
        return stats, None

    stats, _ = jax.jit(lambda s: jax.lax.scan(body, s, (jnp.arange(5), xs)))(jn.init_batch_stats(2))
    mean, var = np.zeros(2), np.ones(2)
    for step in range(5):
        mean, var = _ema_ref(mean, var, xs[step], min(0.5 + 0.1 * step, 0.9))
    np.testing.assert_allclose(np.asarray(stats.mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.var), var, rtol=1e-5)
    assert int(stats.count) == 5


@pytest.mark.parametrize("momentum", [float("nan"), 1.5, -0.5])
def test_traced_bad_momentum_leaves_state_untouched(momentum):
    stats = jn.BatchStats(jnp.asarray([0.5, -0.5, 1.0]), jnp.asarray([2.0, 0.5, 1.0]), jnp.asarray(3, jnp.int32))
    before = _copy(stats)
    for fn in (jn.batch_norm, jn.batch_renorm):
        step = jax.jit(lambda s, m: fn(_x(), s, training=True, momentum=m))  # noqa: B023
        _same(step(stats, jnp.float32(momentum))[1], before)
    _same(stats, before)


def test_traced_momentum_must_be_a_scalar():
    with pytest.raises(ValueError, match=r"batch_norm: `momentum` must be a real scalar, got a traced"):
        jax.jit(lambda m: jn.batch_norm(_x(), jn.init_batch_stats(3), training=True, momentum=m))(jnp.ones(3) * 0.9)


@pytest.mark.parametrize(("name", "value"), [("r_max", True), ("r_max", "3"), ("r_max", float("nan")),
                                             ("r_max", np.ones(3) * 2), ("d_max", -1.0), ("d_max", np.bool_(True))])
def test_concrete_limits_refused(name, value):
    stats = jn.init_batch_stats(3)
    before = _copy(stats)
    with pytest.raises(ValueError, match=rf"batch_renorm: `{name}` must be >= [01], got .* \(a real scalar"):
        jn.batch_renorm(_x(), stats, training=True, **{name: value})
    with pytest.raises(ValueError, match=rf"renorm_schedule: `{name}` must be >= [01]"):
        jn.renorm_schedule(0, **{name: value})
    _same(stats, before)
    jn.batch_renorm(_x(), stats, training=True, r_max=np.float32(np.inf), d_max=np.inf)  # no clipping: allowed


def test_linen_layers_take_traced_hyperparameters():
    x = _x((8, 3), seed=12) * 2 + 1
    xd = x.astype(np.float64)
    variables = jnl.BatchRenorm(use_running_average=False).init(jax.random.key(0), x)

    @jax.jit
    def step(variables, m, r, d):  # a traced field (module built inside the step) or a call-time momentum
        _, upd = jnl.BatchNorm(use_running_average=False, momentum=m).apply(variables, x, mutable=["batch_stats"])
        y, upd_rn = jnl.BatchRenorm(use_running_average=False).apply(
            variables, x, r_max=r, d_max=d, momentum=m, mutable=["batch_stats"])
        return upd["batch_stats"], y, upd_rn["batch_stats"]

    bn, y, rn = step(variables, jnp.float32(0.75), jnp.float32(1.0), jnp.float32(0.0))
    ref_mean, ref_var = _ema_ref(np.zeros(3), np.ones(3), x, 0.75)
    for s in (bn, rn):
        np.testing.assert_allclose(np.asarray(s["mean"]), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s["var"]), ref_var, rtol=1e-5)
    # r_max = 1, d_max = 0 is batch norm
    np.testing.assert_allclose(np.asarray(y), (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5), rtol=1e-4, atol=1e-4)
    bn, _, rn = step(variables, jnp.float32(np.nan), jnp.float32(2.0), jnp.float32(1.0))
    _same(bn, variables["batch_stats"])
    _same(rn, variables["batch_stats"])


def test_nnx_layers_take_traced_hyperparameters():
    from flax import nnx

    import jaxnorm.nnx as jnx

    x = _x((8, 3), seed=13) * 2 + 1
    bn, rn = jnx.BatchNorm(3, rngs=nnx.Rngs(0)), jnx.BatchRenorm(3, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(bn, rn, m, r, d):  # a traced momentum goes in at call time (nnx keeps attributes static)
        return bn(x, momentum=m), rn(x, r_max=r, d_max=d, momentum=m)

    step(bn, rn, jnp.float32(0.75), jnp.float32(1.5), jnp.float32(0.5))
    ref_mean, ref_var = _ema_ref(np.zeros(3), np.ones(3), x, 0.75)
    for layer in (bn, rn):
        np.testing.assert_allclose(np.asarray(layer.mean[...]), ref_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(layer.var[...]), ref_var, rtol=1e-5)
        assert int(layer.count[...]) == 1
    before = _copy((bn.mean[...], bn.var[...], bn.count[...]))
    step(bn, rn, jnp.float32(np.nan), jnp.float32(1.5), jnp.float32(0.5))
    _same((bn.mean[...], bn.var[...], bn.count[...]), before)
    _same((rn.mean[...], rn.var[...], rn.count[...]), before)
    bad = jnx.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0))
    before = _copy((bad.mean[...], bad.var[...], bad.count[...]))
    with pytest.raises(ValueError, match=r"batch_norm: `momentum`=1.5 must be a number in \[0, 1\]"):
        bad(x)
    _same((bad.mean[...], bad.var[...], bad.count[...]), before)
    with pytest.raises(ValueError, match=r"batch_renorm: `r_max` must be >= 1, got 0.5"):
        rn(x, r_max=0.5)


# 11. the case classes of section 4: integers are integers, the rest a ValueError naming the argument.


@pytest.mark.parametrize("value", [2.0, True, 0, np.float64(2)])
def test_num_groups_not_a_positive_int_refused(value):
    with pytest.raises(ValueError, match=r"group_norm: `num_groups` must be a positive int .*got "):
        jn.group_norm(_x((2, 6)), num_groups=value)
    with pytest.raises(ValueError, match=r"group_norm: `group_size` must be a positive int"):
        jn.group_norm(_x((2, 6)), group_size=value)
    y = jn.group_norm(_x((2, 6)), group_size=np.int32(3))
    assert y.shape == (2, 6)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("layer_norm", lambda d: jn.layer_norm(_x(), dtype=d)),
        ("rms_norm", lambda d: jn.rms_norm(_x(), dtype=d)),
        ("group_norm", lambda d: jn.group_norm(_x(), num_groups=1, dtype=d)),
        ("instance_norm", lambda d: jn.instance_norm(_x((2, 4, 3)), dtype=d)),
        ("normalize", lambda d: jn.normalize(_x(), 0.0, 1.0, epsilon=1e-5, dtype=d)),
        ("weight_norm", lambda d: jn.weight_norm(_x(), dtype=d)),
        ("weight_standardize", lambda d: jn.weight_standardize(_x(), dtype=d)),
        ("spectral_norm", lambda d: jn.spectral_norm(_x(), jn.init_spectral_state(jax.random.key(0), (8, 3)),
                                                     update_stats=False, dtype=d)[0]),
    ],
)
def test_int_output_dtype_refused_everywhere(name, call):
    for dtype in (jnp.int32, np.uint8, bool):
        with pytest.raises(ValueError, match=rf"{name}: `dtype`=\w+ must be a floating dtype"):
            call(dtype)
    assert call(jnp.bfloat16).dtype == jnp.bfloat16


def test_int_state_dtype_refused_where_made_and_where_used():
    for dtype in (jnp.int32, bool):
        with pytest.raises(ValueError, match=r"init_batch_stats: `dtype`=\w+ must be a real floating dtype"):
            jn.init_batch_stats(3, dtype=dtype)
    stats = jn.BatchStats(jnp.zeros(3), jnp.ones(3, jnp.int32), jnp.asarray(0, jnp.int32))
    before = _copy(stats)
    with pytest.raises(ValueError, match=r"batch_renorm: `stats.var` has dtype int32.*must be floating"):
        jn.batch_renorm(_x(), stats, training=True)
    _same(stats, before)
    assert jn.init_batch_stats(np.array(3)).mean.shape == (3,)  # a 0-d integer array is an integer
    assert jn.init_batch_stats((jnp.asarray(2), np.int8(3))).var.shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "arg", "call"),
    [
        ("layer_norm", "axis", lambda: jn.layer_norm(_x(), axis=1.0)),
        ("rms_norm", "axis", lambda: jn.rms_norm(_x(), axis=(0, 1.0))),
        ("group_norm", "channel_axis", lambda: jn.group_norm(_x(), num_groups=1, channel_axis=1.0)),
        ("moments", "axes", lambda: jn.moments(_x(), np.float32(0))),
        ("batch_renorm", "axis", lambda: jn.batch_renorm(_x(), jn.init_batch_stats(3), training=True, axis=True)),
    ],
)
def test_non_integer_axes_refused(name, arg, call):
    with pytest.raises(ValueError, match=rf"{name}: `{arg}` must be an int or a tuple of ints"):
        call()


def test_batch_norm_to_torch_takes_a_tuple_and_refuses_other_kinds():
    import jaxnorm.interop as ji

    stats = jn.init_batch_stats(3)._replace(count=jnp.asarray(7, jnp.int32))
    sd = ji.batch_norm_to_torch({}, tuple(stats))
    assert int(sd["num_batches_tracked"]) == 7 and sd["running_var"].tolist() == [1.0, 1.0, 1.0]
    for bad in ((stats.mean, stats.var), {"mean": stats.mean}, np.zeros(3)):
        with pytest.raises(ValueError, match=r"batch_norm_to_torch: `stats` must be a BatchStats, a mapping"):
            ji.batch_norm_to_torch({}, bad)
