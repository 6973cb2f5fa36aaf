"""PreciseBN (jn.recalibrate) on a functional two-layer MLP against per-batch float64 statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxnorm as jn


def mlp_params(seed=0, d_in=4, d_hidden=6, d_out=3):
    rng = np.random.default_rng(seed)
    return dict(
        w1=rng.standard_normal((d_in, d_hidden)).astype(np.float32),
        g1=rng.uniform(0.5, 2.0, d_hidden).astype(np.float32),
        b1=rng.standard_normal(d_hidden).astype(np.float32),
        w2=rng.standard_normal((d_hidden, d_out)).astype(np.float32),
    )


def batches(n=5, size=8, d_in=4, seed=1):
    rng = np.random.default_rng(seed)
    return [(i + 2.0 * rng.standard_normal((size, d_in))).astype(np.float32) for i in range(n)]


def forward(params, stats, x, *, training, unbiased=False):
    """dense -> batch_norm -> relu -> dense -> batch_renorm (the paper's limits)."""
    h, s1 = jn.batch_norm(
        x @ params["w1"], stats["bn"], params["g1"], params["b1"], training=training, unbiased=unbiased
    )
    y, s2 = jn.batch_renorm(
        jax.nn.relu(h) @ params["w2"], stats["brn"], training=training, r_max=3.0, d_max=5.0, unbiased=unbiased
    )
    return y, {"bn": s1, "brn": s2}


def reference_statistics(params, xs, unbiased=False):
    """Each layer's per-batch mean and variance in float64, every layer on batch statistics; averaged."""
    per_batch = []
    for x in xs:
        h1 = ref.f64(x) @ ref.f64(params["w1"])
        a, m1, v1, n1 = ref.bn_train(h1, (1,), params["g1"], params["b1"])
        h2 = np.maximum(a, 0) @ ref.f64(params["w2"])
        _, m2, v2, n2 = ref.bn_train(h2, (1,))
        if unbiased:
            v1, v2 = v1 * n1 / (n1 - 1), v2 * n2 / (n2 - 1)
        per_batch.append((m1, v1, m2, v2))
    return [np.mean([b[i] for b in per_batch], axis=0) for i in range(4)]


def fresh():
    return {"bn": jn.init_batch_stats(6), "brn": jn.init_batch_stats(3)}


def trained_looking():
    """Statistics an EMA might have left: far from the population's."""
    return {
        "bn": jn.BatchStats(jnp.full(6, 3.0), jnp.full(6, 0.2), jnp.asarray(900, jnp.int32)),
        "brn": jn.BatchStats(jnp.full(3, -2.0), jnp.full(3, 7.0), jnp.asarray(900, jnp.int32)),
    }


@pytest.mark.parametrize("unbiased", [False, True])
def test_recalibrate_equals_the_average_of_per_batch_statistics(unbiased):
    params, xs = mlp_params(), batches()

    @chex.assert_max_traces(n=1)
    def update(stats, x):
        return forward(params, stats, x, training=True, unbiased=unbiased)[1]

    out = jn.recalibrate(update, trained_looking(), xs)
    m1, v1, m2, v2 = reference_statistics(params, xs, unbiased)
    np.testing.assert_allclose(out["bn"].mean, m1, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["bn"].var, v1, rtol=2e-5)
    np.testing.assert_allclose(out["brn"].mean, m2, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["brn"].var, v2, rtol=2e-5)
    assert int(out["bn"].count) == int(out["brn"].count) == len(xs)
    chex.clear_trace_counter()


def test_a_non_finite_batch_is_skipped_and_evaluated_layers_keep_their_statistics():
    params, xs = mlp_params(), batches(n=3)
    bad = np.full_like(xs[0], np.nan)

    def update(stats, x):
        # the second layer runs in evaluation mode: it must keep its statistics
        h, s1 = jn.batch_norm(x @ params["w1"], stats["bn"], params["g1"], params["b1"], training=True)
        _, s2 = jn.batch_renorm(jax.nn.relu(h) @ params["w2"], stats["brn"], training=False)
        return {"bn": s1, "brn": s2, "step": stats["step"] + 1}

    start = {**trained_looking(), "step": jnp.asarray(0)}
    out = jn.recalibrate(update, start, [xs[0], bad, xs[1], xs[2]])
    m1, v1, _, _ = reference_statistics(params, xs)
    np.testing.assert_allclose(out["bn"].mean, m1, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["bn"].var, v1, rtol=2e-5)
    assert int(out["bn"].count) == 3
    chex.assert_trees_all_equal(out["brn"], start["brn"])
    assert int(out["step"]) == 0  # what is not batch-norm statistics comes back unchanged


def test_errors():
    params, xs = mlp_params(), batches(n=2)
    update = lambda s, x: forward(params, s, x, training=True)[1]  # noqa: E731
    with pytest.raises(ValueError, match=r"recalibrate: `batches` is empty"):
        jn.recalibrate(update, fresh(), [])
    with pytest.raises(ValueError, match=r"recalibrate: found no jaxnorm batch-norm statistics"):
        jn.recalibrate(lambda s, x: s, {"w": jnp.ones(3)}, xs)
    # a jitted update is fine: the policy travels in the statistics' type, so it retraces
    chex.assert_trees_all_close(jn.recalibrate(jax.jit(update), fresh(), xs), jn.recalibrate(update, fresh(), xs))
    with pytest.raises(ValueError, match=r"recalibrate: no jaxnorm batch-norm layer folded a batch"):
        jn.recalibrate(lambda s, x: forward(params, s, x, training=False)[1], fresh(), xs)


def test_outside_recalibration_the_layers_are_unchanged():
    """No ambient state: the same update traced afterwards with plain BatchStats uses the layers' own policy."""
    params, xs = mlp_params(), batches(n=2)
    update = lambda s, x: forward(params, s, x, training=True)[1]  # noqa: E731
    jn.recalibrate(update, fresh(), xs)
    after = jax.jit(update)(fresh(), xs[0])
    m1, _, _, _ = reference_statistics(params, xs[:1])
    np.testing.assert_allclose(after["bn"].mean, 0.01 * m1, rtol=2e-5, atol=2e-6)  # ema, momentum 0.99


def test_stacked_statistics_of_an_ensemble():
    """Statistics with a leading axis (vmap ensembles, scanned layers) are recalibrated member by member."""
    xs = batches(n=3)
    weights = np.stack([mlp_params(seed)["w1"] for seed in (0, 1)])  # (2, 4, 6)
    stats = jax.vmap(lambda _: jn.init_batch_stats(6))(jnp.arange(2))

    def update(stats, x):
        return jax.vmap(lambda s, w: jn.batch_norm(x @ w, s, training=True)[1])(stats, weights)

    out = jn.recalibrate(update, stats, xs)
    for member in range(2):
        means = np.mean([(ref.f64(x) @ ref.f64(weights[member])).mean(0) for x in xs], axis=0)
        np.testing.assert_allclose(out.mean[member], means, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out.count, [3, 3])
    # a member that folded nothing keeps its old statistics
    from jaxnorm._src import recalibration

    old = jn.BatchStats(jnp.ones((2, 6)), jnp.ones((2, 6)), jnp.asarray([7, 7], jnp.int32))
    new = out._replace(count=jnp.asarray([0, 3], jnp.int32))
    kept, folded = recalibration.finish(old, new)
    np.testing.assert_array_equal(kept.mean[0], 1.0)
    np.testing.assert_allclose(kept.mean[1], out.mean[1])
    np.testing.assert_array_equal(kept.count, [7, 3])
    assert folded == 1
