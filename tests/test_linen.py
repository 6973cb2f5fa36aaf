"""jaxnorm.linen against flax.linen itself and a float64 NumPy reference."""

import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax_cases import (
    LAYOUTS,
    STATELESS,
    feature_mask,
    make_input,
    make_mask,
    max_abs,
    ref_standardize,
    ref_stateless,
)

import jaxnorm.linen as jnl

KEY = jax.random.key(0)
STEPS = 3
MOMENTUM = 0.8


def _randomize_params(variables, seed):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype), variables["params"])
    return {**variables, "params": params}


def _bn_run(bn, xs, masks, x_eval):
    """init, STEPS jitted training steps, one evaluation and a gradient; returns all of them."""
    variables = _randomize_params(jax.jit(functools.partial(bn.init, use_running_average=False))(KEY, xs[0]), 7)
    init_stats = variables["batch_stats"]
    train = jax.jit(lambda v, x, m: bn.apply(v, x, use_running_average=False, mask=m, mutable=["batch_stats"]))
    ys, stats = [], []
    for x, m in zip(xs, masks):
        y, upd = train(variables, x, m)
        variables = {**variables, **upd}
        ys.append(y)
        stats.append(upd["batch_stats"])
    y_eval = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=True))(variables, x_eval)

    def loss(params, x):
        y, _ = train({**variables, "params": params}, x, masks[0])
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], xs[0])
    return dict(init_stats=init_stats, variables=variables, ys=ys, stats=stats, y_eval=y_eval, grads=grads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_norm_matches_flax_and_reference(layout):
    shape, axis, mask_shape = LAYOUTS[layout]
    xs = [make_input(shape, s) for s in range(STEPS)]
    masks = [make_mask(mask_shape, s) for s in range(STEPS)]
    x_eval = make_input(shape, 99)
    theirs = _bn_run(nn.BatchNorm(axis=axis, momentum=MOMENTUM, use_fast_variance=False), xs, masks, x_eval)
    ours = _bn_run(jnl.BatchNorm(axis=axis, momentum=MOMENTUM), xs, masks, x_eval)

    # Same variable tree, plus count.
    flax_tree = jax.tree.map(jnp.shape, theirs["variables"])
    flax_tree["batch_stats"]["count"] = ()
    assert jax.tree.map(jnp.shape, ours["variables"]) == flax_tree
    assert int(ours["variables"]["batch_stats"]["count"]) == STEPS

    # init did not touch the statistics.
    chex.assert_trees_all_equal(
        {k: ours["init_stats"][k] for k in ("mean", "var")}, theirs["init_stats"])
    assert int(ours["init_stats"]["count"]) == 0

    for a, b in zip(ours["ys"], theirs["ys"]):
        chex.assert_trees_all_close(a, b, atol=2e-5, rtol=1e-5)
    for a, b in zip(ours["stats"], theirs["stats"]):
        chex.assert_trees_all_close({k: a[k] for k in ("mean", "var")}, b, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(ours["y_eval"], theirs["y_eval"], atol=2e-5, rtol=1e-5)
    chex.assert_trees_all_close(ours["grads"], theirs["grads"], atol=1e-4, rtol=1e-4)

    # And both against the float64 formula: outputs and the EMA of the statistics.
    red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    p = ours["variables"]["params"]
    where = tuple(shape[a] if a not in red else 1 for a in range(len(shape)))
    mean, var = np.zeros(where), np.ones(where)
    for x, m, y in zip(xs, masks, ours["ys"]):
        x_hat, bm, bv = ref_standardize(x, red, m, 1e-5)
        y_ref = x_hat * np.reshape(p["scale"], where) + np.reshape(p["bias"], where)
        assert max_abs(y, y_ref) < 2e-5
        mean, var = MOMENTUM * mean + (1 - MOMENTUM) * bm, MOMENTUM * var + (1 - MOMENTUM) * bv
    stats = ours["variables"]["batch_stats"]
    assert max_abs(stats["mean"], mean.reshape(-1)) < 1e-5
    assert max_abs(stats["var"], var.reshape(-1)) < 1e-5


@pytest.mark.parametrize(
    "layout,name",
    [(layout, name) for layout, layers in STATELESS.items() for name in layers],
)
def test_stateless_layers_match_flax_and_reference(layout, name):
    shape, _, mask_shape = LAYOUTS[layout]
    kwargs, reduced, _, groups = STATELESS[layout][name]
    x = make_input(shape, 3)
    mask = None
    if mask_shape is not None:
        # flax.linen.GroupNorm reshapes the mask, so it needs x's full shape.
        mask = (
            feature_mask(shape, 3)
            if name in ("LayerNorm", "RMSNorm")
            else np.broadcast_to(make_mask(mask_shape, 3), shape)
        )
    theirs = getattr(nn, name)(use_fast_variance=False, **kwargs)
    ours = getattr(jnl, name)(**kwargs)
    v_theirs = jax.jit(theirs.init)(KEY, x)
    v_ours = jax.jit(ours.init)(KEY, x)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_theirs)
    chex.assert_trees_all_equal(v_ours, v_theirs)
    variables = _randomize_params(v_ours, 11)
    y_theirs = jax.jit(theirs.apply)(variables, x, mask=mask)
    y_ours = jax.jit(ours.apply)(variables, x, mask=mask)
    chex.assert_trees_all_close(y_ours, y_theirs, atol=2e-5, rtol=1e-5)
    # Reference with unit parameters, to keep the check independent of both.
    y_ref = ref_stateless(x, name, reduced, groups, 1e-6, mask)
    unit = {"params": {k: (jnp.ones_like if k == "scale" else jnp.zeros_like)(p) for k, p in v_ours["params"].items()}}
    assert max_abs(jax.jit(ours.apply)(unit, x, mask=mask), y_ref) < 2e-5


def test_group_norm_per_time_step_matches_reference():
    # flax.linen is right here (flax.nnx 0.12 is not: see test_nnx.py).
    x = make_input((3, 5, 6), 4)
    gn = jnl.GroupNorm(num_groups=2, reduction_axes=(-1,))
    v = jax.jit(gn.init)(KEY, x)
    ref = ref_stateless(x, "GroupNorm", (2,), 2, 1e-6)
    assert max_abs(jax.jit(gn.apply)(v, x), ref) < 2e-5
    flax_y = jax.jit(nn.GroupNorm(num_groups=2, reduction_axes=(-1,), use_fast_variance=False).apply)(v, x)
    assert max_abs(flax_y, ref) < 2e-5


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm"])
def test_large_offset_flax_default_breaks_ours_does_not(name):
    # mean 1e4, std 1e-2: E[x^2] - E[x]^2 cancels every digit in float32.
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 8))).astype(np.float32)
    axes = (0,) if name == "BatchNorm" else (1,)
    eps = 1e-5 if name == "BatchNorm" else 1e-6
    ref = ref_standardize(x, axes, None, eps)[0]
    call = {"use_running_average": False} if name == "BatchNorm" else {}
    mutable = ["batch_stats"] if name == "BatchNorm" else False

    def run(module):
        v = jax.jit(functools.partial(module.init, **call))(KEY, x)
        out = jax.jit(functools.partial(module.apply, mutable=mutable, **call))(v, x)
        return out[0] if mutable else out

    ours = max_abs(run(getattr(jnl, name)()), ref)
    flax_default = max_abs(run(getattr(nn, name)()), ref)
    assert ours < 2e-2, ours
    assert flax_default > 0.5, flax_default


def test_use_running_average_field_or_call_not_both_nor_neither():
    x = jnp.ones((4, 3))
    v = jnl.BatchNorm(use_running_average=True).init(KEY, x)
    with pytest.raises(
        ValueError,
        match=r"`use_running_average` was passed both.*BatchNorm\(use_running_average=\.\.\.\).*bn\(x, use_running_average=\.\.\.\)",  # noqa: E501
    ):
        jnl.BatchNorm(use_running_average=True).apply(v, x, use_running_average=False)
    with pytest.raises(
        ValueError,
        match=r"passed neither.*BatchNorm\(use_running_average=\.\.\.\).*bn\(x, use_running_average=\.\.\.\)",
    ):
        jnl.BatchNorm().apply(v, x)
    with pytest.raises(ValueError, match="must be a static Python bool"):
        jax.jit(lambda v, x, t: jnl.BatchNorm().apply(v, x, use_running_average=t))(v, x, True)


def test_training_without_mutable_is_flax_error_and_init_never_updates():
    x = make_input((4, 3), 0)
    bn = jnl.BatchNorm(use_running_average=False)
    v = bn.init(KEY, x)
    chex.assert_trees_all_equal(
        v["batch_stats"], {"mean": jnp.zeros(3), "var": jnp.ones(3), "count": jnp.array(0, jnp.int32)}
    )
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
        bn.apply(v, x)
    # init with one example (flax allows it); training with one is an error.
    v1 = bn.init(KEY, x[:1])
    assert int(v1["batch_stats"]["count"]) == 0
    with pytest.raises(ValueError, match="more than one value per feature"):
        bn.apply(v1, x[:1], mutable=["batch_stats"])


def test_average_options_and_cumulative_restart():
    xs = [make_input((6, 2), s) for s in range(3)]
    bn = jnl.BatchNorm(use_running_average=False, unbiased=True, momentum=0.5)
    v = bn.init(KEY, xs[0])
    for x in xs:
        _, upd = bn.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
    mean, var = np.zeros(2), np.ones(2)
    for x in xs:
        mean = 0.5 * mean + 0.5 * x.astype(np.float64).mean(0)
        var = 0.5 * var + 0.5 * x.astype(np.float64).var(0, ddof=1)
    assert max_abs(v["batch_stats"]["mean"], mean) < 1e-5
    assert max_abs(v["batch_stats"]["var"], var) < 1e-5

    # The lower-level PreciseBN hook: fresh statistics + the cumulative field, same variables.
    fresh = jnl.fresh_batch_stats(v)
    chex.assert_trees_all_equal(fresh["batch_stats"]["count"], jnp.array(0, jnp.int32))
    v = {**v, **fresh}
    cumulative = bn.clone(average="cumulative")
    step = jax.jit(lambda v, x: cumulative.apply(v, x, mutable=["batch_stats"])[1])
    for x in xs:
        v = {**v, **step(v, x)}
    x_all = np.stack(xs).astype(np.float64)
    assert max_abs(v["batch_stats"]["mean"], x_all.mean(1).mean(0)) < 1e-5
    assert max_abs(v["batch_stats"]["var"], x_all.var(1, ddof=1).mean(0)) < 1e-5
    assert int(v["batch_stats"]["count"]) == 3
    with pytest.raises(ValueError, match="`average`='mean' is not one of"):
        bn.clone(average="mean").apply(v, xs[0], mutable=["batch_stats"])


def test_non_finite_batch_keeps_statistics():
    x = make_input((4, 3), 0)
    bn = jnl.BatchNorm(use_running_average=False)
    v = bn.init(KEY, x)
    _, v1 = bn.apply(v, x, mutable=["batch_stats"])
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    _, v2 = bn.apply({**v, **v1}, x_nan, mutable=["batch_stats"])
    chex.assert_trees_all_equal(v1, v2)
    # flax writes the NaN into its running statistics (a listed divergence).
    fbn = nn.BatchNorm(use_running_average=False)
    _, f2 = fbn.apply(fbn.init(KEY, x), x_nan, mutable=["batch_stats"])
    assert np.isnan(f2["batch_stats"]["mean"][0])


def test_dtypes_follow_flax():
    x = make_input((4, 3), 0).astype(jnp.bfloat16)
    for dtype, expected in ((None, jnp.float32), (jnp.bfloat16, jnp.bfloat16)):
        for name, kw in (("BatchNorm", {"use_running_average": True}), ("LayerNorm", {})):
            ours = jax.eval_shape(getattr(jnl, name)(dtype=dtype, **kw).init_with_output, KEY, x)
            theirs = jax.eval_shape(getattr(nn, name)(dtype=dtype, **kw).init_with_output, KEY, x)
            assert ours[0].dtype == theirs[0].dtype == expected
    v = jax.eval_shape(jnl.BatchNorm(use_running_average=False).init, KEY, x)
    assert v["batch_stats"]["mean"].dtype == jnp.float32


class _ScanCell(nn.Module):
    bn_cls: type

    @nn.compact
    def __call__(self, carry, x):
        y = self.bn_cls(use_running_average=False, momentum=0.5)(x + carry)
        return carry + 1.0, y


def _scan_model(bn_cls):
    # Per-time-step statistics (recurrent batch norm): batch_stats stacked over time.
    return nn.scan(
        _ScanCell,
        variable_broadcast="params",
        variable_axes={"batch_stats": 0},
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
    )(bn_cls)


def test_transforms_scan_remat_vmap_jit_match_flax():
    xs = make_input((4, 6, 3), 5)  # (time, batch, features)
    outs = {}
    for lib, cls in (("flax", nn.BatchNorm), ("ours", jnl.BatchNorm)):
        kw = {"use_fast_variance": False} if lib == "flax" else {}
        res = {}
        # nn.scan over time, statistics carried from step to step.
        scan = _scan_model(functools.partial(cls, **kw))
        v = jax.jit(scan.init)(KEY, 0.0, xs)
        (_, ys), upd = jax.jit(lambda v, x: scan.apply(v, 0.0, x, mutable=["batch_stats"]))(v, xs)  # noqa: B023
        stats = upd["batch_stats"]["BatchNorm_0"]
        assert stats["mean"].shape == (4, 3)
        res["scan"] = (ys, {k: stats[k] for k in ("mean", "var")})
        # nn.remat.
        remat = nn.remat(cls)(use_running_average=False, **kw)
        v = remat.init(KEY, xs[0])
        g = jax.grad(lambda p, x: jnp.sum(remat.apply({**v, "params": p}, x, mutable=["batch_stats"])[0] ** 3))(  # noqa: B023
            v["params"], xs[0]
        )
        res["remat"] = g
        # nn.vmap over an ensemble axis: each member its own parameters and statistics.
        vm = nn.vmap(
            cls, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0
        )(use_running_average=False, **kw)
        v = jax.jit(vm.init)(KEY, xs)
        y, upd = jax.jit(lambda v, x: vm.apply(v, x, mutable=["batch_stats"]))(v, xs)  # noqa: B023
        res["vmap"] = (y, {k: upd["batch_stats"][k] for k in ("mean", "var")})
        outs[lib] = res
    chex.assert_trees_all_close(outs["ours"], outs["flax"], atol=5e-5, rtol=1e-5)


def test_vmap_axis_name_synchronizes_like_whole_batch():
    x = make_input((6, 3), 5)
    ys = {}
    for lib, cls in (("flax", nn.BatchNorm), ("ours", jnl.BatchNorm)):
        kw = {"use_fast_variance": False} if lib == "flax" else {}
        vm = nn.vmap(
            cls, variable_axes={"params": None, "batch_stats": None}, split_rngs={"params": False}, axis_name="batch"
        )(use_running_average=False, axis_name="batch", **kw)
        v = vm.init(KEY, x)
        ys[lib], _ = vm.apply(v, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(ys["ours"], ys["flax"], atol=2e-5)
    assert max_abs(ys["ours"], ref_standardize(x, (0,), None, 1e-5)[0]) < 2e-5


def test_serialization_round_trip_and_flax_checkpoint_loading():
    x = make_input((6, 4, 4, 3), 0)
    model = jnl.BatchNorm(use_running_average=False, momentum=0.7)
    v = model.init(KEY, x)
    for s in range(2):
        _, upd = model.apply(v, make_input(x.shape, s), mutable=["batch_stats"])
        v = {**v, **upd}
    evaluate = jnl.BatchNorm(use_running_average=True)
    y = evaluate.apply(v, x)
    restored = serialization.from_bytes(jax.tree.map(jnp.zeros_like, v), serialization.to_bytes(v))
    chex.assert_trees_all_equal(restored, v)
    chex.assert_trees_all_equal(evaluate.apply(restored, x), y)
    state = serialization.to_state_dict(v)
    assert set(state["batch_stats"]) == {"mean", "var", "count"}
    chex.assert_trees_all_equal(evaluate.apply(serialization.from_state_dict(v, state), x), y)

    # A checkpoint of flax's own BatchNorm (no count) loads with one call, in a nested model.
    class Net(nn.Module):
        bn: type

        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            x = self.bn(
                use_running_average=not train, **({"use_fast_variance": False} if self.bn is nn.BatchNorm else {})
            )(x)
            return nn.Dense(2)(x)

    flax_net, our_net = Net(nn.BatchNorm), Net(jnl.BatchNorm)
    fv = flax_net.init(KEY, x[:, 0, 0], train=False)
    _, upd = flax_net.apply(fv, x[:, 0, 0], train=True, mutable=["batch_stats"])
    fv = {**fv, **upd}
    blob = serialization.to_bytes(fv)
    loaded = jnl.from_flax_variables(serialization.msgpack_restore(blob))
    assert int(loaded["batch_stats"]["BatchNorm_0"]["count"]) == 0
    chex.assert_trees_all_close(
        our_net.apply(loaded, x[:, 0, 0], train=False), flax_net.apply(fv, x[:, 0, 0], train=False), atol=1e-6
    )
    assert jax.tree.structure(loaded) == jax.tree.structure(our_net.init(KEY, x[:, 0, 0], train=False))


def test_wrappers_hold_no_formula():
    """The Flax sides (jaxnorm/_linen, jaxnorm/_nnx, their shared module): no arithmetic, no jnp/lax math,
    one core call per __call__."""
    import ast
    import pathlib

    import jaxnorm

    root = pathlib.Path(jaxnorm.__file__).parent
    core = {"batch_norm", "batch_renorm", "layer_norm", "rms_norm", "group_norm", "instance_norm"}
    allowed_jnp = {"asarray", "shape", "result_type", "zeros_like", "float32", "int32"}
    arithmetic = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.FloorDiv, ast.MatMult, ast.Mod)
    for side in ("_linen", "_nnx"):
        # every file of the Flax side: parameter shapes too (4 * features, a u of (1, out)) come from the core
        files = sorted((root / side).glob("*.py")) + [root / "_flax_common.py", root / f"{side[1:]}.py"]
        assert len(files) > 10, files
        layers = []
        for path in files:
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                assert not (isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, arithmetic)), (
                    path, ast.unparse(node))
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in ("jnp", "lax", "np", "numpy", "math")
                ):
                    assert node.attr in allowed_jnp, (path, ast.unparse(node))
            layers += [
                n
                for n in tree.body
                if isinstance(n, ast.ClassDef)
                and n.name in ("BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
            ]
        assert len(layers) == 6, side
        for cls in layers:
            call = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__call__")
            # one core function per layer, called or handed to the shared batch-norm body
            calls = [n.id for n in ast.walk(call) if isinstance(n, ast.Name) and n.id in core]
            assert len(calls) == 1, (side, cls.name, calls)
