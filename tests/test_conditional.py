"""Per-example (conditional) scale and bias in every norm, AdaIN, and the conditional Flax layers.

References are the papers' formulas in float64, written here in plain NumPy /
jax.numpy (independent of jaxnorm); gradients come from autodiff of those
formulas.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx


def data(shape, seed=0, loc=0.5):
    return (loc + 2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def standardize_ref(x, axes, eps, mask=None):
    """(x - mean) / sqrt(var + eps), biased variance over the valid values of ``axes``."""
    w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    xz = jnp.where(w > 0, x, 0.0)
    n = jnp.sum(w, axes, keepdims=True)
    mean = jnp.sum(xz, axes, keepdims=True) / n
    var = jnp.sum(jnp.where(w > 0, (xz - mean) ** 2, 0.0), axes, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + eps)


def group_ref(x, groups, channel_axis, eps):
    c = channel_axis % x.ndim
    split = x.shape[:c] + (groups, x.shape[c] // groups) + x.shape[c + 1:]
    axes = tuple(a for a in range(1, x.ndim + 1) if a != c)
    return standardize_ref(x.reshape(split), axes, eps).reshape(x.shape)


def renorm_ref(x, stats, s, b, axes, eps, r_max, d_max):
    """Ioffe 2017: s * (x_hat * r + d) + b with r, d from the running statistics, treated as constants."""
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axes, keepdims=True)
    shape = [1] * x.ndim
    shape[-1] = x.shape[-1]
    rm, rv = (jnp.reshape(a, shape).astype(x.dtype) for a in (stats.mean, stats.var))
    r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var + eps) / jnp.sqrt(rv + eps), 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - rm) / jnp.sqrt(rv + eps), -d_max, d_max))
    return s * ((x - mean) / jnp.sqrt(var + eps) * r + d) + b


def running_stats(c, seed=9):
    rng = np.random.default_rng(seed)
    return jn.BatchStats(jnp.asarray(rng.standard_normal(c), jnp.float32),
                         jnp.asarray(rng.uniform(0.5, 3.0, c), jnp.float32), jnp.zeros((), jnp.int32))


RUN = running_stats(4)


def bn(x, s, b, **kw):
    return jn.batch_norm(x, jn.init_batch_stats(x.shape[kw.get("axis", -1)]), s, b, training=True, **kw)[0]


# (id, x shape, param shape, jaxnorm call, reference, uses the fused op)
CASES = [
    ("batch_norm_nhwc", (6, 3, 3, 4), (6, 1, 1, 4), lambda x, s, b: bn(x, s, b),
     lambda x, s, b: standardize_ref(x, (0, 1, 2), 1e-5) * s + b, True),
    ("batch_norm_nchw", (6, 4, 3, 3), (6, 4, 1, 1), lambda x, s, b: bn(x, s, b, axis=1),
     lambda x, s, b: standardize_ref(x, (0, 2, 3), 1e-5) * s + b, True),
    ("batch_norm_spatial_param", (4, 3, 2, 5), (1, 3, 1, 5), lambda x, s, b: bn(x, s, b),
     lambda x, s, b: standardize_ref(x, (0, 1, 2), 1e-5) * s + b, True),
    ("batch_norm_ghost", (6, 3, 4), (6, 1, 4), lambda x, s, b: bn(x, s, b, ghost_batch_size=3),
     lambda x, s, b: standardize_ref(x.reshape(2, 3, 3, 4), (1, 2), 1e-5).reshape(x.shape) * s + b, True),
    ("batch_norm_eval", (5, 3, 4), (5, 1, 4),
     lambda x, s, b: jn.batch_norm(x, RUN, s, b, training=False)[0],
     lambda x, s, b: (x - RUN.mean.astype(x.dtype)) / jnp.sqrt(RUN.var.astype(x.dtype) + 1e-5) * s + b,
     False),
    ("batch_renorm_nhwc", (6, 3, 4), (6, 1, 4),
     lambda x, s, b: jn.batch_renorm(x, running_stats(4), s, b, training=True, r_max=1.5, d_max=0.5)[0],
     lambda x, s, b: renorm_ref(x, running_stats(4), s, b, (0, 1), 1e-5, 1.5, 0.5), True),
    ("layer_norm_sequence", (3, 5, 4), (3, 1, 4), lambda x, s, b: jn.layer_norm(x, s, b),
     lambda x, s, b: standardize_ref(x, (2,), 1e-6) * s + b, True),
    ("layer_norm_feature_axes", (3, 4, 2, 2), (3, 4, 1, 1),
     lambda x, s, b: jn.layer_norm(x, s, b, axis=(1, 2, 3), feature_axes=1),
     lambda x, s, b: standardize_ref(x, (1, 2, 3), 1e-6) * s + b, True),
    ("rms_norm_sequence", (3, 5, 4), (3, 1, 4), lambda x, s, b: jn.rms_norm(x, s) + b,
     lambda x, s, b: x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s + b, True),
    ("group_norm_nhwc", (4, 3, 3, 8), (4, 1, 1, 8), lambda x, s, b: jn.group_norm(x, s, b, num_groups=2),
     lambda x, s, b: group_ref(x, 2, -1, 1e-6) * s + b, True),
    ("group_norm_nchw", (4, 8, 3, 3), (4, 8, 1, 1),
     lambda x, s, b: jn.group_norm(x, s, b, num_groups=4, channel_axis=1),
     lambda x, s, b: group_ref(x, 4, 1, 1e-6) * s + b, True),
    ("instance_norm_nhwc", (4, 3, 3, 5), (4, 1, 1, 5), lambda x, s, b: jn.instance_norm(x, s, b),
     lambda x, s, b: standardize_ref(x, (1, 2), 1e-6) * s + b, True),
    ("instance_norm_nchw", (4, 5, 3, 3), (4, 5, 1, 1), lambda x, s, b: jn.instance_norm(x, s, b, channel_axis=1),
     lambda x, s, b: standardize_ref(x, (2, 3), 1e-6) * s + b, True),
    ("normalize", (4, 3, 5), (4, 1, 5), lambda x, s, b: jn.normalize(x, 0.25, 2.0, s, b, epsilon=1e-3),
     lambda x, s, b: (x - 0.25) / jnp.sqrt(2.0 + 1e-3) * s + b, False),
]
IDS = [c[0] for c in CASES]


def case_arrays(x_shape, p_shape, dtype=np.float64):
    rng = np.random.default_rng(2)
    x = data(x_shape).astype(dtype)
    s = rng.uniform(0.5, 2.0, p_shape).astype(dtype)
    b = rng.standard_normal(p_shape).astype(dtype)
    w = rng.standard_normal(x_shape).astype(dtype)
    return x, s, b, w


@pytest.mark.parametrize("name,x_shape,p_shape,f,ref,fused", CASES, ids=IDS)
def test_per_example_values_gradients_forward_mode(name, x_shape, p_shape, f, ref, fused, x64):
    x, s, b, w = (jnp.asarray(a) for a in case_arrays(x_shape, p_shape))
    y = f(x, s, b)
    chex.assert_shape(y, x_shape)
    np.testing.assert_allclose(y, ref(x, s, b), rtol=1e-10, atol=1e-10)
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a)), argnums=(0, 1, 2)))  # noqa: E731
    got, want = loss(f)(x, s, b), loss(ref)(x, s, b)
    for g, e in zip(got, want, strict=True):
        chex.assert_shape(g, e.shape)
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)
    tangents = (w, jnp.ones_like(s), 0.5 * jnp.ones_like(b))
    _, t = jax.jvp(f, (x, s, b), tangents)
    _, t_ref = jax.jvp(ref, (x, s, b), tangents)
    np.testing.assert_allclose(t, t_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,x_shape,p_shape,f,ref,fused", [CASES[0], CASES[10]], ids=[IDS[0], IDS[10]])
def test_per_example_float32_jit_vmap(name, x_shape, p_shape, f, ref, fused):
    x, s, b, _ = (jnp.asarray(a) for a in case_arrays(x_shape, p_shape, np.float32))
    expected = np.asarray(ref(*(a.astype(np.float64) for a in (np.asarray(x), np.asarray(s), np.asarray(b)))))
    np.testing.assert_allclose(jax.jit(f)(x, s, b), expected, rtol=2e-5, atol=2e-5)
    stacked = jax.jit(jax.vmap(f))(jnp.stack([x, x + 1]), jnp.stack([s, s]), jnp.stack([b, b]))
    np.testing.assert_allclose(stacked[0], expected, rtol=2e-5, atol=2e-5)


MASKED = [
    ("batch_norm", lambda x, s, b, m: bn(x, s, b, mask=m), (0, 1), 1e-5),
    ("layer_norm", lambda x, s, b, m: jn.layer_norm(x, s, b, axis=(1, 2), mask=m), (1, 2), 1e-6),
    ("instance_norm", lambda x, s, b, m: jn.instance_norm(x, s, b, mask=m), (1,), 1e-6),
]


@pytest.mark.parametrize("name,f,axes,eps", MASKED, ids=[c[0] for c in MASKED])
def test_per_example_with_mask(name, f, axes, eps, x64):
    """Masked (padded) steps, NaN there, reach neither statistics nor gradients; per-example params apply."""
    x = data((6, 4, 3)).astype(np.float64)
    x[:, 3] = np.nan
    mask = np.arange(4)[None, :, None] < 3
    rng = np.random.default_rng(3)
    s, b, w = rng.uniform(0.5, 2, (6, 1, 3)), rng.standard_normal((6, 1, 3)), rng.standard_normal(x.shape)
    x, s, b, w = (jnp.asarray(a) for a in (x, s, b, w))
    valid = np.broadcast_to(mask, x.shape)
    ref = lambda x, s, b, m: standardize_ref(x, axes, eps, m) * s + b  # noqa: E731
    xz = jnp.where(valid, x, 0)
    y = f(x, s, b, mask)
    np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, ref(xz, s, b, mask), 0), rtol=1e-10, atol=1e-10)
    loss = lambda fn: lambda *a: jnp.sum(jnp.where(valid, w * fn(*a, mask), 0))  # noqa: E731
    got = jax.grad(loss(f), argnums=(0, 1, 2))(x, s, b)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(xz, s, b)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jn.batch_norm(jnp.ones((4, 3, 5)), jn.init_batch_stats(5), jnp.ones((4, 5)), training=True),
         r"batch_norm: `scale` has shape \(4, 5\).*needs \(5,\) \(the feature shape\).*\(4, 1, 5\)"),
        (lambda: jn.batch_norm(jnp.ones((4, 3, 5)), jn.init_batch_stats(5), None, jnp.ones((4, 2, 5)), training=True),
         r"batch_norm: `bias` has shape \(4, 2, 5\)"),
        (lambda: jn.group_norm(jnp.ones((2, 3, 3, 8)), jnp.ones((3, 1, 1, 8)), num_groups=2),
         r"group_norm: `scale` has shape \(3, 1, 1, 8\).*\(2, 1, 1, 8\)"),
        (lambda: jn.instance_norm(jnp.ones((2, 5, 3, 3)), jnp.ones((2, 1, 1, 5)), channel_axis=1),
         r"instance_norm: `scale` has shape \(2, 1, 1, 5\).*\(2, 5, 1, 1\)"),
        (lambda: jn.batch_renorm(jnp.ones((4, 5)), jn.init_batch_stats(5), jnp.ones((2, 5)), training=True),
         r"batch_renorm: `scale` has shape \(2, 5\)"),
    ],
)
def test_per_example_bad_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- AdaIN


def adain_ref(x, style, axis, eps, mask=None):
    """Huang & Belongie 2017, eq. 8, biased variances, eps inside each square root (float64)."""
    spatial = tuple(a for a in range(1, x.ndim) if a != axis % x.ndim)
    ms = jnp.mean(style, spatial, keepdims=True)
    vs = jnp.mean((style - ms) ** 2, spatial, keepdims=True)
    return jnp.sqrt(vs + eps) * standardize_ref(x, spatial, eps, mask) + ms


@pytest.mark.parametrize(
    "x_shape,s_shape,axis",
    [((2, 5, 4, 3), (2, 7, 6, 3), -1), ((2, 3, 5, 4), (2, 3, 2, 2), 1), ((3, 6, 4), (1, 9, 4), -1)],
)
def test_adain_values_and_gradients(x_shape, s_shape, axis, x64):
    x = jnp.asarray(data(x_shape), jnp.float64)
    st = jnp.asarray(3.0 + 2.0 * data(s_shape, seed=1), jnp.float64)
    w = jnp.asarray(data(x_shape, seed=2), jnp.float64)
    y = jn.adaptive_instance_norm(x, st, channel_axis=axis, epsilon=1e-3)
    np.testing.assert_allclose(y, adain_ref(x, st, axis, 1e-3), rtol=1e-10, atol=1e-10)
    f = lambda a, b: jnp.sum(w * jn.adaptive_instance_norm(a, b, channel_axis=axis, epsilon=1e-3))  # noqa: E731
    r = lambda a, b: jnp.sum(w * adain_ref(a, b, axis, 1e-3))  # noqa: E731
    for g, e in zip(jax.grad(f, (0, 1))(x, st), jax.grad(r, (0, 1))(x, st), strict=True):
        chex.assert_shape(g, e.shape)
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


def test_adain_statistics_transfer_and_transforms():
    x = jnp.asarray(data((3, 6, 6, 4)))
    st = jnp.asarray(5.0 + 3.0 * data((3, 10, 10, 4), seed=1))
    y = jax.jit(jn.adaptive_instance_norm)(x, st)
    np.testing.assert_allclose(y.mean((1, 2)), st.mean((1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.std((1, 2)), st.std((1, 2)), rtol=1e-3)
    stacked = jax.vmap(jn.adaptive_instance_norm)(jnp.stack([x, x]), jnp.stack([st, st]))
    np.testing.assert_allclose(stacked[1], y, rtol=1e-5, atol=1e-5)
    assert jn.adaptive_instance_norm(x.astype(jnp.bfloat16), st).dtype == jnp.bfloat16
    # forward mode equals reverse mode: <u, J t> == <J^T u, t>
    u = jnp.asarray(data(x.shape, seed=2))
    _, t_y = jax.jvp(jn.adaptive_instance_norm, (x, st), (x, st))
    _, vjp = jax.vjp(jn.adaptive_instance_norm, x, st)
    dx, dst = vjp(u)
    np.testing.assert_allclose(jnp.vdot(u, t_y), jnp.vdot(dx, x) + jnp.vdot(dst, st), rtol=1e-4)


def test_adain_mask(x64):
    x = data((2, 6, 3)).astype(np.float64)
    x[:, 4:] = np.nan                       # padded positions
    mask = np.arange(6)[None, :, None] < 4
    st = jnp.asarray(data((2, 5, 3), seed=1), jnp.float64)
    w = jnp.asarray(data((2, 6, 3), seed=2), jnp.float64)
    y = jn.adaptive_instance_norm(jnp.asarray(x), st, mask=mask)
    valid = np.broadcast_to(mask, x.shape)
    xz = jnp.where(valid, x, 0)
    np.testing.assert_allclose(np.where(valid, y, 0), np.where(valid, adain_ref(xz, st, -1, 1e-5, mask), 0), rtol=1e-10)
    f = lambda a: jnp.sum(jnp.where(valid, w * jn.adaptive_instance_norm(a, st, mask=mask), 0))  # noqa: E731
    g = jax.grad(f)(jnp.asarray(x))
    e = jax.grad(lambda a: jnp.sum(jnp.where(valid, w * adain_ref(a, st, -1, 1e-5, mask), 0)))(xz)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "x_shape,s_shape,kw,match",
    [
        ((2, 4, 3), (2, 4, 4, 3), {}, r"adaptive_instance_norm: `style` of shape \(2, 4, 4, 3\) must have the rank"),
        ((2, 4, 3), (2, 4, 5), {}, r"`style` of shape \(2, 4, 5\) must have the 3 channels"),
        ((2, 4, 3), (3, 4, 3), {}, r"its batch of 2 or 1"),
        ((2, 3), (2, 3), {}, r"at least one spatial axis, got shape \(2, 3\)"),
        ((2, 4, 3), (2, 4, 3), dict(channel_axis=0), r"`channel_axis`=0 is the batch axis 0"),
        ((2, 4, 3), (2, 4, 3), dict(channel_axis=(1, 2)), r"`channel_axis` must be a single int"),
        ((2, 4, 3), (2, 4, 3), dict(mask=np.ones((2, 4, 2), bool)), r"`mask` of shape \(2, 4, 2\) does not broadcast"),
        ((2, 4, 3), (2, 4, 3), dict(epsilon=-1.0), r"`epsilon` must be a finite number >= 0"),
    ],
)
def test_adain_bad_input(x_shape, s_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        jn.adaptive_instance_norm(jnp.ones(x_shape), jnp.ones(s_shape), **kw)


# ---------------------------------------------------------------- conditional layers

LINEN = [
    ("batch", lambda: jnl.ConditionalBatchNorm(use_running_average=False),
     lambda: jnl.BatchNorm(use_running_average=False), (6, 3, 3, 4)),
    ("instance", lambda: jnl.ConditionalInstanceNorm(), lambda: jnl.InstanceNorm(), (3, 4, 4, 5)),
    ("group", lambda: jnl.ConditionalGroupNorm(num_groups=2), lambda: jnl.GroupNorm(num_groups=2), (3, 4, 4, 6)),
    ("layer", lambda: jnl.ConditionalLayerNorm(), lambda: jnl.LayerNorm(), (3, 5, 6)),
]


@pytest.mark.parametrize("kind,make,make_plain,x_shape", LINEN, ids=[c[0] for c in LINEN])
def test_linen_zero_init_is_the_plain_norm(kind, make, make_plain, x_shape):
    x = jnp.asarray(data(x_shape))
    c = jnp.asarray(data((x_shape[0], 7), seed=1))
    layer, plain = make(), make_plain()
    variables = layer.init(jax.random.key(0), x, c)
    plain_vars = plain.init(jax.random.key(0), x)
    p = variables["params"]
    chex.assert_trees_all_equal(p["scale"]["kernel"], jnp.zeros((7, x_shape[-1])))
    chex.assert_trees_all_equal(p["scale"]["bias"], plain_vars["params"]["scale"])
    chex.assert_trees_all_equal(p["bias"]["bias"], plain_vars["params"]["bias"])
    if kind == "batch":
        y, upd = layer.apply(variables, x, c, mutable=["batch_stats"])
        y0, upd0 = plain.apply(plain_vars, x, mutable=["batch_stats"])
        chex.assert_trees_all_equal_shapes_and_dtypes(variables["batch_stats"], plain_vars["batch_stats"])
        chex.assert_trees_all_close(upd, upd0, rtol=1e-6, atol=1e-6)
    else:
        y, y0 = layer.apply(variables, x, c), plain.apply(plain_vars, x)
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)


def test_linen_conditional_batch_norm_reference():
    """With trained (non-zero) projections: y = x_hat * (c W_s + b_s) + (c W_b + b_b), per example."""
    x = jnp.asarray(data((6, 3, 2, 4)))
    c = jnp.asarray(data((6, 5), seed=1))
    layer = jnl.ConditionalBatchNorm(kernel_init=nn.initializers.normal(0.5))
    v = layer.init(jax.random.key(0), x, c, use_running_average=False)
    y, upd = layer.apply(v, x, c, use_running_average=False, mutable=["batch_stats"])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    xf, cf = np.asarray(x, np.float64), np.asarray(c, np.float64)
    mean, var = xf.mean((0, 1, 2), keepdims=True), xf.var((0, 1, 2), keepdims=True)
    s = (cf @ p["scale"]["kernel"] + p["scale"]["bias"])[:, None, None, :]
    b = (cf @ p["bias"]["kernel"] + p["bias"]["bias"])[:, None, None, :]
    np.testing.assert_allclose(y, (xf - mean) / np.sqrt(var + 1e-5) * s + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.01 * mean.ravel(), rtol=1e-4, atol=1e-6)
    assert int(upd["batch_stats"]["count"]) == 1
    # evaluation with the running statistics, jitted
    stats = upd["batch_stats"]
    y_eval = jax.jit(lambda v, x, c: layer.apply(v, x, c, use_running_average=True))({**v, "batch_stats": stats}, x, c)
    rm, rv = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
    np.testing.assert_allclose(y_eval, (xf - rm) / np.sqrt(rv + 1e-5) * s + b, rtol=1e-5, atol=1e-5)
    # NCHW: per-example parameters of shape (N, C, 1, 1)
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    layer1 = jnl.ConditionalBatchNorm(axis=1, kernel_init=nn.initializers.normal(0.5))
    y1 = layer1.apply(v, nchw, c, use_running_average=False, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(jnp.transpose(y1, (0, 2, 3, 1)), y, rtol=1e-5, atol=1e-5)


def test_linen_conditional_layer_norm_per_token_and_grad():
    x = jnp.asarray(data((2, 5, 6)))
    c_tok = jnp.asarray(data((2, 5, 3), seed=1))
    layer = jnl.ConditionalLayerNorm(kernel_init=nn.initializers.normal(1.0))
    v = layer.init(jax.random.key(0), x, c_tok)
    y = layer.apply(v, x, c_tok)
    p = v["params"]
    s = c_tok @ p["scale"]["kernel"] + p["scale"]["bias"]
    b = c_tok @ p["bias"]["kernel"] + p["bias"]["bias"]
    xf = np.asarray(x, np.float64)
    x_hat = (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, x_hat * s + b, rtol=1e-5, atol=1e-5)
    # the condition's gradient is what steers it
    g = jax.grad(lambda c: jnp.sum(layer.apply(v, x, c) ** 2))(c_tok)
    assert np.abs(np.asarray(g)).sum() > 0


@pytest.mark.parametrize(
    "make,x_shape,c_shape,match",
    [
        (jnl.ConditionalLayerNorm, (2, 5, 6), (3, 4),
         r"jaxnorm.linen.ConditionalLayerNorm: `condition` of shape \(3, 4\) must be \(2, D\)"),
        (jnl.ConditionalInstanceNorm, (2, 4, 4, 3), (4,), r"`condition` of shape \(4,\) must be \(2, D\)"),
        (lambda: jnl.ConditionalBatchNorm(use_running_average=False), (4, 3), (4, 2, 2),
         r"`condition` of shape \(4, 2, 2\)"),
    ],
)
def test_linen_bad_condition(make, x_shape, c_shape, match):
    with pytest.raises(ValueError, match=match):
        make().init(jax.random.key(0), jnp.ones(x_shape), jnp.ones(c_shape))


def test_linen_batch_norm_use_running_average_twice():
    layer = jnl.ConditionalBatchNorm(use_running_average=True)
    with pytest.raises(ValueError, match=r"`use_running_average` was passed both"):
        layer.init(jax.random.key(0), jnp.ones((4, 3)), jnp.ones((4, 2)), use_running_average=False)


NNX = [
    ("batch", lambda r: jnx.ConditionalBatchNorm(4, 7, rngs=r), lambda r: jnx.BatchNorm(4, rngs=r), (6, 3, 3, 4)),
    ("instance", lambda r: jnx.ConditionalInstanceNorm(5, 7, rngs=r),
     lambda r: jnx.InstanceNorm(5, rngs=r), (3, 4, 4, 5)),
    ("group", lambda r: jnx.ConditionalGroupNorm(6, 7, num_groups=2, rngs=r),
     lambda r: jnx.GroupNorm(6, num_groups=2, rngs=r), (3, 4, 4, 6)),
    ("layer", lambda r: jnx.ConditionalLayerNorm(6, 7, rngs=r), lambda r: jnx.LayerNorm(6, rngs=r), (3, 5, 6)),
]


@pytest.mark.parametrize("kind,make,make_plain,x_shape", NNX, ids=[c[0] for c in NNX])
def test_nnx_zero_init_is_the_plain_norm(kind, make, make_plain, x_shape):
    x = jnp.asarray(data(x_shape))
    c = jnp.asarray(data((x_shape[0], 7), seed=1))
    layer, plain = make(nnx.Rngs(0)), make_plain(nnx.Rngs(0))
    np.testing.assert_allclose(layer(x, c), plain(x), rtol=1e-6, atol=1e-6)
    if kind == "batch":
        for name in ("mean", "var", "count"):
            np.testing.assert_allclose(getattr(layer, name)[...], getattr(plain, name)[...], rtol=1e-6, atol=1e-7)
        layer.eval()
        plain.eval()
        assert layer.use_running_average
        np.testing.assert_allclose(layer(x, c), plain(x), rtol=1e-6, atol=1e-6)
        assert int(layer.count[...]) == 1


def test_nnx_matches_linen_with_the_same_projections():
    x = jnp.asarray(data((6, 3, 2, 4)))
    c = jnp.asarray(data((6, 5), seed=1))
    linen_layer = jnl.ConditionalBatchNorm(kernel_init=nn.initializers.normal(0.5))
    v = linen_layer.init(jax.random.key(0), x, c, use_running_average=False)
    y, upd = linen_layer.apply(v, x, c, use_running_average=False, mutable=["batch_stats"])
    m = jnx.ConditionalBatchNorm(4, 5, rngs=nnx.Rngs(0))
    for name in ("scale", "bias"):
        getattr(m, name).kernel[...] = v["params"][name]["kernel"]
        getattr(m, name).bias[...] = v["params"][name]["bias"]
    np.testing.assert_allclose(nnx.jit(lambda m, x, c: m(x, c))(m, x, c), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m.mean[...], upd["batch_stats"]["mean"], rtol=1e-6, atol=1e-7)


def test_nnx_projection_of_another_width_is_an_error_and_changes_nothing():
    layer = jnx.ConditionalBatchNorm(4, 7, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(layer))
    with pytest.raises(
        ValueError, match=r"jaxnorm.nnx.ConditionalBatchNorm: the `scale` projection .* gives 4 features.*"
        r"has 6 on its feature axes.*`num_features=6`",
    ):
        layer(jnp.ones((3, 2, 6)), jnp.ones((3, 7)))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(layer)), before)
