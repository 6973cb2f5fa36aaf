"""Weight normalization and weight standardization: core, linen and NNX.

References: float64 NumPy of Salimans & Kingma's ``g * v / ||v||`` and of Qiao
et al.'s ``(w - mean) / sqrt(var + eps)``; flax.linen's and flax.nnx's own
``WeightNorm`` (same variables after init, same outputs and gradients over
several SGD steps, Dense and Conv, float32 and bfloat16).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jl
import jaxnorm.nnx as jx

KEY = jax.random.key(0)
STEPS = 3


def ref_weight_norm(v, g=None, feature_axes=(-1,), eps=1e-12):
    v = np.asarray(v, np.float64)
    feat = {a % v.ndim for a in feature_axes}
    red = tuple(a for a in range(v.ndim) if a not in feat)
    out = v / np.sqrt((v**2).sum(axis=red, keepdims=True) + eps)
    if g is not None:
        out = out * np.asarray(g, np.float64).reshape([v.shape[a] if a in feat else 1 for a in range(v.ndim)])
    return out


def ref_standardize(w, feature_axes=(-1,), eps=1e-5):
    w = np.asarray(w, np.float64)
    feat = {a % w.ndim for a in feature_axes}
    red = tuple(a for a in range(w.ndim) if a not in feat)
    mean = w.mean(axis=red, keepdims=True)
    var = ((w - mean) ** 2).mean(axis=red, keepdims=True)
    return (w - mean) / np.sqrt(var + eps)


def rand(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# --- core -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,feature_axes",
    [((5, 4), -1), ((3, 3, 2, 6), -1), ((6, 2, 3, 3), 0), ((3, 4, 5), (0, 2)), ((4, 3), None), ((4, 3), ())],
)
def test_weight_norm_matches_numpy(transform, shape, feature_axes):
    v = rand(shape)
    fa = () if feature_axes is None else ((feature_axes,) if isinstance(feature_axes, int) else feature_axes)
    g = rand(tuple(shape[a] for a in sorted(a % len(shape) for a in fa)), 1) if fa else rand((), 1)
    out = transform(lambda v, g: jn.weight_norm(v, g, feature_axes=feature_axes))(v, g)
    np.testing.assert_allclose(out, ref_weight_norm(v, g, fa), rtol=2e-6, atol=1e-7)
    # PyTorch's keepdims scale (e.g. (C, 1, 1, 1)) gives the same
    keep = tuple(shape[a] if a in {x % len(shape) for x in fa} else 1 for a in range(len(shape)))
    np.testing.assert_allclose(jn.weight_norm(v, g.reshape(keep), feature_axes=feature_axes), out, rtol=1e-6)
    if fa:
        norms = np.sqrt((np.asarray(jn.weight_norm(v, feature_axes=feature_axes), np.float64) ** 2).sum(
            axis=tuple(a for a in range(len(shape)) if a not in {x % len(shape) for x in fa})))
        np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape,feature_axes", [((5, 4), -1), ((3, 3, 2, 6), -1), ((6, 2, 3, 3), 0)])
def test_weight_standardize_matches_numpy(transform, shape, feature_axes):
    w = rand(shape) * 3.0 + 2.0
    out = transform(lambda w: jn.weight_standardize(w, feature_axes=feature_axes))(w)
    np.testing.assert_allclose(out, ref_standardize(w, (feature_axes,)), rtol=1e-5, atol=1e-6)
    red = tuple(a for a in range(len(shape)) if a != feature_axes % len(shape))
    o = np.asarray(out, np.float64)
    np.testing.assert_allclose(o.mean(axis=red), 0.0, atol=1e-6)
    np.testing.assert_allclose(o.var(axis=red), 1.0, rtol=1e-4)


def test_bfloat16_accumulates_in_float32_and_keeps_dtype():
    v = rand((64, 8), dtype=jnp.bfloat16)
    for out, ref, dtype in (
        (jn.weight_norm(v), ref_weight_norm(v), jnp.bfloat16),
        (jn.weight_standardize(v), ref_standardize(v), jnp.bfloat16),
        (jn.weight_norm(v, dtype=jnp.float32), ref_weight_norm(v), jnp.float32),
    ):
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_gradients_match_numpy():
    v, g, r = rand((5, 3)), rand((3,), 1) + 2.0, rand((5, 3), 2)
    dv, dg = jax.grad(lambda v, g: jnp.sum(jn.weight_norm(v, g) * r), argnums=(0, 1))(v, g)
    v64, g64, r64 = (np.asarray(a, np.float64) for a in (v, g, r))
    n = np.sqrt((v64**2).sum(0))
    # Salimans & Kingma eq. (3): grad_g = (grad_w . v) / ||v||, grad_v = g/||v|| (grad_w - grad_g v/||v||)
    grad_g = (r64 * v64).sum(0) / n
    grad_v = g64 / n * (r64 - grad_g * v64 / n)
    np.testing.assert_allclose(dg, grad_g, rtol=1e-5)
    np.testing.assert_allclose(dv, grad_v, rtol=1e-5, atol=1e-6)
    # weight standardization: projection off the mean and off w_hat, scaled by 1/std
    w = rand((6, 3)) * 2 + 1
    dw = jax.grad(lambda w: jnp.sum(jn.weight_standardize(w, epsilon=0.0) * r[:, :3].repeat(2, 0)[:6]))(w)
    w64, rr = np.asarray(w, np.float64), np.asarray(r[:, :3].repeat(2, 0)[:6], np.float64)
    s = w64.std(0)
    wh = (w64 - w64.mean(0)) / s
    ref = (rr - rr.mean(0) - wh * (rr * wh).mean(0)) / s
    np.testing.assert_allclose(dw, ref, rtol=1e-4, atol=1e-5)


def test_vmap_and_forward_mode():
    v, t = rand((4, 5, 3)), rand((4, 5, 3), 3)
    chex.assert_trees_all_close(jax.vmap(jn.weight_norm)(v), jnp.stack([jn.weight_norm(a) for a in v]), rtol=1e-6)
    chex.assert_trees_all_close(jax.vmap(jn.weight_standardize)(v), jnp.stack([jn.weight_standardize(a) for a in v]),
                                rtol=1e-6)
    for f in (jn.weight_norm, jn.weight_standardize):
        def loss(a, f=f):
            return jnp.sum(jnp.sin(f(a)))

        _, tangent = jax.jvp(loss, (v[0],), (t[0],))
        grad = jax.grad(loss)(v[0])
        np.testing.assert_allclose(tangent, jnp.sum(grad * t[0]), rtol=1e-4)


def test_traced_epsilon():
    v = rand((4, 3))
    out = jax.jit(lambda v, e: jn.weight_norm(v, epsilon=e))(v, 1e-12)
    np.testing.assert_allclose(out, ref_weight_norm(v), rtol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jn.weight_norm(jnp.ones((3, 4)), feature_axes=2), r"weight_norm: `feature_axes`=2 is out of range"),
        (lambda: jn.weight_norm(jnp.ones((3, 4)), feature_axes=(1, -1)), r"names an axis more than once"),
        (lambda: jn.weight_norm(jnp.ones((3, 4)), feature_axes=1.0), r"must be an int, a tuple of ints or None"),
        (lambda: jn.weight_norm(jnp.ones((3, 4)), jnp.ones(3)), r"`scale` has shape \(3,\).*pass a \(4,\) array"),
        (lambda: jn.weight_norm(jnp.ones((3, 4), jnp.int32)), r"`kernel` must have a real floating dtype"),
        (lambda: jn.weight_norm(jnp.ones((3, 4)), epsilon=-1.0), r"`epsilon` must be a finite number >= 0"),
        (lambda: jn.weight_standardize(jnp.ones((3, 4)), feature_axes=(0, 1)), r"leaving no fan-in"),
        (lambda: jn.weight_standardize(jnp.ones((3, 4)), feature_axes=-3), r"weight_standardize: `feature_axes`=-3"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- linen --------------------------------------------------------------------------------


def _linen_model(wrapper, layer, dtype, **kw):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(3, param_dtype=dtype)(x.reshape(x.shape[0], -1)[:, :4]) if layer == "mlp" else x
            inner = nn.Dense(5, param_dtype=dtype) if layer != "conv" else nn.Conv(5, (3, 3), param_dtype=dtype)
            return wrapper(inner, param_dtype=dtype, **kw)(x)

    return Model()


def _sgd_steps(model, variables, x, steps=STEPS):
    """Outputs, gradients and variables along a few SGD steps of sum(y**2)."""
    def loss(p, variables):
        y = model.apply({**variables, "params": p}, x)
        return jnp.sum(jnp.asarray(y, jnp.float32) ** 2), y

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    trace = []
    for _ in range(steps):
        (_, y), grads = step(variables["params"], variables)
        trace.append((y, grads))
        variables = {**variables, "params": jax.tree.map(lambda p, g: p - 1e-2 * g.astype(p.dtype), variables["params"],
                                                         grads)}
    return trace, variables


F32, BF16 = jnp.float32, jnp.bfloat16
LINEN_CASES = [
    ("dense", F32, {}), ("conv", F32, {}), ("mlp", F32, {}), ("dense", BF16, {}), ("conv", BF16, {}),
    ("dense", F32, {"variable_filter": None}), ("conv", F32, {"feature_axes": None}),
    ("conv", F32, {"use_scale": False}),
]


@pytest.mark.parametrize("layer,dtype,kw", LINEN_CASES)
def test_linen_weight_norm_matches_flax(layer, dtype, kw):
    x = rand((2, 6, 6, 2) if layer == "conv" else (4, 4), 5)
    ours, theirs = _linen_model(jl.WeightNorm, layer, dtype, **kw), _linen_model(nn.WeightNorm, layer, dtype, **kw)
    v_ours, v_theirs = ours.init(KEY, x), theirs.init(KEY, x)
    # same tree and dtypes; flax's init stores the normalized kernel (map_variables), computed in
    # bfloat16 by flax and in float32 here: 1-2 bfloat16 ulps apart
    chex.assert_trees_all_equal_dtypes(v_ours, v_theirs)
    chex.assert_trees_all_close(v_ours, v_theirs, **({"rtol": 0, "atol": 0} if dtype == F32 else {"rtol": 1e-2}))
    if dtype == BF16:
        # flax reduces the bfloat16 kernel's norm in bfloat16, jaxnorm in float32: compare both
        # with the float32 model on the same (bfloat16-valued) variables; jaxnorm must be as close
        ref = _linen_model(nn.WeightNorm, layer, F32, **kw)
        v32 = jax.tree.map(lambda a: a.astype(F32), v_theirs)
        (t_ref,), _ = _sgd_steps(ref, v32, x, 1)
        (t_ours,), _ = _sgd_steps(ours, v_ours, x, 1)
        (t_theirs,), _ = _sgd_steps(theirs, v_theirs, x, 1)
        err = lambda t: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
            lambda a, b: float(jnp.max(jnp.abs(a.astype(F32) - b)) / (jnp.max(jnp.abs(b)) + 1e-6)), t, t_ref)))
        assert err(t_ours) <= 1.05 * err(t_theirs) + 1e-3, (err(t_ours), err(t_theirs))
        assert err(t_ours) < 5e-2
        return
    t_ours, end_ours = _sgd_steps(ours, v_ours, x)
    t_theirs, end_theirs = _sgd_steps(theirs, v_theirs, x)
    tol = {"rtol": 0, "atol": 0}
    if kw.get("variable_filter", 1) is None:
        tol = {"rtol": 1e-6, "atol": 1e-7}  # 1-D biases: x * rsqrt(x*x) where XLA may fuse differently
    chex.assert_trees_all_close(t_ours, t_theirs, **tol)
    chex.assert_trees_all_close(end_ours, end_theirs, **tol)
    # and the checkpoint interchanges: flax's variables in our model give flax's output
    chex.assert_trees_all_close(ours.apply(end_theirs, x), theirs.apply(end_theirs, x), **tol)


def test_linen_weight_standardization():
    x = rand((2, 6, 6, 3), 4)

    class Model(nn.Module):
        standardize: bool

        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(4, (3, 3))
            return jl.WeightStandardization(conv)(x) if self.standardize else conv(x)

    model, plain = Model(True), Model(False)
    variables = jax.jit(model.init)(KEY, x)
    assert jax.tree.structure(variables) == jax.tree.structure(plain.init(KEY, x))  # no variables of its own
    k = variables["params"]["Conv_0"]["kernel"]
    std = {"params": {"Conv_0": {**variables["params"]["Conv_0"], "kernel": jnp.asarray(ref_standardize(k), F32)}}}
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x), plain.apply(std, x), rtol=1e-4, atol=1e-5)
    jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x))))(variables)


# --- nnx ----------------------------------------------------------------------------------


def _nnx_pair(make_layer, **kw):
    r1, r2 = nnx.Rngs(0), nnx.Rngs(0)
    return jx.WeightNorm(make_layer(r1), rngs=r1, **kw), nnx.WeightNorm(make_layer(r2), rngs=r2, **kw)


def _values(model):
    return {path: jnp.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(nnx.state(model))}


LAYERS = {
    "linear": (lambda r, d: nnx.Linear(4, 5, param_dtype=d, rngs=r), (3, 4)),
    "conv": (lambda r, d: nnx.Conv(2, 5, (3, 3), param_dtype=d, rngs=r), (2, 6, 6, 2)),
}


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_weight_norm_matches_flax(layer, dtype):
    make, shape = LAYERS[layer]
    ours, theirs = _nnx_pair(lambda r: make(r, dtype))
    assert _values(ours).keys() == _values(theirs).keys()  # same paths: scales[('kernel',)], layer_instance/...
    chex.assert_trees_all_equal(_values(ours), _values(theirs))
    x = rand(shape, 5)
    tol = {"rtol": 0, "atol": 0} if dtype == jnp.float32 else {"rtol": 5e-2, "atol": 1e-1}
    if dtype == jnp.bfloat16:  # norms reduced in float32 here, bfloat16 in flax: the outputs only
        chex.assert_trees_all_close(ours(x), theirs(x), rtol=5e-2, atol=1e-1)
        return
    for _ in range(STEPS):
        raw = theirs.layer_instance.kernel.get_value()
        grads_ours = nnx.grad(lambda m: jnp.sum(jnp.asarray(m(x), jnp.float32) ** 2))(ours)
        grads_theirs = nnx.grad(lambda m: jnp.sum(jnp.asarray(m(x), jnp.float32) ** 2))(theirs)
        # flax.nnx writes the normalized kernel into the layer (jaxnorm does not); undo it
        theirs.layer_instance.kernel.set_value(raw)
        go, gt = _values(grads_ours), _values(grads_theirs)
        assert set(gt) < set(go) and ("scales", ("kernel",)) in go  # flax's scales are not Params, ours train
        chex.assert_trees_all_close({k: go[k] for k in gt}, gt, **tol)
        for model, grads in ((ours, grads_ours), (theirs, grads_theirs)):
            for path, var in nnx.to_flat_state(nnx.state(model.layer_instance, nnx.Param)):
                g = nnx.state(grads.layer_instance, nnx.Param)
                g = dict(nnx.to_flat_state(g))[path].get_value()
                var.set_value(var.get_value() - 1e-2 * g.astype(var.dtype))
        chex.assert_trees_all_close(_values(ours.layer_instance), _values(theirs.layer_instance), **tol)
    chex.assert_trees_all_close(ours(x), theirs(x), **tol)


def test_nnx_weight_norm_keeps_the_raw_kernel_and_trains_scales():
    rngs = nnx.Rngs(0)
    model = jx.WeightNorm(nnx.Linear(4, 3, rngs=rngs), rngs=rngs)
    raw = model.layer_instance.kernel.get_value()
    x = rand((2, 4))
    y = model(x)
    np.testing.assert_array_equal(model.layer_instance.kernel.get_value(), raw)
    np.testing.assert_allclose(y, x @ ref_weight_norm(raw), rtol=1e-5, atol=1e-6)
    y_jit = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(y_jit, y, rtol=1e-6)
    np.testing.assert_array_equal(model.layer_instance.kernel.get_value(), raw)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    assert np.abs(np.asarray(grads.scales[("kernel",)].get_value())).sum() > 0


def test_nnx_weight_standardization():
    rngs = nnx.Rngs(0)
    model = jx.WeightStandardization(nnx.Conv(2, 4, (3, 3), rngs=rngs))
    x = rand((2, 6, 6, 2), 3)
    k = model.layer_instance.kernel.get_value()
    plain = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
    plain.kernel.set_value(jnp.asarray(ref_standardize(k), jnp.float32))
    np.testing.assert_allclose(model(x), plain(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(model.layer_instance.kernel.get_value(), k)
    nnx.grad(lambda m: jnp.sum(m(x)))(model)
