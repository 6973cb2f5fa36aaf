"""jaxnorm.nnx against flax.nnx itself and a float64 NumPy reference."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
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

import jaxnorm.nnx as jnx

STEPS = 3
MOMENTUM = 0.8


def _pure(module):
    return nnx.to_pure_dict(nnx.state(module))


def _randomize(module, seed):
    rng = np.random.default_rng(seed)
    for name in ("scale", "bias"):
        var = getattr(module, name, None)
        if var is not None:
            var[...] = jnp.asarray(rng.uniform(0.5, 1.5, var[...].shape), var[...].dtype)


@nnx.jit
def _call(model, x, mask):
    return model(x, mask=mask)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_norm_matches_flax_and_reference(layout):
    shape, axis, mask_shape = LAYOUTS[layout]
    c = shape[axis]
    xs = [make_input(shape, s) for s in range(STEPS)]
    masks = [make_mask(mask_shape, s) for s in range(STEPS)]
    theirs = nnx.BatchNorm(c, axis=axis, momentum=MOMENTUM, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = jnx.BatchNorm(c, axis=axis, momentum=MOMENTUM, rngs=nnx.Rngs(0))
    expected = _pure(theirs)
    expected["count"] = jnp.array(0, jnp.int32)
    chex.assert_trees_all_equal(_pure(ours), expected)
    _randomize(theirs, 3)
    _randomize(ours, 3)

    red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    where = tuple(shape[a] if a not in red else 1 for a in range(len(shape)))
    mean, var = np.zeros(where), np.ones(where)
    for x, m in zip(xs, masks):
        y_theirs, y_ours = _call(theirs, x, m), _call(ours, x, m)
        chex.assert_trees_all_close(y_ours, y_theirs, atol=2e-5, rtol=1e-5)
        chex.assert_trees_all_close(
            (ours.mean[...], ours.var[...]), (theirs.mean[...], theirs.var[...]), atol=1e-5, rtol=1e-5
        )
        x_hat, bm, bv = ref_standardize(x, red, m, 1e-5)
        y_ref = x_hat * np.reshape(ours.scale[...], where) + np.reshape(ours.bias[...], where)
        assert max_abs(y_ours, y_ref) < 2e-5
        mean, var = MOMENTUM * mean + (1 - MOMENTUM) * bm, MOMENTUM * var + (1 - MOMENTUM) * bv
    assert max_abs(ours.mean[...], mean.reshape(-1)) < 1e-5
    assert max_abs(ours.var[...], var.reshape(-1)) < 1e-5
    assert int(ours.count[...]) == STEPS
    theirs.eval()
    ours.eval()
    x_eval = make_input(shape, 99)
    chex.assert_trees_all_close(_call(ours, x_eval, None), _call(theirs, x_eval, None), atol=2e-5, rtol=1e-5)
    assert int(ours.count[...]) == STEPS


@pytest.mark.parametrize(
    "layout,name",
    [(layout, name) for layout, layers in STATELESS.items() for name in layers],
)
def test_stateless_layers_match_flax_and_reference(layout, name):
    shape, _, mask_shape = LAYOUTS[layout]
    kwargs, reduced, param_axes, groups = STATELESS[layout][name]
    c = shape[param_axes[0]]
    x = make_input(shape, 3)
    mask = None
    if mask_shape is not None:
        mask = (
            feature_mask(shape, 3)
            if name in ("LayerNorm", "RMSNorm")
            else np.broadcast_to(make_mask(mask_shape, 3), shape)
        )
    theirs = getattr(nnx, name)(c, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    ours = getattr(jnx, name)(c, rngs=nnx.Rngs(0), **kwargs)
    chex.assert_trees_all_equal(_pure(ours), _pure(theirs))
    y_ref = ref_stateless(x, name, reduced, groups, 1e-6, mask)
    assert max_abs(_call(ours, x, mask), y_ref) < 2e-5
    _randomize(theirs, 5)
    _randomize(ours, 5)
    chex.assert_trees_all_close(_call(ours, x, mask), _call(theirs, x, mask), atol=2e-5, rtol=1e-5)


def test_group_norm_per_time_step_is_right_where_flax_nnx_is_not():
    # (B, T, C) with reduction_axes=(-1,): each time step normalized on its own.
    x = make_input((3, 5, 6), 4)
    ref = ref_stateless(x, "GroupNorm", (2,), 2, 1e-6)
    ours = jnx.GroupNorm(6, num_groups=2, reduction_axes=(-1,), rngs=nnx.Rngs(0))
    assert max_abs(_call(ours, x, None), ref) < 2e-5
    # flax.nnx 0.12.8 repeats the group statistics along the wrong axis
    # (jnp.repeat(..., axis=1) where the groups are on the last axis); measured
    # in the README's divergence list. Only recorded here, not asserted, so a
    # fixed flax does not break this test.
    theirs = nnx.GroupNorm(6, num_groups=2, reduction_axes=(-1,), use_fast_variance=False, rngs=nnx.Rngs(0))
    print("flax.nnx GroupNorm reduction_axes=(-1,) max error:", max_abs(_call(theirs, x, None), ref))


def test_large_offset_flax_default_breaks_ours_does_not():
    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 8))).astype(np.float32)
    ref = ref_standardize(x, (0,), None, 1e-5)[0]
    ours = max_abs(_call(jnx.BatchNorm(8, rngs=nnx.Rngs(0)), x, None), ref)
    flax_default = max_abs(_call(nnx.BatchNorm(8, rngs=nnx.Rngs(0)), x, None), ref)
    assert ours < 2e-2, ours
    assert flax_default > 0.5, flax_default


def test_train_eval_view_and_call_precedence():
    x = make_input((8, 3), 0)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)
            self.bn = jnx.BatchNorm(3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    net = Net(nnx.Rngs(0))
    assert net.bn.use_running_average is False
    net.eval()
    assert net.bn.use_running_average is True and net.drop.deterministic is True
    net.bn(x)
    assert int(net.bn.count[...]) == 0
    net.bn(x, use_running_average=False)  # call time wins, as in flax
    assert int(net.bn.count[...]) == 1
    net.train()
    assert net.bn.use_running_average is False
    view = nnx.view(net, use_running_average=True)
    assert view.bn.use_running_average is True and net.bn.use_running_average is False
    bn = jnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"`use_running_average` was passed neither.*model.eval\(\).*bn\(x, use_running_average=\.\.\.\)",
    ):
        bn(x)


def test_cnn_train_step_with_optax_matches_flax():
    class CNN(nnx.Module):
        def __init__(self, lib, rngs):
            extra = {"use_fast_variance": False} if lib is nnx else {}
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = lib.BatchNorm(4, momentum=0.9, rngs=rngs, **extra)
            self.gn = lib.GroupNorm(4, num_groups=2, rngs=rngs, **extra)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv(x)))
            x = self.gn(x)
            return self.head(x.mean((1, 2)))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 8)

    @nnx.jit
    def train_step(model, opt, x, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = {}
    for lib in (nnx, jnx):
        model = CNN(lib, nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        losses[lib.__name__] = [float(train_step(model, opt, x, labels)) for _ in range(3)]
        model.eval()
        losses[lib.__name__].append(
            float(optax.softmax_cross_entropy_with_integer_labels(nnx.jit(lambda m, x: m(x))(model, x), labels).mean())
        )
    np.testing.assert_allclose(losses["jaxnorm.nnx"], losses["flax.nnx"], rtol=1e-5)
    assert losses["jaxnorm.nnx"][2] < losses["jaxnorm.nnx"][0]


def test_scan_split_merge_and_serialization():
    xs = make_input((4, 6, 3), 1)  # (time, batch, features)
    bn = jnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    loop = nnx.clone(bn)
    ys_loop = [loop(x) for x in xs]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def run(model, x):
        return model, model(x)

    _, ys = run(bn, xs)
    chex.assert_trees_all_close(ys, jnp.stack(ys_loop), atol=1e-6)
    chex.assert_trees_all_close(_pure(bn), _pure(loop), atol=1e-6)
    assert int(bn.count[...]) == 4

    graphdef, state = nnx.split(bn)
    back = nnx.merge(graphdef, state)
    back.eval()
    bn.eval()
    chex.assert_trees_all_equal(back(xs[0]), bn(xs[0]))

    pure = _pure(bn)
    blob = serialization.to_bytes(pure)
    fresh = jnx.BatchNorm(3, momentum=0.5, use_running_average=True, rngs=nnx.Rngs(1))
    restored = serialization.from_bytes(_pure(fresh), blob)
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(fresh, state)
    chex.assert_trees_all_equal(fresh(xs[0]), bn(xs[0]))
    chex.assert_trees_all_equal(_pure(fresh), pure)


def test_flax_nnx_checkpoint_loads_and_recalibration_hook():
    x = make_input((8, 3), 2)
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    theirs(x)
    ours = jnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs))  # no count in flax's state: ours keeps its own
    theirs.eval()
    chex.assert_trees_all_close(ours(x), theirs(x), atol=1e-6)
    assert int(ours.count[...]) == 0

    # PreciseBN: fresh statistics, cumulative averaging, same model.
    xs = [make_input((8, 3), s) for s in range(3)]
    jnx.reset_batch_stats(ours)
    view = nnx.view(ours, average="cumulative", use_running_average=False)
    for b in xs:
        view(b)
    all_x = np.stack(xs).astype(np.float64)
    assert max_abs(ours.mean[...], all_x.mean(1).mean(0)) < 1e-5
    assert max_abs(ours.var[...], all_x.var(1).mean(0)) < 1e-5
    assert ours.average == "ema" and int(ours.count[...]) == 3
