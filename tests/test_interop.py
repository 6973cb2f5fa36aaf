"""jaxnorm.interop against real PyTorch layers (CPU): conversions, eval and training parity."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
import jaxnorm.interop as ji

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

# Largest absolute differences seen on float32 CPU, for the README (printed with -s).
MEASURED = {}


def assert_close(name, got, want, atol):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    MEASURED[name] = max(err, MEASURED.get(name, 0.0))
    print(f"{name}: max abs diff {err:.2e}")
    assert err <= atol, (name, err)


def t2n(t):
    return t.detach().numpy()


def batches(n, shape=(4, 3, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1.5 + i) + i for i in range(n)]


def trained_bn(momentum=0.1, steps=3):
    """A BatchNorm2d(3) trained a few SGD steps (weights and running statistics move)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    target = torch.randn(4, 3, 5, 5)
    for x in batches(steps, seed=1):
        opt.zero_grad()
        ((bn(x) - target) ** 2).mean().backward()
        opt.step()
    return bn


eval_bn = jax.jit(lambda x, s, g, b: jn.batch_norm(x, s, g, b, training=False, axis=1)[0])


def test_trained_batch_norm2d_converted_gives_the_same_eval_output():
    bn = trained_bn()
    params, stats = ji.batch_norm_from_torch(bn.state_dict())
    assert int(stats.count) == 3 and stats.mean.dtype == jnp.float32 and stats.count.dtype == jnp.int32
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        want = t2n(bn.eval()(x))
    got = eval_bn(t2n(x), stats, params["scale"], params["bias"])
    assert_close("BatchNorm2d eval", got, want, 2e-5)


@pytest.mark.parametrize("average", ["ema", "cumulative"])
def test_continued_training_matches_torch_step_by_step(average):
    bn = trained_bn(momentum=0.1 if average == "ema" else None)
    params, stats = ji.batch_norm_from_torch(bn.state_dict())
    momentum = ji.momentum_from_torch(0.1) if average == "ema" else 0.9
    assert momentum == 0.9
    step = jax.jit(lambda x, s, g, b: jn.batch_norm(
        x, s, g, b, training=True, axis=1, momentum=momentum, unbiased=True, average=average))
    bn.train()
    for i, x in enumerate(batches(4, seed=3)):
        with torch.no_grad():
            want = t2n(bn(x))
        got, stats = step(t2n(x), stats, params["scale"], params["bias"])
        assert_close(f"train output ({average})", got, want, 2e-5)
        assert_close(f"running mean ({average})", stats.mean, t2n(bn.running_mean), 2e-5)
        assert_close(f"running var ({average})", stats.var, t2n(bn.running_var), 5e-5)
        assert int(stats.count) == int(bn.num_batches_tracked) == 4 + i


def test_cumulative_from_fresh_statistics_matches_momentum_none():
    bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False)
    params, stats = ji.batch_norm_from_torch(bn.state_dict())
    assert params == {}
    step = jax.jit(lambda x, s: jn.batch_norm(x, s, training=True, axis=1, average="cumulative", unbiased=True))
    for x in batches(3, seed=4):
        with torch.no_grad():
            bn(x)
        _, stats = step(t2n(x), stats)
    assert_close("running var (cumulative)", stats.var, t2n(bn.running_var), 5e-5)
    assert_close("running mean (cumulative)", stats.mean, t2n(bn.running_mean), 2e-5)


def test_reverse_conversion_loads_into_torch_and_matches():
    rng = np.random.default_rng(0)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    stats = jn.BatchStats(
        jnp.asarray(rng.normal(size=3), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 3, 3), jnp.float32),
        jnp.asarray(11, jnp.int32),
    )
    sd = ji.batch_norm_to_torch(params, stats)
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    bn = torch.nn.BatchNorm2d(3)
    result = bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    assert not result.missing_keys and not result.unexpected_keys
    assert int(bn.num_batches_tracked) == 11
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        want = t2n(bn.eval()(x))
    assert_close(
        "BatchNorm2d eval (jaxnorm -> torch)", eval_bn(t2n(x), stats, params["scale"], params["bias"]), want, 2e-5
    )
    # as_tensor=, a prefix, and linen-style mappings for params and statistics
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(3))
    linen_stats = {"mean": stats.mean, "var": stats.var, "count": stats.count}
    model.load_state_dict(ji.batch_norm_to_torch(params, linen_stats, prefix="1", as_tensor=torch.from_numpy))
    chex.assert_trees_all_close(t2n(model[1].running_var), stats.var)


def test_track_running_stats_false_gives_no_statistics():
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False)
    params, stats = ji.batch_norm_from_torch(bn.state_dict())
    assert stats is None and sorted(params) == ["bias", "scale"]
    # such a layer normalizes with batch statistics in eval mode as well
    x = batches(1, seed=6)[0]
    with torch.no_grad():
        want = t2n(bn.eval()(x))
    got, _ = jn.batch_norm(t2n(x), jn.init_batch_stats(3), params["scale"], params["bias"], training=True, axis=1)
    assert_close("BatchNorm2d(track_running_stats=False) eval", got, want, 2e-5)
    assert set(ji.batch_norm_to_torch(params, None)) == {"weight", "bias"}


def test_batch_norm_of_a_full_model_by_prefix_folds_into_the_torch_conv():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    model.train()
    with torch.no_grad():
        for x in batches(3, seed=8):
            model(x)
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.normal_()
    model.eval()
    sd = model.state_dict()
    params, stats = ji.batch_norm_from_torch(sd, prefix="1")
    kernel, bias = jn.fold_batch_norm(
        sd["0.weight"].numpy(), None, stats, params["scale"], params["bias"], feature_axis=0
    )
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        want = t2n(model(x))
    got = jax.lax.conv_general_dilated(t2n(x), kernel, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert_close("Conv2d+BatchNorm2d folded", got + bias[:, None, None], want, 5e-5)


def affine(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


PER_EXAMPLE = {
    "GroupNorm": (
        lambda: torch.nn.GroupNorm(2, 4),
        ji.group_norm_from_torch,
        ji.group_norm_to_torch,
        lambda x, p: jn.group_norm(x, p["scale"], p["bias"], num_groups=2, channel_axis=1, epsilon=1e-5),
    ),
    "InstanceNorm2d": (
        lambda: torch.nn.InstanceNorm2d(4, affine=True),
        ji.instance_norm_from_torch,
        ji.instance_norm_to_torch,
        lambda x, p: jn.instance_norm(x, p["scale"], p["bias"], channel_axis=1, epsilon=1e-5),
    ),
    "LayerNorm": (
        lambda: torch.nn.LayerNorm((4, 5, 5)),
        ji.layer_norm_from_torch,
        ji.layer_norm_to_torch,
        lambda x, p: jn.layer_norm(x, p["scale"], p["bias"], axis=(1, 2, 3), epsilon=1e-5),
    ),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_norms_match_torch_both_ways(name):
    make, from_torch, to_torch, ours = PER_EXAMPLE[name]
    layer = affine(make(), seed=len(name))
    x = batches(1, shape=(3, 4, 5, 5), seed=10)[0]
    with torch.no_grad():
        want = t2n(layer(x))
    params = from_torch(layer.state_dict())
    got = jax.jit(ours)(t2n(x), params)
    assert_close(f"{name} output", got, want, 2e-5)
    fresh = make()
    result = fresh.load_state_dict(to_torch(params, as_tensor=torch.from_numpy))
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert_close(f"{name} output (jaxnorm -> torch)", t2n(fresh(x)), got, 2e-5)


def test_torch_tensors_that_require_grad_are_converted():
    w = torch.nn.Parameter(torch.ones(3))
    params = ji.group_norm_from_torch({"weight": w, "bias": torch.zeros(3, requires_grad=True)})
    assert isinstance(params["scale"], jax.Array)
    chex.assert_trees_all_equal(params["scale"], jnp.ones(3))


def test_momentum_conversions():
    assert ji.momentum_from_torch(0.1) == 0.9
    assert ji.momentum_to_torch(0.9) == 0.1
    assert ji.momentum_to_torch(ji.momentum_from_torch(0.01)) == 0.01


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: ji.momentum_from_torch(None),
            r"momentum_from_torch: `momentum`=None is PyTorch's cumulative average.*average='cumulative'",
        ),
        (lambda: ji.momentum_to_torch(1.5), r"momentum_to_torch: `momentum`=1.5 must be a number in \[0, 1\]"),
        (
            lambda: ji.batch_norm_from_torch({"0.weight": np.ones(2), "1.running_mean": np.zeros(2)}),
            r"batch_norm_from_torch: `state_dict` \(2 keys\) has none of weight, bias, .* under `prefix`='' \(layers that have them: '0', '1'\); pass the layer's name as `prefix=`, e.g. `prefix='0'`",  # noqa: E501
        ),
        (
            lambda: ji.layer_norm_from_torch({"ln.weight": np.ones(2)}, prefix="bn"),
            r"layer_norm_from_torch: `state_dict` \(1 keys\) has none of bn.weight",
        ),
        (
            lambda: ji.instance_norm_from_torch(
                torch.nn.InstanceNorm2d(2, affine=True, track_running_stats=True).state_dict()
            ),
            r"instance_norm_from_torch: the layer under `prefix`='' keeps running statistics \(track_running_stats=True\)",  # noqa: E501
        ),
    ],
)
def test_bad_interop_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_interop_does_not_import_torch():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(ji.__file__).read_text())
    imported = {
        a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [type("A", (), {"name": n.module or ""})])
    }
    assert "torch" not in imported and "flax" not in imported, imported
