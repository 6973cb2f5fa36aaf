"""fold_batch_norm and the linen folding helpers, against a float64 NumPy reference."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from reference import bn_eval, f64

import jaxnorm as jn
import jaxnorm.linen as jnl

RNG = np.random.default_rng(0)
EPS = 1e-3


def random_bn(c, rng=RNG):
    """Non-trivial running statistics and affine parameters of C features."""
    stats = jn.BatchStats(
        jnp.asarray(rng.normal(size=c) * 2, jnp.float32),
        jnp.asarray(rng.uniform(0.2, 3.0, size=c), jnp.float32),
        jnp.asarray(5, jnp.int32),
    )
    scale = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
    beta = jnp.asarray(rng.normal(size=c), jnp.float32)
    return stats, scale, beta


def np_conv(x, w):
    """'VALID' NHWC convolution with an HWIO kernel, float64."""
    x, w = f64(x), f64(w)
    kh, kw = w.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for a in range(kh):
        for b in range(kw):
            y += np.einsum("nhwc,co->nhwo", x[:, a:a + ho, b:b + wo], w[a, b])
    return y


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
def test_folded_dense_equals_dense_then_eval_batch_norm(with_bias, with_affine, transform):
    x = RNG.normal(size=(6, 5)).astype(np.float32)
    w = RNG.normal(size=(5, 4)).astype(np.float32)
    b = RNG.normal(size=4).astype(np.float32) if with_bias else None
    stats, scale, beta = random_bn(4)
    if not with_affine:
        scale = beta = None
    kernel, bias = transform(lambda w, b, s, g, e: jn.fold_batch_norm(w, b, s, g, e, epsilon=EPS))(
        w, b, stats, scale, beta
    )
    chex.assert_shape(kernel, (5, 4))
    chex.assert_shape(bias, (4,))
    z = f64(x) @ f64(w) + (0 if b is None else f64(b))
    want = bn_eval(z, stats.mean, stats.var, (1,), scale, beta, eps=EPS)
    np.testing.assert_allclose(f64(x @ kernel + bias), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_conv_equals_conv_then_eval_batch_norm(with_bias):
    x = RNG.normal(size=(2, 6, 6, 3)).astype(np.float32)
    w = RNG.normal(size=(3, 3, 3, 5)).astype(np.float32)
    b = RNG.normal(size=5).astype(np.float32) if with_bias else None
    stats, scale, beta = random_bn(5)
    kernel, bias = jax.jit(lambda *a: jn.fold_batch_norm(*a, epsilon=EPS))(w, b, stats, scale, beta)
    chex.assert_shape(kernel, w.shape)
    got = jax.jit(conv)(x, kernel) + bias
    z = np_conv(x, w) + (0 if b is None else f64(b))
    want = bn_eval(z, stats.mean, stats.var, (3,), scale, beta, eps=EPS)
    np.testing.assert_allclose(f64(got), want, atol=5e-5, rtol=5e-5)


def test_feature_axis_zero_is_pytorch_layout():
    # (out, in, kH, kW), as torch.nn.Conv2d keeps its weight
    w_oihw = RNG.normal(size=(5, 3, 3, 3)).astype(np.float32)
    b = RNG.normal(size=5).astype(np.float32)
    stats, scale, beta = random_bn(5)
    k0, b0 = jn.fold_batch_norm(w_oihw, b, stats, scale, beta, feature_axis=0)
    k1, b1 = jn.fold_batch_norm(np.transpose(w_oihw, (2, 3, 1, 0)), b, stats, scale, beta)
    chex.assert_trees_all_close((np.transpose(np.asarray(k0), (2, 3, 1, 0)), b0), (k1, b1), atol=1e-6)
    # and the middle axis of some other layout
    k2, _ = jn.fold_batch_norm(np.transpose(w_oihw, (1, 0, 2, 3)), b, stats, scale, beta, feature_axis=1)
    chex.assert_trees_all_close(np.transpose(np.asarray(k2), (1, 0, 2, 3)), k0, atol=1e-6)


def test_half_precision_kernel_keeps_its_dtype_and_folds_in_float32():
    w = RNG.normal(size=(8, 4)).astype(np.float32)
    stats, scale, beta = random_bn(4)
    kernel, bias = jn.fold_batch_norm(jnp.asarray(w, jnp.bfloat16), None, stats, scale, beta)
    assert kernel.dtype == jnp.bfloat16 and bias.dtype == jnp.bfloat16
    want = f64(w) * f64(scale) / np.sqrt(f64(stats.var) + 1e-5)
    np.testing.assert_allclose(f64(kernel.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)


def test_float64_folds_in_float64(x64):
    w = RNG.normal(size=(3, 2))
    stats = jn.BatchStats(jnp.asarray([1.0, 2.0]), jnp.asarray([0.5, 4.0]), jnp.asarray(1))
    kernel, bias = jn.fold_batch_norm(jnp.asarray(w), jnp.asarray([0.1, 0.2]), stats, epsilon=0.0)
    assert kernel.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(kernel), w / np.sqrt([0.5, 4.0]), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(bias), (np.array([0.1, 0.2]) - [1.0, 2.0]) / np.sqrt([0.5, 4.0]), rtol=1e-14)


W = jnp.ones((3, 4))
S4 = jn.init_batch_stats(4)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: jn.fold_batch_norm(W, None, jn.init_batch_stats(3)),
            r"fold_batch_norm: `stats.mean` has shape \(3,\), but `kernel` \(shape \(3, 4\)\) has 4 output features along `feature_axis`=-1",  # noqa: E501
        ),
        (
            lambda: jn.fold_batch_norm(W, jnp.ones(3), S4),
            r"fold_batch_norm: `bias` has shape \(3,\).*pass a \(4,\) array",
        ),
        (lambda: jn.fold_batch_norm(W, None, S4, jnp.ones((4, 1))), r"fold_batch_norm: `scale` has shape \(4, 1\)"),
        (lambda: jn.fold_batch_norm(W, None, S4, None, jnp.ones(2)), r"fold_batch_norm: `bn_bias` has shape \(2,\)"),
        (
            lambda: jn.fold_batch_norm(W, None, S4, feature_axis=2),
            r"fold_batch_norm: `feature_axis`=2 is not an axis of `kernel` \(shape \(3, 4\)\); pass an int in \[-2, 1\]",  # noqa: E501
        ),
        (
            lambda: jn.fold_batch_norm(W, None, S4, feature_axis=(0,)),
            r"fold_batch_norm: `feature_axis`=\(0,\) is not an axis",
        ),
        (lambda: jn.fold_batch_norm(jnp.ones(()), None, S4), r"fold_batch_norm: `kernel` must have at least one axis"),
        (
            lambda: jn.fold_batch_norm(jnp.ones((3, 4), jnp.int32), None, S4),
            r"fold_batch_norm: `kernel` must have a real floating dtype, got int32",
        ),
        (
            lambda: jn.fold_batch_norm(W, None, (1, 2)),
            r"fold_batch_norm: `stats` must be a jn.BatchStats or a mapping with 'mean' and 'var', got tuple",
        ),
        (
            lambda: jn.fold_batch_norms({"batch_stats": {}}, {}),
            r"fold_batch_norms: `variables` has no 'params' collection",
        ),
        (
            lambda: jn.fold_batch_norms({"params": {}}, [("a",)]),
            r"fold_batch_norms: each entry of `pairs` must be \(layer_path, bn_path\)",
        ),
        (
            lambda: jn.fold_batch_norms({"params": {}}, [("a", "b"), ("a", "c")]),
            r"fold_batch_norms: `pairs` names the layer a more than once",
        ),
        (
            lambda: jn.fold_batch_norms({"params": {"Dense_0": {"kernel": W}}}, {"Dense_1": "BatchNorm_0"}),
            r"fold_batch_norms: `pairs` names the layer 'Dense_1', but `variables\['params'\]` has no Dense/Conv `kernel` there",  # noqa: E501
        ),
        (
            lambda: jn.fold_batch_norms({"params": {"Dense_0": {"kernel": W}}}, {"Dense_0": "B/BatchNorm_0"}),
            r"fold_batch_norms: `pairs` names the batch norm 'B/BatchNorm_0', but `variables\['batch_stats'\]` has no 'mean' and 'var' there",  # noqa: E501
        ),
    ],
)
def test_bad_fold_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class Net(nn.Module):
    """A small CNN: Conv (no bias) -> BN -> relu, a block with Conv (bias) -> BN, Dense -> BN."""

    use_bn: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(h):
            return jnl.BatchNorm(use_running_average=not train, epsilon=1e-3, momentum=0.5)(h) if self.use_bn else h

        h = nn.relu(bn(nn.Conv(6, (3, 3), use_bias=not self.use_bn)(x)))
        h = Block(self.use_bn)(h, train)
        h = h.mean(axis=(1, 2))
        h = nn.relu(bn(nn.Dense(5)(h)))
        return nn.Dense(3)(h)


class Block(nn.Module):
    use_bn: bool

    @nn.compact
    def __call__(self, x, train):
        h = nn.Conv(4, (3, 3), strides=2)(x)
        if self.use_bn:
            h = jnl.BatchNorm(use_running_average=not train)(h)
        return nn.relu(h)


@pytest.fixture(scope="module")
def trained():
    """Net's variables, random (running statistics too, as after training); no compilation."""
    x = jnp.asarray(RNG.normal(size=(4, 8, 8, 3)) * 2 + 1, jnp.float32)
    shapes = serialization.to_state_dict(jax.eval_shape(Net().init, jax.random.key(0), x))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "count":
            return jnp.asarray(3, leaf.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.2, 3.0, leaf.shape), leaf.dtype)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes), x


def test_batch_norm_pairs_finds_every_layer_and_epsilon(trained):
    variables, x = trained
    pairs = jnl.batch_norm_pairs(Net(), variables, x)
    assert [(p.layer, p.batch_norm, p.epsilon) for p in pairs] == [
        (("Conv_0",), ("BatchNorm_0",), 1e-3),
        (("Block_0", "Conv_0"), ("Block_0", "BatchNorm_0"), 1e-5),
        (("Dense_0",), ("BatchNorm_1",), 1e-3),
    ]


def test_folded_linen_model_equals_original_in_eval_mode(trained):
    variables, x = trained
    folded = jnl.fold_batch_norms(variables, jnl.batch_norm_pairs(Net(), variables, x))
    assert "batch_stats" not in folded and "batch_stats" in variables  # the input is left as it was
    want = jax.jit(lambda v, x: Net().apply(v, x))(variables, x)
    got = jax.jit(lambda v, x: Net(use_bn=False).apply(v, x))(folded, x)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)
    # exactly the variables the BN-free model is built with
    target = jax.eval_shape(Net(use_bn=False).init, jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(folded, serialization.to_state_dict(target))


def test_explicit_pairs_with_string_paths(trained):
    variables, x = trained
    pairs = {"Conv_0": "BatchNorm_0", "Block_0/Conv_0": "Block_0/BatchNorm_0", "Dense_0": "BatchNorm_1"}
    by_hand = jnl.fold_batch_norms(
        variables, [(k, v, 1e-5 if k.startswith("Block") else 1e-3) for k, v in pairs.items()]
    )
    found = jnl.fold_batch_norms(variables, jnl.batch_norm_pairs(Net(), variables, x))
    chex.assert_trees_all_close(by_hand, found)


class BadOrder(nn.Module):
    axis: int = -1
    reuse: bool = False
    act: bool = False

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(4, (3, 3))
        if self.act:
            x = jnl.BatchNorm(use_running_average=True)(nn.relu(conv(x)))
            return x
        h = conv(x)
        if self.reuse:
            return jnl.BatchNorm(use_running_average=True, axis=self.axis)(h) + conv(x)
        return jnl.BatchNorm(use_running_average=True, axis=self.axis)(h)


class BnFirst(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(jnl.BatchNorm(use_running_average=True)(x))


class SharedOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        return jnl.BatchNorm(use_running_average=True)(h) + nn.Dense(4)(h)


@pytest.mark.parametrize(
    "model,match",
    [
        (BnFirst(), r"cannot fold the batch norm 'BatchNorm_0': its input is not the output of a flax Dense or Conv"),
        (
            BadOrder(act=True),
            r"its input is not the output of a flax Dense or Conv \(the batch norm comes before the layer, or something sits in between\)",  # noqa: E501
        ),
        (
            BadOrder(axis=1),
            r"cannot fold the batch norm 'BatchNorm_0': it normalizes axis 1 of its input \(shape \(2, 5, 5, 4\)\), not the last axis",  # noqa: E501
        ),
        (BadOrder(reuse=True), r"the layer 'Conv_0' before it is called more than once"),
        (SharedOutput(), r"the output of 'Dense_0' is also the input of Dense_1"),
    ],
)
def test_unsupported_patterns_raise(model, match):
    x = jnp.ones((2, 5, 5, 3)) if not isinstance(model, (BnFirst, SharedOutput)) else jnp.ones((2, 4))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=match):
        jnl.batch_norm_pairs(model, variables, x)
    assert jnl.batch_norm_pairs(model, variables, x, strict=False) == []


class Norm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnl.BatchNorm(use_running_average=True)(x)


class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Norm()(nn.Dense(4)(x))


def test_batch_norm_inside_a_wrapper_module_is_found():
    x = jnp.ones((2, 3))
    variables = jax.eval_shape(Wrapped().init, jax.random.key(0), x)
    assert jnl.batch_norm_pairs(Wrapped(), variables, x) == [(("Dense_0",), ("Norm_0", "BatchNorm_0"), 1e-5)]


def test_flax_batch_norm_is_folded_too():
    class FlaxNet(nn.Module):
        use_bn: bool = True

        @nn.compact
        def __call__(self, x):
            h = nn.Dense(3, use_bias=not self.use_bn)(x)
            return nn.BatchNorm(use_running_average=True)(h) if self.use_bn else h

    x = jnp.asarray(RNG.normal(size=(4, 2)), jnp.float32)
    variables = {
        "params": {
            "Dense_0": {"kernel": jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)},
            "BatchNorm_0": {"scale": jnp.full(3, 1.5), "bias": jnp.ones(3)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": jnp.ones(3), "var": jnp.full(3, 2.0)}},
    }
    folded = jnl.fold_batch_norms(variables, jnl.batch_norm_pairs(FlaxNet(), variables, x))
    got = jax.jit(FlaxNet(use_bn=False).apply)(folded, x)
    chex.assert_trees_all_close(got, jax.jit(FlaxNet().apply)(variables, x), atol=1e-6)


def test_checkpoint_round_trip_of_batch_stats_and_layer_variables(trained, tmp_path):
    variables, x = trained
    stats = jn.BatchStats(jnp.arange(3.0), jnp.full(3, 2.0), jnp.asarray(7, jnp.int32))
    blob = serialization.to_bytes({"stats": stats, "variables": variables})
    (tmp_path / "ckpt.msgpack").write_bytes(blob)
    target = {"stats": jn.init_batch_stats(3), "variables": jax.eval_shape(Net().init, jax.random.key(5), x)}
    restored = serialization.from_bytes(target, (tmp_path / "ckpt.msgpack").read_bytes())
    assert isinstance(restored["stats"], jn.BatchStats)
    assert restored["stats"].count.dtype == jnp.int32 and int(restored["stats"].count) == 7
    chex.assert_trees_all_equal(restored["stats"], stats)
    chex.assert_trees_all_equal(restored["variables"], serialization.to_state_dict(variables))


def test_orbax_checkpoint_round_trip_keeps_batch_stats(trained, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    variables, x = trained
    stats = jn.BatchStats(jnp.arange(3.0), jnp.full(3, 2.0), jnp.asarray(7, jnp.int32))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"stats": stats, "variables": variables})
    checkpointer.wait_until_finished()
    target = {"stats": jn.init_batch_stats(3), "variables": jax.eval_shape(Net().init, jax.random.key(5), x)}
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert isinstance(restored["stats"], jn.BatchStats) and restored["stats"].count.dtype == jnp.int32
    chex.assert_trees_all_equal(restored["stats"], stats)
    chex.assert_trees_all_equal(restored["variables"], serialization.to_state_dict(variables))
