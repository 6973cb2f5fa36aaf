"""local_response_norm against torch.nn.LocalResponseNorm; filter_response_norm (+TLU) against float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx


def data(shape, seed=0, loc=0.3):
    return (loc + 1.5 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- local response norm


def torch_lrn(x, size, alpha, beta, k, dtype=torch.float32):
    t = torch.tensor(np.asarray(x), dtype=dtype)
    return torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)(t).numpy()


def numpy_lrn(x, size, alpha, beta, k, axis):
    """b_c = a_c / (k + alpha/n * sum_{c-n//2 .. c+(n-1)//2} a^2) ** beta, zeros outside (float64)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    c = x.shape[-1]
    out = np.empty_like(x)
    for i in range(c):
        lo, hi = max(0, i - size // 2), min(c, i + (size - 1) // 2 + 1)
        s = (x[..., lo:hi] ** 2).sum(-1)
        out[..., i] = x[..., i] / (k + alpha / size * s) ** beta
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize(
    "shape,size",
    [((2, 7, 3, 4), n) for n in (1, 2, 3, 4, 5, 8)]
    + [((2, 7, 5), 2), ((2, 7, 5), 3), ((1, 6, 2, 3, 2), 4), ((1, 6, 2, 3, 2), 5)],
)
def test_lrn_matches_torch_nchw(shape, size):
    x = data(shape)
    kw = dict(size=size, alpha=0.3, beta=0.8, k=1.5)
    y = jn.local_response_norm(jnp.asarray(x), channel_axis=1, **kw)
    np.testing.assert_allclose(y, torch_lrn(x, **kw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, numpy_lrn(x, axis=1, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [2, 5])
def test_lrn_matches_torch_nhwc_and_defaults(size):
    x = data((2, 7, 3, 4))                      # NCHW for torch
    nhwc = np.transpose(x, (0, 2, 3, 1))
    y = jn.local_response_norm(jnp.asarray(nhwc), size=size)
    np.testing.assert_allclose(np.transpose(y, (0, 3, 1, 2)), torch_lrn(x, size, 1e-4, 0.75, 1.0), rtol=1e-6, atol=1e-7)
    # AlexNet's hyperparameters, where the normalization is visible
    y = jn.local_response_norm(jnp.asarray(nhwc), size=size, alpha=1.0, beta=0.75, k=2.0)
    np.testing.assert_allclose(np.transpose(y, (0, 3, 1, 2)), torch_lrn(x, size, 1.0, 0.75, 2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [2, 3])
def test_lrn_gradient_matches_torch(size, x64):
    x = data((2, 5, 3, 3)).astype(np.float64)
    w = np.random.default_rng(3).standard_normal(x.shape)
    kw = dict(size=size, alpha=0.5, beta=0.75, k=1.0)
    t = torch.tensor(x, requires_grad=True)
    (torch.nn.LocalResponseNorm(**kw)(t) * torch.tensor(w)).sum().backward()
    g = jax.grad(lambda v: jnp.sum(jn.local_response_norm(v, channel_axis=1, **kw) * w))(jnp.asarray(x))
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_lrn_transformations():
    x = jnp.asarray(data((3, 4, 4, 6)))
    f = lambda v, alpha: jn.local_response_norm(v, size=3, alpha=alpha, beta=0.75, k=1.0)  # noqa: E731
    expected = numpy_lrn(x, 3, 0.5, 0.75, 1.0, -1)
    np.testing.assert_allclose(jax.jit(f)(x, 0.5), expected, rtol=1e-5, atol=1e-6)   # traced alpha
    np.testing.assert_allclose(jax.vmap(f, (0, None))(x, 0.5), expected, rtol=1e-5, atol=1e-6)
    # forward mode equals reverse mode (the op is plain jax.numpy)
    t = jnp.asarray(data((3, 4, 4, 6), seed=5))
    _, jvp = jax.jvp(lambda v: f(v, 0.5), (x,), (t,))
    _, vjp = jax.vjp(lambda v: f(v, 0.5), x)
    u = jnp.asarray(data((3, 4, 4, 6), seed=6))
    np.testing.assert_allclose(jnp.vdot(u, jvp), jnp.vdot(vjp(u)[0], t), rtol=1e-4)
    chex.assert_shape(jax.jacfwd(lambda v: f(v, 0.5))(x[:1, :1, :1]), (1, 1, 1, 6, 1, 1, 1, 6))


def test_lrn_half_precision_keeps_dtype():
    x = jnp.asarray(data((2, 3, 3, 8))).astype(jnp.bfloat16)
    y = jn.local_response_norm(x, size=5, alpha=1.0, k=2.0)
    assert y.dtype == jnp.bfloat16
    expected = numpy_lrn(x.astype(np.float32), 5, 1.0, 0.75, 2.0, -1)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(size=0), r"local_response_norm: `size` must be a positive Python int.*got 0"),
        (dict(size=2.5), r"`size` must be a positive Python int.*got 2.5"),
        (dict(size=True), r"`size` must be a positive Python int"),
        (dict(size=3, channel_axis=(1, 2)), r"`channel_axis` must be a single int"),
        (dict(size=3, channel_axis=4), r"`channel_axis`=4 is out of range"),
        (dict(size=3, alpha=float("nan")), r"`alpha` must be a finite real number"),
    ],
)
def test_lrn_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jn.local_response_norm(jnp.ones((2, 3, 3, 4)), **kwargs)


def test_lrn_integer_input():
    with pytest.raises(ValueError, match=r"local_response_norm: `x` must have a real floating dtype"):
        jn.local_response_norm(jnp.ones((2, 4), jnp.int32), size=3)


def test_lrn_layers():
    x = jnp.asarray(data((2, 4, 4, 6)))
    kw = dict(alpha=0.5, beta=0.7, k=1.2)
    expected = numpy_lrn(x, 3, 0.5, 0.7, 1.2, -1)
    layer = jnl.LocalResponseNorm(size=3, **kw)
    assert layer.init(jax.random.key(0), x) == {}
    np.testing.assert_allclose(layer.apply({}, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnx.LocalResponseNorm(3, **kw)(x), expected, rtol=1e-5, atol=1e-6)
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    y = jnx.LocalResponseNorm(3, channel_axis=1, **kw)(nchw)
    np.testing.assert_allclose(jnp.transpose(y, (0, 2, 3, 1)), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- filter response norm


def numpy_frn(x, scale=None, bias=None, tau=None, eps=1e-6, axis=-1, learned=None):
    """Singh & Krishnan 2020, eq. (1)-(3), in float64; params already broadcastable."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    spatial = tuple(a for a in range(1, x.ndim) if a != axis)
    nu2 = (x ** 2).mean(axis=spatial, keepdims=True) if spatial else x ** 2
    e = eps if learned is None else eps + np.abs(np.asarray(learned, np.float64))
    y = x / np.sqrt(nu2 + e)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if tau is not None:
        y = np.maximum(y, np.asarray(tau, np.float64))
    return y


def jnp_frn(x, scale, bias, tau, eps, axis, learned=None):
    """The same formula in plain jax.numpy (independent of jaxnorm), for gradients."""
    spatial = tuple(a for a in range(1, x.ndim) if a != axis % x.ndim)
    nu2 = jnp.mean(x ** 2, axis=spatial, keepdims=True)
    e = eps if learned is None else eps + jnp.abs(learned)
    return jnp.maximum(x / jnp.sqrt(nu2 + e) * scale + bias, tau)


def params(c, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32),
            (0.3 * rng.standard_normal(c)).astype(np.float32))


@pytest.mark.parametrize("shape,axis", [((2, 5, 4, 3), -1), ((2, 3, 5, 4), 1), ((3, 4, 6), -1), ((4, 6), -1)])
def test_frn_values(shape, axis, transform):
    x = data(shape)
    c = shape[axis]
    s, b, t = params(c)
    where = [1] * len(shape)
    where[axis] = c
    r = lambda a: a.reshape(where)  # noqa: E731
    y = transform(lambda x, s, b, t: jn.filter_response_norm(x, s, b, t, epsilon=1e-3, channel_axis=axis))(x, s, b, t)
    np.testing.assert_allclose(y, numpy_frn(x, r(s), r(b), r(t), 1e-3, axis), rtol=1e-5, atol=1e-5)
    # without TLU and without affine parameters
    y = jn.filter_response_norm(x, epsilon=1e-3, channel_axis=axis)
    np.testing.assert_allclose(y, numpy_frn(x, eps=1e-3, axis=axis), rtol=1e-5, atol=1e-5)


def test_frn_learned_epsilon():
    x = data((2, 1, 1, 4))          # 1x1 activations, the paper's motivating case
    s, b, t = params(4)
    for learned in (np.float32(-0.2), np.array([0.1, -0.3, 0.0, 1.0], np.float32)):
        y = jn.filter_response_norm(x, s, b, t, learned_epsilon=learned)
        np.testing.assert_allclose(y, numpy_frn(x, s, b, t, 1e-6, -1, learned), rtol=1e-5, atol=1e-6)
    # eps = epsilon + |learned|: a negative learned value cannot bring eps below epsilon
    g = jax.grad(lambda e: jnp.sum(jn.filter_response_norm(x, learned_epsilon=e)))(jnp.float32(-0.2))
    g_ref = jax.grad(lambda e: jnp.sum(jnp_frn(jnp.asarray(x), 1.0, 0.0, -jnp.inf, 1e-6, -1, e)))(jnp.float32(-0.2))
    np.testing.assert_allclose(g, g_ref, rtol=1e-4)


def test_frn_per_example_parameters_and_gradients(x64):
    x = data((3, 4, 4, 5)).astype(np.float64)
    rng = np.random.default_rng(4)
    s, b, t = (rng.standard_normal((3, 1, 1, 5)) for _ in range(3))
    w = rng.standard_normal(x.shape)
    y = jn.filter_response_norm(x, s, b, t, epsilon=1e-2)
    np.testing.assert_allclose(y, numpy_frn(x, s, b, t, 1e-2), rtol=1e-12, atol=1e-12)
    args = tuple(jnp.asarray(a) for a in (x, s, b, t))
    got = jax.grad(lambda *a: jnp.sum(w * jn.filter_response_norm(*a, epsilon=1e-2)), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(lambda *a: jnp.sum(w * jnp_frn(*a, 1e-2, -1)), argnums=(0, 1, 2, 3))(*args)
    for g, e in zip(got, want, strict=True):
        chex.assert_shape(g, e.shape)
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_frn_transformations():
    x = jnp.asarray(data((3, 4, 4, 5)))
    s, b, t = (jnp.asarray(a) for a in params(5))
    f = lambda v, eps: jn.filter_response_norm(v, s, b, t, epsilon=eps)  # noqa: E731
    expected = numpy_frn(x, s, b, t, 1e-3)
    np.testing.assert_allclose(jax.jit(f)(x, 1e-3), expected, rtol=1e-5, atol=1e-5)  # traced epsilon
    np.testing.assert_allclose(jax.vmap(f, (0, None))(x[:, None], 1e-3)[:, 0], expected, rtol=1e-5, atol=1e-5)
    u, dx = jnp.asarray(data(x.shape, seed=7)), jnp.asarray(data(x.shape, seed=8))
    _, jvp = jax.jvp(lambda v: f(v, 1e-3), (x,), (dx,))
    _, vjp = jax.vjp(lambda v: f(v, 1e-3), x)
    np.testing.assert_allclose(jnp.vdot(u, jvp), jnp.vdot(vjp(u)[0], dx), rtol=1e-4)
    _, jvp_ref = jax.jvp(lambda v: jnp_frn(v, s, b, t, 1e-3, -1), (x,), (dx,))
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-4, atol=1e-4)
    assert jn.filter_response_norm(x.astype(jnp.bfloat16), s, b, t).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((jnp.ones((2, 3, 3, 4)),), dict(channel_axis=0), r"filter_response_norm: `channel_axis`=0 is the batch axis"),
        ((jnp.ones(4),), {}, r"`x` must have a batch axis and a channel axis, got shape \(4,\)"),
        ((jnp.ones((2, 3, 3, 4)), jnp.ones(3)), {},
         r"`scale` has shape \(3,\).*needs \(4,\) \(the feature shape\).*\(2, 1, 1, 4\)"),
        ((jnp.ones((2, 3, 3, 4)), None, None, jnp.ones((2, 3, 1, 5))), {}, r"`tau` has shape \(2, 3, 1, 5\)"),
        ((jnp.ones((2, 3, 3, 4)),), dict(epsilon=-1.0), r"`epsilon` must be a finite number >= 0"),
        ((jnp.ones((2, 3, 3, 4)),), dict(learned_epsilon=jnp.ones(2)),
         r"`learned_epsilon` has shape \(2,\).*or a scalar"),
        ((jnp.ones((2, 3, 3, 4)), jnp.ones(4, jnp.int32)), {}, r"`scale` must have a real floating dtype"),
    ],
)
def test_frn_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jn.filter_response_norm(*args, **kwargs)


def test_frn_layers():
    x = jnp.asarray(data((2, 4, 4, 5)))
    layer = jnl.FilterResponseNorm(learned_epsilon=True)
    y, variables = layer.init_with_output(jax.random.key(0), x)
    p = variables["params"]
    assert sorted(p) == ["bias", "learned_epsilon", "scale", "tau"]
    chex.assert_shape((p["scale"], p["bias"], p["tau"], p["learned_epsilon"]), [(5,), (5,), (5,), ()])
    np.testing.assert_allclose(p["learned_epsilon"], 1e-4)
    np.testing.assert_allclose(y, numpy_frn(x, 1.0, 0.0, 0.0, 1e-6, -1, 1e-4), rtol=1e-5, atol=1e-6)
    # plain FRN: no TLU, no learned epsilon
    v = jnl.FilterResponseNorm(use_tau=False).init(jax.random.key(0), x)
    assert sorted(v["params"]) == ["bias", "scale"]
    # NNX twin with the same parameters gives the same output
    m = jnx.FilterResponseNorm(5, learned_epsilon=True, rngs=nnx.Rngs(0))
    s, b, t = (jnp.asarray(a) for a in params(5))
    m.scale[...], m.bias[...], m.tau[...] = s, b, t
    vs = {"params": {"scale": s, "bias": b, "tau": t, "learned_epsilon": jnp.float32(1e-4)}}
    np.testing.assert_allclose(m(x), layer.apply(vs, x), rtol=1e-6, atol=1e-6)
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    y1 = jnl.FilterResponseNorm(channel_axis=1).apply({"params": {"scale": s, "bias": b, "tau": t}}, nchw)
    np.testing.assert_allclose(jnp.transpose(y1, (0, 2, 3, 1)), numpy_frn(x, s, b, t), rtol=1e-5, atol=1e-5)
