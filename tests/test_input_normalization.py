"""InputNormalization (linen and NNX) and adapt, against float64 NumPy over the concatenated batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx


def data(n=96, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, c)) * [1.0, 20.0, 0.01] + [0.0, -300.0, 1e4]).astype(np.float32)


def ref_standardized(x, seen, epsilon=1e-8):
    seen = np.asarray(seen, np.float64)
    return (np.asarray(x, np.float64) - seen.mean(0)) / np.sqrt(seen.var(0) + epsilon)


def count_of(tree):
    return np.asarray(tree["count"]).astype(np.int64) @ np.array([2**30, 1])


class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnl.InputNormalization(clip=50.0)(x)
        x = nn.Dense(4)(x)
        x = jnl.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


def test_linen_layer_adapt_and_standardize():
    x = data()
    layer = jnl.InputNormalization()
    variables = layer.init(jax.random.key(0), x[:8])
    assert sorted(variables["batch_stats"]) == ["count", "m2", "mean", "mean_residual"]
    np.testing.assert_allclose(layer.apply(variables, x), x, rtol=1e-6)  # fresh: identity
    adapted = jnl.adapt(layer, variables, np.split(x, 12))
    np.testing.assert_array_equal(count_of(adapted["batch_stats"]), [96, 96, 96])
    np.testing.assert_allclose(layer.apply(adapted, x), ref_standardized(x, x), atol=2e-4)
    again = jnl.adapt(layer, adapted, np.split(x, 12))  # reset: the same statistics, not twice the count
    np.testing.assert_array_equal(count_of(again["batch_stats"]), [96, 96, 96])
    more = jnl.adapt(layer, adapted, np.split(x[:24], 3), reset=False)  # partial_fit
    np.testing.assert_array_equal(count_of(more["batch_stats"]), [120, 120, 120])
    seen = np.concatenate([x, x[:24]])
    np.testing.assert_allclose(layer.apply(more, x), ref_standardized(x, seen), atol=2e-4)


def test_linen_adapt_inside_a_model_touches_only_its_statistics():
    x = data()
    model = Model()
    variables = model.init(jax.random.key(0), x[:8], train=False)
    adapted = jnl.adapt(model, variables, np.split(x, 4), train=True)  # BatchNorm would update in train mode
    stats = adapted["batch_stats"]
    np.testing.assert_array_equal(count_of(stats["InputNormalization_0"]), [96, 96, 96])
    jax.tree.map(np.testing.assert_array_equal, stats["BatchNorm_0"], variables["batch_stats"]["BatchNorm_0"])
    jax.tree.map(np.testing.assert_array_equal, adapted["params"], variables["params"])
    mean = stats["InputNormalization_0"]["mean"] + stats["InputNormalization_0"]["mean_residual"]
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6)


def test_linen_update_in_call_rl_style():
    x = data(40)
    layer = jnl.InputNormalization(clip=5.0)
    variables = layer.init(jax.random.key(0), x[:4])

    @jax.jit
    def act(variables, obs):
        y, upd = layer.apply(variables, obs, update_stats=True, mutable=["batch_stats"])
        return y, {**variables, **upd}

    for t in range(10):
        y, variables = act(variables, x[4 * t:4 * t + 4])
    np.testing.assert_allclose(y, np.clip(ref_standardized(x[36:], x), -5, 5), atol=2e-3)
    np.testing.assert_array_equal(count_of(variables["batch_stats"]), [40, 40, 40])
    with pytest.raises(Exception, match="batch_stats"):  # flax refuses the update without mutable
        layer.apply(variables, x[:4], update_stats=True)


def test_linen_errors():
    layer = jnl.InputNormalization()
    variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"jaxnorm.linen.adapt: `batches` is empty"):
        jnl.adapt(layer, variables, [])
    with pytest.raises(ValueError, match=r"jaxnorm.linen.adapt: `module` \(Dense\) calls no jaxnorm.linen.InputNorm"):
        dense = nn.Dense(2)
        jnl.adapt(dense, {**dense.init(jax.random.key(0), jnp.ones((2, 3))), "batch_stats": {}}, [jnp.ones((2, 3))])
    with pytest.raises(ValueError, match=r"jaxnorm.linen.adapt: `variables` has no 'batch_stats' collection"):
        jnl.adapt(layer, {"params": {}}, [jnp.ones((2, 3))])
    with pytest.raises(ValueError, match=r"standardize_features: `stats.mean` has shape \(3,\), but `x` of sha"):
        layer.apply(variables, jnp.ones((2, 4)))


def test_nnx_layer_adapt_update_and_isolation():
    x = data()
    model = nnx.Sequential(
        jnx.InputNormalization(3), nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnx.BatchNorm(4, rngs=nnx.Rngs(1))
    )
    bn_before = np.asarray(model.layers[2].mean[...])
    jnx.adapt(model, np.split(x, 4))
    layer = model.layers[0]
    np.testing.assert_array_equal(layer.stats.exact_count(), [96, 96, 96])
    np.testing.assert_array_equal(model.layers[2].mean[...], bn_before)
    np.testing.assert_allclose(layer(x), ref_standardized(x, x), atol=2e-4)
    assert layer.update_stats is False
    layer.adapt(np.split(x[:24], 2), reset=False)
    np.testing.assert_array_equal(layer.stats.exact_count(), [120, 120, 120])

    acting = jnx.InputNormalization(3, update_stats=True, clip=5.0)

    @nnx.jit
    def act(layer, obs):
        return layer(obs)

    for t in range(10):
        y = act(acting, x[4 * t:4 * t + 4])
    np.testing.assert_allclose(y, np.clip(ref_standardized(x[36:40], x[:40]), -5, 5), atol=2e-3)
    np.testing.assert_array_equal(acting.stats.exact_count(), [40, 40, 40])
    frozen = acting(x[:4], update_stats=False)
    np.testing.assert_array_equal(acting.stats.exact_count(), [40, 40, 40])
    assert frozen.shape == (4, 3)


def test_nnx_errors():
    with pytest.raises(ValueError, match=r"jaxnorm.nnx.adapt: `model` \(Linear\) holds no jaxnorm.nnx.InputNorm"):
        jnx.adapt(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), [jnp.ones((2, 3))])
    with pytest.raises(ValueError, match=r"jaxnorm.nnx.adapt: `batches` is empty"):
        jnx.adapt(jnx.InputNormalization(3), [])
    with pytest.raises(ValueError, match=r"init_feature_stats: `feature_shape` must be an int or a tuple"):
        jnx.InputNormalization("3")


def test_data_normalization_guide_runs():
    """Every ```python block of docs/guides/data_normalization.md runs as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "guides" / "data_normalization.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        exec(compile(block, f"data_normalization.md[{i}]", "exec"), {"__name__": f"guide_{i}"})
