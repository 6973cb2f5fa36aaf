"""Forward-mode autodiff (jvp, jacfwd, linearize, hessian) of every norm, against plain-jnp formulas.

The references below are written from the papers' formulas with ``jax.numpy``
only (two-pass masked moments, no jaxnorm code), so JAX's own forward and
reverse mode of them are the independent answer; flax.linen's layers are the
reference for the Flax layers.
"""

from __future__ import annotations

import functools

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jl
import jaxnorm.nnx as jnnx

RTOL, ATOL = 2e-4, 2e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# --- plain-jnp references -------------------------------------------------------


def ref_moments(x, axes, mask=None, center=True):
    w = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    n = jnp.sum(w, axes, keepdims=True)
    mean = jnp.sum(jnp.where(w, x, 0), axes, keepdims=True) / n if center else jnp.zeros_like(n, x.dtype)
    var = jnp.sum(jnp.where(w, (x - mean) ** 2, 0), axes, keepdims=True) / n
    return mean, var


def ref_standardize(x, axes, eps, mask=None, center=True):
    mean, var = ref_moments(x, axes, mask, center)
    return (x - mean) / jnp.sqrt(var + eps), mean, var


def ref_group(x, groups, eps):
    """Channels-last group norm: reduce every axis but the first, per group of consecutive channels."""
    xs = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    axes = tuple(range(1, xs.ndim - 2)) + (xs.ndim - 1,)
    return ref_standardize(xs, axes, eps)[0].reshape(x.shape)


def ref_renorm(x, mean_run, var_run, eps, r_max, d_max):
    """Ioffe 2017, Algorithm 1: r and d are constants of the gradient."""
    x_hat, mu, var = ref_standardize(x, (0,), eps)
    sigma_b, sigma = jnp.sqrt(var + eps), jnp.sqrt(var_run + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mu - mean_run) / sigma, -d_max, d_max))
    return x_hat * r + d


# --- the cases: (jaxnorm function, reference, x shape, parameter shape) ---------

KEY = jax.random.key(0)
BN_MASK = np.ones((8, 6), bool)
BN_MASK[[1, 4, 6], [0, 2, 5]] = False
LN_MASK = np.ones((8, 6), bool)
LN_MASK[[0, 3, 3, 7], [1, 2, 5, 0]] = False
STATS = jn.init_batch_stats(6)._replace(mean=jnp.linspace(-0.5, 0.5, 6), var=jnp.linspace(0.5, 2.0, 6))


def _bn(x, s, b, eps, mask=None, ghost=None):
    y, new = jn.batch_norm(x, STATS, s, b, training=True, epsilon=eps, momentum=0.9, mask=mask, ghost_batch_size=ghost)
    return y, new.mean, new.var


def _bn_ref(x, s, b, eps, mask=None):
    x_hat, mean, var = ref_standardize(x, (0,), eps, mask)
    # the running statistics are state, not a differentiable output (as in reverse mode)
    new_mean, new_var = jax.lax.stop_gradient((0.9 * STATS.mean + 0.1 * mean[0], 0.9 * STATS.var + 0.1 * var[0]))
    return x_hat * s + b, new_mean, new_var


def _ghost_ref(x, s, b, eps):
    parts = [_bn_ref(xi, s, b, eps)[0] for xi in jnp.split(x, 2)]
    return jnp.concatenate(parts)


def _style(s, b):
    """A (1, 5, 6) style image built from the parameters (so they have tangents)."""
    return s * jnp.linspace(-1.0, 2.0, 5)[None, :, None] ** 2 + b


CASES = {
    "batch_norm": (_bn, _bn_ref, (8, 6), (6,)),
    "batch_norm_masked": (
        functools.partial(_bn, mask=BN_MASK), functools.partial(_bn_ref, mask=BN_MASK), (8, 6), (6,),
    ),
    "batch_norm_ghost": (lambda x, s, b, e: _bn(x, s, b, e, ghost=4)[0], _ghost_ref, (8, 6), (6,)),
    "batch_norm_eval": (
        lambda x, s, b, e: jn.batch_norm(x, STATS, s, b, training=False, epsilon=e)[0],
        lambda x, s, b, e: (x - STATS.mean) / jnp.sqrt(STATS.var + e) * s + b,
        (8, 6), (6,),
    ),
    "batch_renorm": (
        lambda x, s, b, e: jn.batch_renorm(x, STATS, training=True, epsilon=e, r_max=1.5, d_max=0.5)[0] * s + b,
        lambda x, s, b, e: ref_renorm(x, STATS.mean, STATS.var, e, 1.5, 0.5) * s + b,
        (8, 6), (6,),
    ),
    "layer_norm": (
        lambda x, s, b, e: jn.layer_norm(x, s, b, epsilon=e),
        lambda x, s, b, e: ref_standardize(x, (1,), e)[0] * s + b,
        (8, 6), (6,),
    ),
    "layer_norm_masked": (
        lambda x, s, b, e: jn.layer_norm(x, s, b, epsilon=e, mask=LN_MASK),
        lambda x, s, b, e: ref_standardize(x, (1,), e, LN_MASK)[0] * s + b,
        (8, 6), (6,),
    ),
    "rms_norm": (
        lambda x, s, b, e: jn.rms_norm(x, s, epsilon=e) + b,
        lambda x, s, b, e: ref_standardize(x, (1,), e, center=False)[0] * s + b,
        (8, 6), (6,),
    ),
    "rms_norm_masked": (
        lambda x, s, b, e: jn.rms_norm(x, s, epsilon=e, mask=LN_MASK) + b,
        lambda x, s, b, e: ref_standardize(x, (1,), e, LN_MASK, center=False)[0] * s + b,
        (8, 6), (6,),
    ),
    "group_norm": (
        lambda x, s, b, e: jn.group_norm(x, s, b, num_groups=3, epsilon=e),
        lambda x, s, b, e: ref_group(x, 3, e) * s + b,
        (2, 4, 6), (6,),
    ),
    "instance_norm": (
        lambda x, s, b, e: jn.instance_norm(x, s, b, epsilon=e),
        lambda x, s, b, e: ref_standardize(x, (1,), e)[0] * s + b,
        (2, 4, 6), (6,),
    ),
    "adaptive_instance_norm": (
        lambda x, s, b, e: jn.adaptive_instance_norm(x, _style(s, b), epsilon=e),
        lambda x, s, b, e: ref_standardize(x, (1,), e)[0] * jnp.sqrt(ref_moments(_style(s, b), (1,))[1] + e)
        + ref_moments(_style(s, b), (1,))[0],
        (2, 4, 6), (6,),
    ),
}


def _operands(x_shape, p_shape, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], x_shape) * 2.0 + 1.0
    s = 1.0 + 0.3 * jax.random.normal(k[1], p_shape)
    b = 0.3 * jax.random.normal(k[2], p_shape)
    primals = (x, s, b, jnp.float32(1e-2))
    tangents = (
        jax.random.normal(k[3], x_shape), jax.random.normal(k[4], p_shape),
        jax.random.normal(k[5], p_shape), jnp.float32(0.5),
    )
    return primals, tangents


@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_and_linearize_match_the_plain_formula(name):
    fn, ref, xs, ps = CASES[name]
    primals, tangents = _operands(xs, ps)
    # jitted: op-by-op dispatch of the references costs seconds (one eager case below)
    jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))  # noqa: E731
    (out, t_out), (want, t_want) = jvp(fn)(primals, tangents), jvp(ref)(primals, tangents)
    close(out, want)
    close(t_out, t_want)
    close(jax.jit(lambda p, t: jax.linearize(fn, *p)[1](*t))(primals, tangents), t_want)
    # the vjp (the fused backward) is the transpose of that map
    ct = jax.tree.map(lambda v: jnp.cos(v), want)
    vjp = lambda f: jax.jit(lambda p, ct: jax.vjp(f, *p)[1](ct))  # noqa: E731
    close(vjp(fn)(primals, ct), vjp(ref)(primals, ct), atol=1e-4)


def test_eager_jvp_and_linearize():
    """Without jit: the tangent primitive's own eager evaluation."""
    fn, ref, xs, ps = CASES["layer_norm_masked"]
    primals, tangents = _operands(xs, ps)
    want = jax.jit(lambda p, t: jax.jvp(ref, p, t))(primals, tangents)
    close(jax.jvp(fn, primals, tangents), want)
    close(jax.linearize(fn, *primals)[1](*tangents), want[1])


@pytest.mark.parametrize("name", ["batch_norm_masked", "layer_norm", "rms_norm_masked", "group_norm", "batch_renorm"])
def test_jacfwd_equals_jacrev_and_the_reference(name):
    fn, ref, xs, ps = CASES[name]
    (x, s, b, e), _ = _operands(xs, ps, seed=1)

    def first(f):
        return lambda x, s, b, e: jax.tree.leaves(f(x, s, b, e))[0]

    fwd = jax.jit(jax.jacfwd(first(fn), argnums=(0, 1, 2, 3)))(x, s, b, e)
    rev = jax.jit(jax.jacrev(first(fn), argnums=(0, 1, 2, 3)))(x, s, b, e)
    want = jax.jit(jax.jacfwd(first(ref), argnums=(0, 1, 2, 3)))(x, s, b, e)
    close(fwd, rev, atol=1e-4)
    close(fwd, want, atol=1e-4)


SMALL_MASK = np.ones((3, 6), bool)
SMALL_MASK[[0, 2], [1, 4]] = False
HESSIAN_CASES = {  # small inputs: a Hessian has (size of x)**2 entries
    "batch_norm": (*CASES["batch_norm"][:2], (3, 6)),
    "layer_norm_masked": (
        lambda x, s, b, e: jn.layer_norm(x, s, b, epsilon=e, mask=SMALL_MASK),
        lambda x, s, b, e: ref_standardize(x, (1,), e, SMALL_MASK)[0] * s + b,
        (3, 6),
    ),
    "group_norm": (*CASES["group_norm"][:2], (1, 2, 6)),
}


@pytest.mark.parametrize("name", sorted(HESSIAN_CASES))
def test_hessian_both_ways(name):
    fn, ref, xs = HESSIAN_CASES[name]
    (x, s, b, e), _ = _operands(xs, (xs[-1],), seed=2)
    w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))

    def loss(f):
        return lambda x: jnp.sum(jax.tree.leaves(f(x, s, b, e))[0] * w)

    want = jax.jit(jax.hessian(loss(ref)))(x)
    close(jax.jit(jax.hessian(loss(fn)))(x), want, rtol=1e-3, atol=2e-4)  # jacfwd of jacrev
    close(jax.jit(jax.jacrev(jax.jacfwd(loss(fn))))(x), want, rtol=1e-3, atol=2e-4)
    close(jax.jit(jax.jacfwd(jax.jacfwd(loss(fn))))(x), want, rtol=1e-3, atol=2e-4)


def test_under_vmap_scan_and_remat():
    fn, ref, xs, ps = CASES["layer_norm_masked"]
    primals, tangents = _operands(xs, ps, seed=3)
    stack = lambda t: jax.tree.map(lambda v: jnp.stack([v, 2 * v, -v]), t)  # noqa: E731
    batched = jax.jit(jax.vmap(lambda p, t: jax.jvp(fn, p, t)[1]))(stack(primals), stack(tangents))
    want = jax.jit(jax.vmap(lambda p, t: jax.jvp(ref, p, t)[1]))(stack(primals), stack(tangents))
    close(batched, want)
    # vmap of grad keeps working through the batched tangent primitive
    g = jax.jit(jax.vmap(jax.grad(lambda x, s: jnp.sum(jnp.sin(fn(x, s, primals[2], primals[3]))))))
    g_want = jax.jit(jax.vmap(jax.grad(lambda x, s: jnp.sum(jnp.sin(ref(x, s, primals[2], primals[3]))))))
    close(g(stack(primals)[0], stack(primals)[1]), g_want(stack(primals)[0], stack(primals)[1]), atol=1e-4)

    def steps(f):
        def body(c, _):
            y = f(c, *primals[1:])
            return y, jnp.sum(y**2)

        return lambda x: jax.lax.scan(body, x, None, length=3)

    jvp = lambda f: jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))  # noqa: E731
    close(jvp(steps(fn))(primals[0], tangents[0]), jvp(steps(ref))(primals[0], tangents[0]))
    remat = jax.checkpoint(lambda x: fn(x, *primals[1:]))
    close(jvp(remat)(primals[0], tangents[0]), jvp(lambda x: ref(x, *primals[1:]))(primals[0], tangents[0]))
    close(jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(remat(x)))))(primals[0]),
          jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(ref(x, *primals[1:])))))(primals[0]), atol=1e-4)


# --- across 8 host devices ---------------------------------------------------------


MESH = jax.make_mesh((8,), ("d",))


def _on_devices(a):
    return jax.device_put(a, jax.NamedSharding(MESH, P("d")))


@pytest.mark.parametrize("check_vma", [True, False])
def test_jvp_across_devices_with_shard_map(check_vma):
    primals, tangents = _operands((16, 6), (6,), seed=4)
    x, s, b, e = primals
    mask = np.ones((16, 6), bool)
    mask[[0, 5, 9, 14], [1, 3, 0, 5]] = False

    def local(x, m, s, b):
        y, new = jn.batch_norm(x, STATS, s, b, training=True, epsilon=1e-2, momentum=0.9, mask=m, axis_name="d")
        return y, new.mean, new.var

    sharded = jax.shard_map(
        local, mesh=MESH, in_specs=(P("d"), P("d"), P(), P()), out_specs=(P("d"), P(), P()), check_vma=check_vma
    )
    m_sh = _on_devices(mask)
    got = jax.jit(lambda x, s, b, tx, ts, tb: jax.jvp(lambda x, s, b: sharded(x, m_sh, s, b), (x, s, b),
                                                       (tx, ts, tb)))(_on_devices(x), s, b, _on_devices(tangents[0]),
                                                                      *tangents[1:3])
    want = jax.jvp(lambda x, s, b: _bn_ref(x, s, b, 1e-2, mask), (x, s, b), tangents[:3])
    close(got, want)


def test_jvp_under_sharded_jit():
    """No axis_name: jit partitions the global computation (the tangent primitive included)."""
    primals, tangents = _operands((16, 6), (6,), seed=8)
    mask = np.ones((16, 6), bool)
    mask[[2, 7, 11], [0, 4, 1]] = False
    f = lambda x, s, b: _bn(x, s, b, 1e-2, mask=mask)  # noqa: E731
    got = jax.jit(lambda p, t: jax.jvp(f, p, t))(
        (_on_devices(primals[0]), *primals[1:3]), (_on_devices(tangents[0]), *tangents[1:3])
    )
    want = jax.jvp(lambda x, s, b: _bn_ref(x, s, b, 1e-2, mask=mask), primals[:3], tangents[:3])
    close(got, want)


@pytest.mark.parametrize("mapper", ["pmap", "vmap"])
def test_jvp_across_devices_with_pmap_and_named_vmap(mapper):
    primals, tangents = _operands((16, 6), (6,), seed=5)
    x, s, b, _ = primals

    def local(x):
        return jn.layer_norm(x, s, b, epsilon=1e-2, axis=(0, 1), axis_name="d")

    def per_device(x, t):
        return jax.jvp(local, (x,), (t,))

    mapped = jax.pmap(per_device, axis_name="d") if mapper == "pmap" else jax.vmap(per_device, axis_name="d")
    got = mapped(x.reshape(8, 2, 6), tangents[0].reshape(8, 2, 6))
    # layer norm over (rows, features) of every device together: one statistic for the whole array
    ref = lambda x: ref_standardize(x, (0, 1), 1e-2)[0] * s + b  # noqa: E731
    want = jax.jvp(ref, (x,), (tangents[0],))
    close(jax.tree.map(lambda v: v.reshape(16, 6), got), want)


# --- traced epsilon ------------------------------------------------------------------


def test_traced_epsilon_trains_sweeps_and_has_a_gradient():
    (x, s, b, _), _ = _operands((8, 6), (6,), seed=6)
    fn, ref = CASES["batch_norm"][:2]
    step = jax.jit(lambda x, eps: fn(x, s, b, eps))
    close(step(x, 0.3), ref(x, s, b, 0.3))
    eps = jnp.array([1e-3, 0.1, 1.0])
    sweep = lambda f: jax.jit(jax.vmap(lambda e: f(x, s, b, e)))  # noqa: E731
    close(sweep(fn)(eps), sweep(ref)(eps))
    loss = lambda f: lambda e: jnp.sum(jnp.sin(f(x, s, b, e)[0]))  # noqa: E731
    want = jax.jit(jax.grad(loss(ref)))(0.3)
    assert abs(float(want)) > 1e-3
    close(jax.jit(jax.grad(loss(fn)))(0.3), want, atol=1e-5)
    close(jax.jit(jax.jacfwd(loss(fn)))(0.3), want, atol=1e-5)
    # concrete values are still validated, traced ones by their type
    with pytest.raises(ValueError, match="batch_norm: `epsilon`"):
        fn(x, s, b, -1.0)
    with pytest.raises(ValueError, match=r"layer_norm: `epsilon` must be a real scalar, got a traced float32\[3\]"):
        jax.jit(lambda e: jn.layer_norm(x, epsilon=e))(eps)
    with pytest.raises(ValueError, match="batch_norm: `epsilon` must be a real scalar"):
        jax.jit(lambda e: fn(x, s, b, e))(jnp.array(True))


def test_epsilon_gradient_across_devices_is_summed_for_replicated_epsilon():
    (x, s, b, _), _ = _operands((16, 6), (6,), seed=7)

    def local(x, e):
        return jn.layer_norm(x, s, b, epsilon=e)

    sharded = jax.shard_map(local, mesh=MESH, in_specs=(P("d"), P()), out_specs=P("d"))
    x_sh = _on_devices(x)
    got = jax.jit(jax.grad(lambda e: jnp.sum(jnp.sin(sharded(x_sh, e)))))(jnp.float32(0.2))
    want = jax.grad(lambda e: jnp.sum(jnp.sin(ref_standardize(x, (1,), e)[0] * s + b)))(jnp.float32(0.2))
    close(got, want, atol=1e-5)


# --- Flax layers: forward mode against flax.linen's --------------------------------

LINEN_PAIRS = {
    "BatchNorm": (
        lambda: jl.BatchNorm(use_running_average=False), lambda: flax_nn.BatchNorm(use_running_average=False),
    ),
    "LayerNorm": (jl.LayerNorm, flax_nn.LayerNorm),
    "RMSNorm": (jl.RMSNorm, flax_nn.RMSNorm),
    "GroupNorm": (lambda: jl.GroupNorm(num_groups=3), lambda: flax_nn.GroupNorm(num_groups=3)),
    "InstanceNorm": (jl.InstanceNorm, flax_nn.InstanceNorm),
}


@pytest.mark.parametrize("name", sorted(LINEN_PAIRS))
def test_linen_layers_jvp_like_flax(name):
    ours, theirs = (make() for make in LINEN_PAIRS[name])
    x = jax.random.normal(jax.random.key(8), (4, 3, 6)) * 2 + 1
    tx = jax.random.normal(jax.random.key(9), x.shape)
    v_ours, v_theirs = ours.init(KEY, x), theirs.init(KEY, x)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), v_theirs["params"])
    t_params = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)

    def apply(module, variables):
        rest = {k: v for k, v in variables.items() if k != "params"}

        def f(x, p):
            out = module.apply({"params": p, **rest}, x, mutable=list(rest))
            return out[0] if rest else out

        return f

    jvp = lambda f: jax.jit(lambda p, t: jax.jvp(f, p, t))  # noqa: E731
    got = jvp(apply(ours, v_ours))((x, params), (tx, t_params))
    want = jvp(apply(theirs, v_theirs))((x, params), (tx, t_params))
    close(got, want, atol=5e-5)


def test_batch_renorm_layer_jvp_matches_the_formula():
    layer = jl.BatchRenorm(use_running_average=False, r_max=1.5, d_max=0.5)
    x = jax.random.normal(jax.random.key(10), (8, 6)) * 2 + 1
    tx = jax.random.normal(jax.random.key(11), x.shape)
    v = layer.init(KEY, x)
    v = {**v, "batch_stats": jax.tree.map(lambda a: a, v["batch_stats"])}
    f = lambda x: layer.apply(v, x, mutable=["batch_stats"])[0]  # noqa: E731
    stats = v["batch_stats"]
    mean, var = stats["mean"], stats["var"]
    eps = layer.epsilon
    jvp = lambda f: jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))  # noqa: E731
    close(jvp(f)(x, tx), jvp(lambda x: ref_renorm(x, mean, var, eps, 1.5, 0.5))(x, tx))


@pytest.mark.parametrize(
    "make, ref_axes, groups",
    [
        (lambda r: jnnx.BatchNorm(6, use_running_average=False, rngs=r), (0, 1), None),
        (lambda r: jnnx.LayerNorm(6, rngs=r), (2,), None),
        (lambda r: jnnx.RMSNorm(6, rngs=r), (2,), None),
        (lambda r: jnnx.GroupNorm(6, num_groups=3, rngs=r), None, 3),
        (lambda r: jnnx.InstanceNorm(6, rngs=r), (1,), None),
    ],
)
def test_nnx_layers_jvp_and_jacfwd(make, ref_axes, groups):
    layer = make(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(12), (4, 3, 6)) * 2 + 1
    tx = jax.random.normal(jax.random.key(13), x.shape)
    graph, state = nnx.split(layer)

    def f(x):
        # a fresh copy of the state per trace: the layer updates its batch statistics in training mode
        return nnx.merge(graph, jax.tree.map(jnp.asarray, state))(x)

    center = not isinstance(layer, jnnx.RMSNorm)
    eps = layer.epsilon
    if groups:
        ref = lambda x: ref_group(x, groups, eps)  # noqa: E731
    else:
        ref = lambda x: ref_standardize(x, ref_axes, eps, center=center)[0]  # noqa: E731
    jvp = lambda f: jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))  # noqa: E731
    close(jvp(f)(x, tx), jvp(ref)(x, tx), atol=5e-5)
    small = x[:2, :2]
    close(jax.jit(jax.jacfwd(f))(small), jax.jit(jax.jacrev(f))(small), atol=1e-4)
