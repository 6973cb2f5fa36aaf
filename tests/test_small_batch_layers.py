"""Flax BatchRenorm layers and PreciseBN recalibration (linen and NNX) against float64 references."""

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


def data(shape, seed=0, loc=1.5, spread=3.0):
    rng = np.random.default_rng(seed)
    return (loc + spread * rng.standard_normal(shape)).astype(np.float32)


def batches(n=4, size=8, d_in=3, seed=1):
    rng = np.random.default_rng(seed)
    return [(i + 2.0 * rng.standard_normal((size, d_in))).astype(np.float32) for i in range(n)]


STATS = dict(mean=np.array([1.5, 6.0, -4.0], np.float32), var=np.array([0.3, 9.0, 40.0], np.float32))


# ---------------------------------------------------------------- BatchRenorm layers


def test_linen_batch_renorm_training_eval_and_schedule():
    x = data((8, 3))
    layer = jnl.BatchRenorm(momentum=0.9)
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    assert sorted(variables["batch_stats"]) == ["count", "mean", "var"]
    variables = {**variables, "batch_stats": {**variables["batch_stats"], **STATS}}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(variables, x, t):
        r_max, d_max = jn.renorm_schedule(t, warmup_steps=0, r_max_steps=10, d_max_steps=10, r_max=2.0, d_max=1.0)
        return layer.apply(variables, x, use_running_average=False, r_max=r_max, d_max=d_max, mutable=["batch_stats"])

    for t, limits in ((0, (1.0, 0.0)), (5, (1.5, 0.5)), (20, (2.0, 1.0))):
        y, upd = step(variables, x, jnp.asarray(t))
        y_ref, _, _, mean, _ = ref.batch_renorm(x, STATS["mean"], STATS["var"], *limits, (1,))
        np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)
        np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * STATS["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    chex.clear_trace_counter()
    # fields give the limits when the call does not
    y, _ = jnl.BatchRenorm(r_max=2.0, d_max=1.0).apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(
        y, ref.batch_renorm(x, STATS["mean"], STATS["var"], 2.0, 1.0, (1,))[0], atol=3e-5, rtol=1e-5
    )
    y = layer.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(y, ref.bn_eval(x, STATS["mean"], STATS["var"], (1,)), atol=3e-5, rtol=1e-5)
    with pytest.raises(
        ValueError,
        match=r"jaxnorm.linen.BatchRenorm: `use_running_average` was passed both .* `BatchRenorm\(use_running_average=...\)`",  # noqa: E501
    ):
        jnl.BatchRenorm(use_running_average=True).apply(variables, x, use_running_average=False)
    with pytest.raises(ValueError, match=r"batch_renorm: `r_max` must be >= 1"):
        layer.apply(variables, x, use_running_average=False, r_max=0.5, mutable=["batch_stats"])


def test_nnx_batch_renorm_training_eval_and_schedule():
    x = data((8, 3))
    layer = jnx.BatchRenorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    layer.mean[...], layer.var[...] = STATS["mean"], STATS["var"]

    traces = []

    @nnx.jit
    def step(layer, x, r_max, d_max):
        traces.append(1)
        return layer(x, r_max=r_max, d_max=d_max)

    for limits in ((1.0, 0.0), (2.0, 1.0)):
        layer.mean[...], layer.var[...] = STATS["mean"], STATS["var"]
        y = step(layer, x, *map(jnp.asarray, limits))
        y_ref, _, _, mean, _ = ref.batch_renorm(x, STATS["mean"], STATS["var"], *limits, (1,))
        np.testing.assert_allclose(y, y_ref, atol=3e-5, rtol=1e-5)
        np.testing.assert_allclose(layer.mean[...], 0.9 * STATS["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1, "traced limits compile once"
    layer.mean[...], layer.var[...] = STATS["mean"], STATS["var"]
    layer.eval()
    np.testing.assert_allclose(layer(x), ref.bn_eval(x, STATS["mean"], STATS["var"], (1,)), atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.mean[...], STATS["mean"])
    # attributes give the limits when the call does not
    brn = jnx.BatchRenorm(3, r_max=2.0, d_max=1.0, rngs=nnx.Rngs(0))
    brn.mean[...], brn.var[...] = STATS["mean"], STATS["var"]
    np.testing.assert_allclose(
        brn(x), ref.batch_renorm(x, STATS["mean"], STATS["var"], 2.0, 1.0, (1,))[0], atol=3e-5, rtol=1e-5
    )


# ---------------------------------------------------------------- PreciseBN

TRACES = {"linen": 0, "nnx": 0}


def reference_statistics(w1, b1, g1, beta1, w2, b2, xs, unbiased1):
    """Per batch: dense -> BN (batch statistics) -> relu -> dense -> BN; each layer's mean/var, averaged."""
    per_batch = []
    for x in xs:
        h1 = ref.f64(x) @ ref.f64(w1) + ref.f64(b1)
        a, m1, v1, n1 = ref.bn_train(h1, (1,), g1, beta1)
        h2 = np.maximum(a, 0) @ ref.f64(w2) + ref.f64(b2)
        _, m2, v2, _ = ref.bn_train(h2, (1,))
        per_batch.append((m1, v1 * n1 / (n1 - 1) if unbiased1 else v1, m2, v2))
    return [np.mean([b[i] for b in per_batch], axis=0) for i in range(4)]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        TRACES["linen"] += 1  # runs once per trace
        x = nn.Dense(5)(x)
        x = jnl.BatchNorm(use_running_average=not train, unbiased=True)(x)
        x = nn.Dense(4)(nn.relu(x))
        x = jnl.BatchRenorm(use_running_average=not train, momentum=0.5)(x)
        return nn.BatchNorm(use_running_average=not train)(x)  # flax's own: not recalibrated


def test_linen_recalibrate_two_layer_mlp():
    xs = batches()
    model = LinenMLP()
    variables = model.init(jax.random.key(0), xs[0], train=False)
    # statistics an EMA might have left, far from the population's
    old = jax.tree.map(lambda a: a + 7 if a.dtype == jnp.float32 else a + 900, variables["batch_stats"])
    variables = {**variables, "batch_stats": old}
    TRACES["linen"] = 0
    out = jnl.recalibrate(model, variables, xs, train=True)
    assert TRACES["linen"] == 1, "the per-batch step is traced once"
    p = variables["params"]
    m1, v1, m2, v2 = reference_statistics(
        p["Dense_0"]["kernel"],
        p["Dense_0"]["bias"],
        p["BatchNorm_0"]["scale"],
        p["BatchNorm_0"]["bias"],
        p["Dense_1"]["kernel"],
        p["Dense_1"]["bias"],
        xs,
        unbiased1=True,
    )
    bs = out["batch_stats"]
    np.testing.assert_allclose(bs["BatchNorm_0"]["mean"], m1, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(bs["BatchNorm_0"]["var"], v1, rtol=2e-5)
    np.testing.assert_allclose(bs["BatchRenorm_0"]["mean"], m2, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(bs["BatchRenorm_0"]["var"], v2, rtol=2e-5)
    assert int(bs["BatchNorm_0"]["count"]) == int(bs["BatchRenorm_0"]["count"]) == len(xs)
    chex.assert_trees_all_equal(bs["BatchNorm_1"], old["BatchNorm_1"])  # flax's layer keeps its state
    assert out["params"] is variables["params"]
    # evaluated layers are left alone, and a pass that trains nothing is an error
    with pytest.raises(
        ValueError,
        match=r"jaxnorm.linen.recalibrate: no jaxnorm batch-norm layer folded a batch, so no statistics were recalibrated; pass .* `train=True`",  # noqa: E501
    ):
        jnl.recalibrate(model, variables, xs, train=False)
    with pytest.raises(ValueError, match=r"jaxnorm.linen.recalibrate: `variables` has no 'batch_stats'"):
        jnl.recalibrate(model, {"params": p}, xs, train=True)


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(3, 5, rngs=rngs)
        self.bn = jnx.BatchNorm(5, unbiased=True, rngs=rngs)
        self.dense2 = nnx.Linear(5, 4, rngs=rngs)
        self.brn = jnx.BatchRenorm(4, rngs=rngs)
        self.flax_bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        TRACES["nnx"] += 1
        x = self.brn(self.dense2(nnx.relu(self.bn(self.dense1(x)))))
        return self.dropout(self.flax_bn(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_nnx_recalibrate_in_place(mode):
    xs = batches()
    model = NNXModel(nnx.Rngs(0))
    for layer in (model.bn, model.brn):
        layer.mean[...] = layer.mean[...] + 7.0
        layer.count[...] = jnp.asarray(900, jnp.int32)
    getattr(model, mode)()
    params_before = nnx.state(model, nnx.Param)
    others_before = nnx.state(model, nnx.Not(nnx.Param))
    TRACES["nnx"] = 0
    jnx.recalibrate(model, xs)
    assert TRACES["nnx"] == 1, "the per-batch step is traced once"
    m1, v1, m2, v2 = reference_statistics(
        model.dense1.kernel[...],
        model.dense1.bias[...],
        model.bn.scale[...],
        model.bn.bias[...],
        model.dense2.kernel[...],
        model.dense2.bias[...],
        xs,
        unbiased1=True,
    )
    np.testing.assert_allclose(model.bn.mean[...], m1, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(model.bn.var[...], v1, rtol=2e-5)
    np.testing.assert_allclose(model.brn.mean[...], m2, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(model.brn.var[...], v2, rtol=2e-5)
    assert int(model.bn.count[...]) == int(model.brn.count[...]) == len(xs)
    chex.assert_trees_all_equal(nnx.state(model, nnx.Param), params_before)
    # everything else (flax's BatchNorm, RNG counters) is as it was
    others = nnx.state(model, nnx.Not(nnx.Param))
    for path in (("flax_bn", "mean"), ("flax_bn", "var")):
        chex.assert_trees_all_equal(others[path[0]][path[1]], others_before[path[0]][path[1]])
    evaluating = mode == "eval"
    assert model.bn.use_running_average is evaluating and model.brn.use_running_average is evaluating
    assert model.flax_bn.use_running_average is evaluating and model.dropout.deterministic is evaluating


def test_nnx_recalibrate_errors():
    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"jaxnorm.nnx.recalibrate: found no jaxnorm batch-norm statistics"):
        jnx.recalibrate(model, batches(n=1))
    with pytest.raises(ValueError, match=r"jaxnorm.nnx.recalibrate: `batches` is empty"):
        jnx.recalibrate(NNXModel(nnx.Rngs(0)), [])
