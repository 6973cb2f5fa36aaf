"""Spectral normalization: core against a float64 NumPy power iteration; linen and NNX against flax's own.

The reference is Miyato et al. 2018's power iteration written independently in
float64 NumPy (with flax's epsilon placement, ``a / sqrt(|a|^2 + eps)``); the
layers are checked against ``flax.linen.SpectralNorm`` and
``flax.nnx.SpectralNorm`` (same variables after init, same outputs, updated
``u``/``sigma`` and gradients over several steps, Dense and Conv, float32 and
bfloat16).
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
F32, BF16 = jnp.float32, jnp.bfloat16


def ref_power_iteration(kernel, u, n_steps=1, eps=1e-12):
    """(kernel / sigma, u, sigma) in float64."""
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    u = np.asarray(u, np.float64).reshape(-1)
    for _ in range(n_steps):
        v = w @ u
        v = v / np.sqrt(v @ v + eps)
        u = w.T @ v
        u = u / np.sqrt(u @ u + eps)
    sigma = v @ w @ u
    return (w / sigma).reshape(kernel.shape), u[None], sigma


def rand(shape, seed=0, dtype=F32):
    return jax.random.normal(jax.random.key(seed), shape, F32).astype(dtype)


# --- core -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5)])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_matches_numpy_power_iteration(transform, shape, n_steps):
    kernel = rand(shape)
    state = jn.init_spectral_state(jax.random.key(1), shape)
    out, new = transform(lambda k, s: jn.spectral_norm(k, s, n_steps=n_steps, update_stats=True))(kernel, state)
    ref_w, ref_u, ref_sigma = ref_power_iteration(kernel, state.u, n_steps)
    np.testing.assert_allclose(out, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.u, ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.sigma, ref_sigma, rtol=1e-5)
    assert new.u.dtype == new.sigma.dtype == jnp.float32 and out.dtype == kernel.dtype
    # evaluation: same normalization, the state object comes back as it was
    out_eval, same = jn.spectral_norm(kernel, state, n_steps=n_steps, update_stats=False)
    assert same is state
    np.testing.assert_allclose(out_eval, ref_w, rtol=1e-5, atol=1e-6)


def test_sigma_converges_to_the_largest_singular_value():
    kernel = rand((8, 5))
    top = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[0]
    state = jn.init_spectral_state(KEY, kernel.shape)
    step = jax.jit(lambda s: jn.spectral_norm(kernel, s, update_stats=True))
    for _ in range(100):
        out, state = step(state)
    np.testing.assert_allclose(state.sigma, top, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)[0], 1.0, rtol=1e-4)
    # folding divides by the stored sigma: the kernel the last training step used
    np.testing.assert_allclose(jn.fold_spectral_norm(kernel, state), np.asarray(kernel) / float(state.sigma), rtol=1e-6)


def test_gradient_holds_u_and_v_constant():
    kernel, r = rand((5, 3)), rand((5, 3), 2)
    state = jn.init_spectral_state(jax.random.key(1), kernel.shape)
    grad = jax.grad(lambda k: jnp.sum(jn.spectral_norm(k, state, update_stats=False)[0] * r))(kernel)
    _, u, sigma = ref_power_iteration(kernel, state.u)
    w, rr = np.asarray(kernel, np.float64), np.asarray(r, np.float64)
    v = w @ np.asarray(state.u[0], np.float64)  # v from the stored u, then u from v
    v = v / np.linalg.norm(v)
    # d/dW sum(R * W / sigma) with sigma = v^T W u, u and v fixed (Miyato et al., eq. 12)
    ref = rr / sigma - (rr * w).sum() / sigma**2 * np.outer(v, u[0])
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6)


def test_vmap_jvp_and_bfloat16():
    kernels = rand((3, 4, 2))
    states = jax.vmap(lambda k: jn.init_spectral_state(k, (4, 2)))(jax.random.split(KEY, 3))
    out, new = jax.jit(jax.vmap(lambda k, s: jn.spectral_norm(k, s, update_stats=True)))(kernels, states)
    for i in range(3):
        ref_w, ref_u, ref_sigma = ref_power_iteration(kernels[i], states.u[i])
        np.testing.assert_allclose(out[i], ref_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.sigma[i], ref_sigma, rtol=1e-5)
    state = jax.tree.map(lambda a: a[0], states)
    t = rand((4, 2), 3)

    def loss(k):
        return jnp.sum(jnp.sin(jn.spectral_norm(k, state, update_stats=False)[0]))

    _, tangent = jax.jvp(loss, (kernels[0],), (t,))
    np.testing.assert_allclose(tangent, jnp.sum(jax.grad(loss)(kernels[0]) * t), rtol=1e-4)
    kb = kernels[0].astype(BF16)
    out_b, new_b = jn.spectral_norm(kb, state, update_stats=True)
    assert out_b.dtype == BF16 and new_b.u.dtype == F32
    np.testing.assert_allclose(np.asarray(out_b, np.float64), ref_power_iteration(kb, state.u)[0], rtol=1e-2, atol=1e-2)


def test_rank_below_two_passes_unchanged():
    bias = jnp.arange(3.0)
    out, state = jn.spectral_norm(bias, None, update_stats=True)
    assert out is bias and state is None
    assert jn.fold_spectral_norm(bias, None) is bias


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s: jn.spectral_norm(jnp.ones((3, 4)), s, n_steps=0, update_stats=True),
         r"spectral_norm: `n_steps` must be a Python int >= 1.*got 0"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 4)), s, n_steps=1.5, update_stats=True), r"`n_steps`.*got 1.5"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 5)), s, update_stats=True),
         r"`state.u` has shape \(1, 4\), but `kernel` of shape \(3, 5\).*needs \(1, 5\)"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 4)), s._replace(sigma=jnp.ones(1)), update_stats=True),
         r"`state.sigma` has shape \(1,\)"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 4)), (1, 2), update_stats=True), r"must be a jn.SpectralState"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 4)), s, update_stats=1), r"`update_stats` must be a Python bool"),
        (lambda s: jax.jit(lambda b: jn.spectral_norm(jnp.ones((3, 4)), s, update_stats=b))(True),
         r"`update_stats` must be a static Python bool"),
        (lambda s: jn.spectral_norm(jnp.ones((3, 4), jnp.int32), s, update_stats=True), r"must have a real floating"),
        (lambda s: jn.init_spectral_state(KEY, (4,)), r"init_spectral_state: `kernel_shape`=\(4,\) has rank 1"),
        (lambda s: jn.fold_spectral_norm(jnp.ones((3, 4)), s._replace(sigma=jnp.ones(2))), r"must be a scalar"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(jn.init_spectral_state(KEY, (3, 4)))


# --- linen --------------------------------------------------------------------------------


def _linen_model(wrapper, layer, dtype, **kw):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            if layer == "conv":
                x = wrapper(nn.Conv(4, (3, 3), param_dtype=dtype), param_dtype=dtype, **kw)(x, update_stats=train)
                x = x.reshape(x.shape[0], -1)
            return wrapper(nn.Dense(3, param_dtype=dtype), param_dtype=dtype, **kw)(x, update_stats=train)

    return Model()


def _train(model, variables, x, steps):
    def loss(p, stats):
        y, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.asarray(y, F32) ** 2), (y, upd["batch_stats"])

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    trace = []
    for _ in range(steps):
        (_, (y, stats)), grads = step(variables["params"], variables["batch_stats"])
        trace.append((y, grads, stats))
        params = jax.tree.map(lambda p, g: p - 1e-2 * g.astype(p.dtype), variables["params"], grads)
        variables = {"params": params, "batch_stats": stats}
    return trace, variables


@pytest.mark.parametrize("layer,dtype,kw", [
    ("dense", F32, {}), ("conv", F32, {}), ("conv", F32, {"n_steps": 3}), ("dense", BF16, {}), ("conv", BF16, {}),
])
def test_linen_matches_flax(layer, dtype, kw):
    x = rand((2, 6, 6, 2) if layer == "conv" else (4, 5), 5)
    ours, theirs = _linen_model(jl.SpectralNorm, layer, dtype, **kw), _linen_model(nn.SpectralNorm, layer, dtype, **kw)
    v_ours, v_theirs = ours.init(KEY, x, train=False), theirs.init(KEY, x, train=False)
    # same names, shapes, dtypes, values (u from the same key); flax's init stores the normalized
    # kernel (map_variables), which with bfloat16 u flax computes in bfloat16, jaxnorm in float32
    tol = {"rtol": 0, "atol": 0} if dtype == F32 else {"rtol": 2e-2, "atol": 2e-2}
    chex.assert_trees_all_equal_dtypes(v_ours, v_theirs)
    chex.assert_trees_all_close(v_ours, v_theirs, **tol)
    if dtype == BF16:
        # one step against the float32 model on the same variables: jaxnorm (float32 iteration)
        # must be at least as close to it as flax (bfloat16 iteration with bfloat16 u)
        ref = _linen_model(nn.SpectralNorm, layer, F32, **kw)
        (t_ref,), _ = _train(ref, jax.tree.map(lambda a: a.astype(F32), v_theirs), x, 1)
        (t_ours,), _ = _train(ours, v_ours, x, 1)
        (t_theirs,), _ = _train(theirs, v_theirs, x, 1)

        def err(t):
            return max(jax.tree.leaves(jax.tree.map(
                lambda a, b: float(jnp.max(jnp.abs(a.astype(F32) - b)) / (jnp.max(jnp.abs(b)) + 1e-6)), t, t_ref)))

        assert err(t_ours) <= 1.05 * err(t_theirs) + 1e-3, (err(t_ours), err(t_theirs))
        assert err(t_ours) < 5e-2
        return
    t_ours, end_ours = _train(ours, v_ours, x, STEPS)
    t_theirs, end_theirs = _train(theirs, v_theirs, x, STEPS)
    chex.assert_trees_all_close(t_ours, t_theirs, **tol)
    chex.assert_trees_all_close(end_ours, end_theirs, **tol)
    # evaluation iterates from the stored u and writes nothing, in both
    chex.assert_trees_all_close(ours.apply(end_theirs, x, train=False), theirs.apply(end_theirs, x, train=False), **tol)


def test_linen_rank_and_n_steps_rules():
    x = rand((2, 6, 6, 2))
    with pytest.raises(ValueError, match=r"SpectralNorm: `error_on_non_matrix`=True.*shape \(3, 3, 2, 4\)"):
        jl.SpectralNorm(nn.Conv(4, (3, 3)), error_on_non_matrix=True).init(KEY, x, update_stats=False)
    # n_steps < 1: flax's behaviour, no state and the layer's own output
    layer = jl.SpectralNorm(nn.Dense(3), n_steps=0)
    v = layer.init(KEY, x[:, 0, 0], update_stats=True)
    assert "batch_stats" not in v
    k, b = v["params"]["layer_instance"]["kernel"], v["params"]["layer_instance"]["bias"]
    np.testing.assert_allclose(layer.apply(v, x[:, 0, 0], update_stats=False), x[:, 0, 0] @ k + b, rtol=1e-6)


def test_linen_fold():
    x = rand((4, 5), 1)
    model = _linen_model(jl.SpectralNorm, "dense", F32)
    _, variables = _train(model, model.init(KEY, x, train=False), x, 30)
    stats = variables["batch_stats"]["SpectralNorm_0"]
    state = jn.SpectralState(stats["Dense_0/kernel/u"], stats["Dense_0/kernel/sigma"])
    p = variables["params"]["Dense_0"]
    frozen = jn.fold_spectral_norm(p["kernel"], state)
    ref_sigma = ref_power_iteration(p["kernel"], state.u)[2]
    np.testing.assert_allclose(frozen, np.asarray(p["kernel"]) / float(state.sigma), rtol=1e-6)
    # after training the stored sigma is (nearly) the one evaluation computes
    np.testing.assert_allclose(float(state.sigma), ref_sigma, rtol=5e-2)
    np.testing.assert_allclose(nn.Dense(3).apply({"params": {"kernel": frozen, "bias": p["bias"]}}, x),
                               model.apply(variables, x, train=False), rtol=5e-2, atol=5e-2)


# --- nnx ----------------------------------------------------------------------------------


def _values(model):
    return {path: jnp.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("layer,dtype", [("linear", F32), ("conv", F32), ("linear", BF16)])
def test_nnx_matches_flax(layer, dtype):
    def make(mod):
        r = nnx.Rngs(0)
        inner = (nnx.Linear(5, 3, param_dtype=dtype, rngs=r) if layer == "linear"
                 else nnx.Conv(2, 4, (3, 3), param_dtype=dtype, rngs=r))
        return mod.SpectralNorm(inner, param_dtype=dtype, rngs=r)

    ours, theirs = make(jx), make(nnx)
    chex.assert_trees_all_equal(_values(ours), _values(theirs))  # same paths, dtypes and values
    x = rand((4, 5) if layer == "linear" else (2, 6, 6, 2), 5)
    if dtype == BF16:  # bfloat16 iteration in flax, float32 here: outputs and statistics of one call
        chex.assert_trees_all_close(ours(x), theirs(x), rtol=5e-2, atol=5e-2)
        chex.assert_trees_all_close(_values(ours)[("batch_stats", ("kernel", "sigma"))],
                                    _values(theirs)[("batch_stats", ("kernel", "sigma"))], rtol=2e-2)
        return
    tol = {"rtol": 0, "atol": 0}
    for _ in range(STEPS):
        raw = theirs.layer_instance.kernel.get_value()
        g_ours = nnx.grad(lambda m: jnp.sum(jnp.asarray(m(x), F32) ** 2))(ours)
        g_theirs = nnx.grad(lambda m: jnp.sum(jnp.asarray(m(x), F32) ** 2))(theirs)
        # flax.nnx writes kernel / sigma into the layer (jaxnorm does not): undo it to compare the maths
        theirs.layer_instance.kernel.set_value(raw)
        chex.assert_trees_all_close(_values(g_ours), _values(g_theirs), **tol)
        chex.assert_trees_all_close(_values(ours), _values(theirs), **tol)  # u and sigma updated alike
        for model, g in ((ours, g_ours), (theirs, g_theirs)):
            for name in ("kernel", "bias"):
                var, gv = getattr(model.layer_instance, name), getattr(g.layer_instance, name)
                var.set_value(var.get_value() - 1e-2 * gv.get_value().astype(var.dtype))


def test_nnx_train_eval_and_raw_kernel():
    rngs = nnx.Rngs(0)
    model = jx.SpectralNorm(nnx.Linear(5, 3, rngs=rngs), rngs=rngs)
    raw = model.layer_instance.kernel.get_value()
    x = rand((4, 5), 1)
    model.eval()
    before = _values(model)
    y = model(x)
    chex.assert_trees_all_equal(_values(model), before)  # eval: nothing written
    np.testing.assert_allclose(y, x @ ref_power_iteration(raw, before[("batch_stats", ("kernel", "u"))])[0],
                               rtol=1e-5, atol=1e-6)
    model.train()
    nnx.jit(lambda m, x: m(x))(model, x)
    u_path = ("batch_stats", ("kernel", "u"))
    assert not np.array_equal(_values(model)[u_path], before[u_path])
    np.testing.assert_array_equal(model.layer_instance.kernel.get_value(), raw)  # the raw kernel stays
    model(x, update_stats=False)
    with pytest.raises(ValueError, match=r"SpectralNorm: `error_on_non_matrix`=True"):
        jx.SpectralNorm(nnx.Conv(2, 4, (3, 3), rngs=rngs), error_on_non_matrix=True, rngs=rngs)
    assert not jx.SpectralNorm(nnx.Linear(5, 3, rngs=rngs), n_steps=0, rngs=rngs).batch_stats
