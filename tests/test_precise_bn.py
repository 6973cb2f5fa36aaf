"""PreciseBN (jn.recalibrate, and population="exact" in linen and NNX) against float64 statistics.

The average mode is checked against the per-batch float64 statistics averaged, the exact mode against
float64 moments of the concatenated batches (each layer's inputs, every layer on batch statistics).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx


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


# ---- population="exact": the moments of all recalibration batches together ----------------------------------------


def uneven_batches(sizes=(4, 16, 4), d_in=4, seed=2):
    """Batches of unequal sizes (two shapes: two compilations) whose means move between batches."""
    rng = np.random.default_rng(seed)
    return [(3.0 * i + 2.0 * rng.standard_normal((n, d_in))).astype(np.float32) for i, n in enumerate(sizes)]


def renorm_then_norm(params, stats, x, *, training, unbiased=False, mask=None):
    """dense -> batch_renorm (the paper's limits) -> relu -> dense -> batch_norm: renorm's output feeds a BN."""
    h, s1 = jn.batch_renorm(
        x @ params["w1"], stats["brn"], params["g1"], params["b1"], training=training, r_max=3.0, d_max=5.0,
        unbiased=unbiased, mask=mask,
    )
    y, s2 = jn.batch_norm(jax.nn.relu(h) @ params["w2"], stats["bn"], training=training, unbiased=unbiased, mask=mask)
    return y, {"brn": s1, "bn": s2}


def layer_inputs(params, xs, masks=None):
    """float64: each layer's input on every batch, every layer normalizing with its batch statistics (Algorithm 1)."""
    first, second = [], []
    for i, x in enumerate(xs):
        mask = None if masks is None else masks[i]
        h1 = ref.f64(x) @ ref.f64(params["w1"])
        a, _, _, _ = ref.bn_train(h1, (1,), params["g1"], params["b1"], mask=mask)
        first.append(h1)
        second.append(np.maximum(a, 0) @ ref.f64(params["w2"]))
    return first, second


def pooled(values, masks=None, unbiased=False):
    """float64 mean and variance over the concatenated batches' valid rows (the exact population)."""
    x = np.concatenate(values)
    m = np.ones(x.shape, bool) if masks is None else np.broadcast_to(np.concatenate(masks), x.shape)
    mean, var, n = ref.masked_moments(x, (0,), m)
    var = var * n / (n - 1) if unbiased else var
    return mean[0], var[0]


def averaged(values, masks=None, unbiased=False):
    """float64 plain average over batches of per-batch mean and variance (Wu & Johnson)."""
    stats = []
    for i, x in enumerate(values):
        mean, var, n = ref.masked_moments(x, (0,), None if masks is None else masks[i])
        stats.append((mean[0], var[0] * n[0] / (n[0] - 1) if unbiased else var[0]))
    return np.mean([s[0] for s in stats], axis=0), np.mean([s[1] for s in stats], axis=0)


def two_layer_fresh():
    return {"brn": jn.init_batch_stats(6), "bn": jn.init_batch_stats(3)}


@pytest.mark.parametrize("unbiased", [False, True])
def test_exact_population_against_the_concatenated_batches(unbiased):
    params, xs = mlp_params(), uneven_batches()
    first, second = layer_inputs(params, xs)

    def update(stats, x):
        return renorm_then_norm(params, stats, x, training=True, unbiased=unbiased)[1]

    start = {"brn": trained_looking()["bn"], "bn": trained_looking()["brn"]}
    exact = jn.recalibrate(update, start, xs, population="exact")
    average = jn.recalibrate(update, start, xs)  # the default
    for name, inputs in (("brn", first), ("bn", second)):
        mean, var = pooled(inputs, unbiased=unbiased)
        np.testing.assert_allclose(exact[name].mean, mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(exact[name].var, var, rtol=2e-5)
        a_mean, a_var = averaged(inputs, unbiased=unbiased)
        np.testing.assert_allclose(average[name].mean, a_mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(average[name].var, a_var, rtol=2e-5)
        # the test tells the estimators apart by far more than its tolerance (unequal sizes weigh the
        # batches differently; the spread of the batch means is in the pooled variance only)
        assert not np.allclose(mean, a_mean, rtol=1e-3, atol=1e-3)
        assert not np.allclose(var, a_var, rtol=1e-2)
        assert int(exact[name].count) == len(xs) and exact[name].count.dtype == jnp.int32
        assert type(exact[name]) is jn.BatchStats


def test_exact_population_with_masks_and_a_non_finite_batch():
    """Masked batches contribute their valid count; NaN in masked places is ignored; a NaN batch is skipped."""
    params, xs = mlp_params(), uneven_batches(sizes=(8, 8, 8, 8))
    masks = [np.arange(8)[:, None] < k for k in (2, 8, 5, 3)]  # valid rows: 2, 8, 5, 3
    xs = [np.where(m, x, np.nan).astype(np.float32) for x, m in zip(xs, masks, strict=True)]
    bad = (np.full((8, 4), np.nan, np.float32), np.ones((8, 1), bool))
    first, second = layer_inputs(params, [np.where(m, x, 0) for x, m in zip(xs, masks, strict=True)], masks)

    @chex.assert_max_traces(n=1)
    def update(stats, batch):
        x, mask = batch
        return renorm_then_norm(params, stats, x, training=True, mask=mask)[1]

    data = [(x, m) for x, m in zip(xs, masks, strict=True)]
    data.insert(2, bad)
    for population, reference in (("exact", pooled), ("average", averaged)):
        out = jn.recalibrate(update, two_layer_fresh(), data, population=population)
        chex.clear_trace_counter()
        for name, inputs in (("brn", first), ("bn", second)):
            mean, var = reference(inputs, masks)
            np.testing.assert_allclose(out[name].mean, mean, rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(out[name].var, var, rtol=2e-5)
            assert int(out[name].count) == len(xs)  # the NaN batch did not count


def test_exact_population_a_feature_missing_from_a_batch():
    """Per-feature masks: the exact mode folds the other features; a feature never seen keeps its old values."""
    rng = np.random.default_rng(4)
    xs = [(i + rng.standard_normal((6, 3))).astype(np.float32) for i in range(3)]
    masks = [np.ones((6, 3), bool) for _ in xs]
    masks[1][:, 1] = False  # feature 1 is absent from batch 1
    for m in masks:
        m[:, 2] = False  # feature 2 is never present
    old = jn.BatchStats(jnp.full(3, 5.0), jnp.full(3, 4.0), jnp.asarray(7, jnp.int32))

    def update(stats, batch):
        return jn.batch_norm(batch[0], stats, training=True, mask=batch[1])[1]

    out = jn.recalibrate(update, old, list(zip(xs, masks, strict=True)), population="exact")
    for j in (0, 1):
        values = np.concatenate([ref.f64(x)[m[:, j], j] for x, m in zip(xs, masks, strict=True)])
        np.testing.assert_allclose(out.mean[j], values.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.var[j], values.var(), rtol=1e-5)
    assert float(out.mean[2]) == 5.0 and float(out.var[2]) == 4.0
    assert int(out.count) == 3


def test_exact_population_ghost_batches_and_an_ensemble_under_jit():
    """Ghost groups merge into their batch; stacked statistics recalibrate member by member; a jitted update."""
    xs = uneven_batches(sizes=(8, 16, 4))
    weights = np.stack([mlp_params(seed)["w1"] for seed in (0, 1)])  # (2, 4, 6)
    stats = jax.vmap(lambda _: jn.init_batch_stats(6))(jnp.arange(2))

    @jax.jit
    def update(stats, x):
        return jax.vmap(lambda s, w: jn.batch_norm(x @ w, s, training=True, ghost_batch_size=4)[1])(stats, weights)

    out = jn.recalibrate(update, stats, xs, population="exact")
    for member in range(2):
        mean, var = pooled([ref.f64(x) @ ref.f64(weights[member]) for x in xs])
        np.testing.assert_allclose(out.mean[member], mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(out.var[member], var, rtol=2e-5)
    np.testing.assert_array_equal(out.count, [3, 3])
    chex.assert_shape([out.mean, out.var], (2, 6))


def test_population_is_checked_and_the_state_is_unchanged():
    params, xs = mlp_params(), batches(n=2)
    update = lambda s, x: forward(params, s, x, training=True)[1]  # noqa: E731
    start = trained_looking()
    before = jax.tree.map(np.asarray, start)
    for bad in ("Exact", "mean", None, 1):
        with pytest.raises(ValueError, match=r"^recalibrate: `population`=.* is not one of 'average', 'exact'"):
            jn.recalibrate(update, start, xs, population=bad)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, start), before)
    with pytest.raises(TypeError):
        jn.recalibrate(update, start, xs, "exact")  # keyword-only


def test_exact_population_outside_the_pass_nothing_changes():
    """The mode lives in the pass's state type: the same update traced afterwards on BatchStats is plain EMA."""
    params, xs = mlp_params(), uneven_batches(sizes=(8, 8))
    update = lambda s, x: renorm_then_norm(params, s, x, training=True)[1]  # noqa: E731
    jn.recalibrate(update, two_layer_fresh(), xs, population="exact")
    after = jax.jit(update)(two_layer_fresh(), xs[0])
    first, _ = layer_inputs(params, xs[:1])
    np.testing.assert_allclose(after["brn"].mean, 0.01 * first[0].mean(0), rtol=2e-5, atol=2e-6)
    assert int(after["brn"].count) == 1 and after["brn"].count.shape == ()


def flax_layer_inputs(k1, b1, g1, beta1, k2, b2, xs):
    """float64: the inputs of dense -> BN -> relu -> dense -> BN's two norms on every batch (batch statistics)."""
    first, second = [], []
    for x in xs:
        h1 = ref.f64(x) @ ref.f64(k1) + ref.f64(b1)
        a, _, _, _ = ref.bn_train(h1, (1,), g1, beta1)
        first.append(h1)
        second.append(np.maximum(a, 0) @ ref.f64(k2) + ref.f64(b2))
    return first, second


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jnl.BatchNorm(use_running_average=not train, unbiased=True)(nn.Dense(5)(x))
        return jnl.BatchRenorm(use_running_average=not train)(nn.Dense(3)(nn.relu(x)))


def test_linen_exact_population():
    xs = uneven_batches()
    model = LinenNet()
    variables = model.init(jax.random.key(0), xs[0], train=False)
    old = jax.tree.map(lambda a: a + 7, variables["batch_stats"])
    variables = {**variables, "batch_stats": old}
    before = jax.tree.map(np.asarray, variables)
    out = jnl.recalibrate(model, variables, xs, population="exact", train=True)
    p = variables["params"]
    first, second = flax_layer_inputs(
        p["Dense_0"]["kernel"], p["Dense_0"]["bias"], p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"],
        p["Dense_1"]["kernel"], p["Dense_1"]["bias"], xs,
    )
    bs = out["batch_stats"]
    for name, inputs, unbiased in (("BatchNorm_0", first, True), ("BatchRenorm_0", second, False)):
        mean, var = pooled(inputs, unbiased=unbiased)
        np.testing.assert_allclose(bs[name]["mean"], mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(bs[name]["var"], var, rtol=2e-5)
        assert not np.allclose(var, averaged(inputs, unbiased=unbiased)[1], rtol=1e-2)
        assert int(bs[name]["count"]) == len(xs) and np.shape(bs[name]["count"]) == ()
    chex.assert_trees_all_equal_structs(out, variables)
    with pytest.raises(ValueError, match=r"^jaxnorm.linen.recalibrate: `population`='pooled' is not one of"):
        jnl.recalibrate(model, variables, xs, population="pooled", train=True)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, variables), before)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(4, 5, rngs=rngs)
        self.bn = jnx.BatchNorm(5, unbiased=True, rngs=rngs)
        self.dense2 = nnx.Linear(5, 3, rngs=rngs)
        self.brn = jnx.BatchRenorm(3, rngs=rngs)

    def __call__(self, x):
        return self.brn(self.dense2(nnx.relu(self.bn(self.dense1(x)))))


def test_nnx_exact_population_in_place():
    xs = uneven_batches()
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    with pytest.raises(ValueError, match=r"^jaxnorm.nnx.recalibrate: `population`='Exact' is not one of"):
        jnx.recalibrate(model, xs, population="Exact")
    assert int(model.bn.count[...]) == 0 and model.bn.use_running_average  # unchanged
    jnx.recalibrate(model, xs, population="exact")
    first, second = flax_layer_inputs(
        model.dense1.kernel[...], model.dense1.bias[...], model.bn.scale[...], model.bn.bias[...],
        model.dense2.kernel[...], model.dense2.bias[...], xs,
    )
    for layer, inputs, unbiased in ((model.bn, first, True), (model.brn, second, False)):
        mean, var = pooled(inputs, unbiased=unbiased)
        np.testing.assert_allclose(layer.mean[...], mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(layer.var[...], var, rtol=2e-5)
        assert not np.allclose(var, averaged(inputs, unbiased=unbiased)[1], rtol=1e-2)
        assert int(layer.count[...]) == len(xs) and layer.count[...].shape == ()
        assert layer.use_running_average
    # the model still runs (evaluation with the new statistics, training with the scalar count)
    model(xs[0])
    model.train()
    model(xs[0])
    assert int(model.bn.count[...]) == len(xs) + 1


def test_the_guide_example_prints_what_the_guide_shows():
    """docs/guides/small_batches.md: the average-vs-exact block runs and prints the text block below it."""
    import contextlib
    import io
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "guides" / "small_batches.md").read_text()
    block = r"((?:(?!```).)*)"  # a fenced block's body
    found = re.findall(r"```python\n" + block + r"```\n\nprints \([^\n]*\n\n```text\n" + block + "```", text, re.S)
    assert len(found) == 1 and 'population="exact"' in found[0][0]
    code, shown = found[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "small_batches.md", "exec"), {"__name__": "guide_precise_bn"})  # noqa: S102
    assert printed.getvalue() == shown


class LinenRecurrent(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        cell = jnl.BatchNormLSTMCell(3, use_running_average=not train)
        rnn = nn.RNN(cell, variable_axes={"batch_stats": 0}, variable_broadcast="params", split_rngs={"params": False})
        return rnn(x)


@pytest.mark.parametrize("population", ["average", "exact"])
def test_linen_recurrent_batch_norm_cell_is_recalibrated_per_step(population):
    """BatchNormLSTMCell's per-step statistics (stacked by nn.RNN) are recalibrated, not EMA-updated from fresh."""
    rng = np.random.default_rng(5)
    xs = [(2.0 * i + rng.standard_normal((n, 4, 2))).astype(np.float32) for i, n in enumerate((8, 8, 4))]
    model = LinenRecurrent()
    variables = model.init(jax.random.key(0), xs[0], train=False)
    out = jnl.recalibrate(model, variables, xs, population=population, train=True)
    kernel = ref.f64(variables["params"]["BatchNormLSTMCell_0"]["input_kernel"])
    stats = out["batch_stats"]["BatchNormLSTMCell_0"]["input_norm"]
    reference = pooled if population == "exact" else averaged
    for t in range(4):  # the input projection of step t does not depend on the other norms
        mean, var = reference([ref.f64(x[:, t]) @ kernel for x in xs])
        np.testing.assert_allclose(stats["mean"][t], mean, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(stats["var"][t], var, rtol=2e-5)
    np.testing.assert_array_equal(stats["count"], [3, 3, 3, 3])


def test_the_pass_mark_travels_in_the_count_layout():
    """Flax variables are plain arrays: a count of shape mean.shape + (1,) or (3,) types them, a scalar does not."""
    from jaxnorm._src.state import (
        BatchStats,
        ExactRecalibrationStats,
        RecalibrationStats,
        stats_as_arrays,
        stats_from_arrays,
    )

    mean, var = jnp.zeros((2, 3)), jnp.ones((2, 3))
    plain = stats_from_arrays(mean, var, jnp.array(4, jnp.int32))
    assert type(plain) is BatchStats and int(plain.count) == 4
    average = stats_from_arrays(mean, var, jnp.full((2, 3, 1), 5, jnp.int32))
    assert type(average) is RecalibrationStats and average.count.shape == () and int(average.count) == 5
    exact = stats_from_arrays(mean, var, jnp.zeros((2, 3, 3), jnp.int32))
    assert type(exact) is ExactRecalibrationStats and exact.count.shape == (2, 3, 3)
    # written back in the same layout, so the next step of the pass sees the mark again
    assert stats_as_arrays(average)[2].shape == (2, 3, 1)
    assert stats_as_arrays(exact)[2].shape == (2, 3, 3)
    assert stats_as_arrays(plain)[2].shape == ()
