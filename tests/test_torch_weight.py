"""jaxnorm.interop's weight-norm and spectral-norm conversion against PyTorch's own parametrizations."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn
import jaxnorm.interop as ji

torch = pytest.importorskip("torch")
P = torch.nn.utils.parametrizations


def _tensors(d):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


def _to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _flax_conv(x_nhwc, kernel, bias):
    import jax

    y = jax.lax.conv_general_dilated(x_nhwc, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


LAYERS = {
    "linear": (lambda: torch.nn.Linear(3, 4), (5, 3)),
    "conv": (lambda: torch.nn.Conv2d(2, 4, 3), (2, 2, 5, 5)),
}


def _apply(kind, x, kernel, bias):
    if kind == "linear":
        return np.asarray(jnp.asarray(x) @ kernel + bias)
    return np.asarray(_flax_conv(jnp.asarray(_to_nhwc(x)), kernel, bias))


def _torch_out(kind, module, x):
    with torch.no_grad():
        y = module(torch.from_numpy(x)).numpy()
    return y if kind == "linear" else _to_nhwc(y)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("legacy", [False, True])
def test_weight_norm_both_ways(kind, legacy):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    module = torch.nn.utils.weight_norm(make()) if legacy else P.weight_norm(make())
    with torch.no_grad():  # a gain that is not the initial norm
        g = module.weight_g if legacy else module.parametrizations.weight.original0
        g.mul_(torch.linspace(0.5, 2.0, g.shape[0]).reshape(g.shape))
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    params = ji.weight_norm_from_torch(module.state_dict())
    kernel = jn.weight_norm(params["kernel"], params["scale"])
    np.testing.assert_allclose(_apply(kind, x, kernel, params["bias"]), _torch_out(kind, module, x),
                               rtol=1e-5, atol=1e-5)
    # torch layout: feature_axes=0, scale of shape (C, 1, ...)
    raw = ji.weight_norm_from_torch(module.state_dict(), layout="torch")
    w_t = jn.weight_norm(raw["kernel"], raw["scale"], feature_axes=0)
    np.testing.assert_allclose(w_t, module.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    # back: a fresh module loads it and computes the same
    fresh = torch.nn.utils.weight_norm(make()) if legacy else P.weight_norm(make())
    sd = ji.weight_norm_to_torch(params, style="legacy" if legacy else "parametrizations", as_tensor=torch.from_numpy)
    fresh.load_state_dict(sd)
    np.testing.assert_allclose(_torch_out(kind, fresh, x), _torch_out(kind, module, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("legacy", [False, True])
def test_spectral_norm_both_ways(kind, legacy):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    module = torch.nn.utils.spectral_norm(make()) if legacy else P.spectral_norm(make())
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    module.train()
    for _ in range(3):
        module(torch.from_numpy(x))
    module.eval()
    params, state = ji.spectral_norm_from_torch(module.state_dict())
    # torch's eval weight is the folded kernel
    frozen = jn.fold_spectral_norm(params["kernel"], state)
    np.testing.assert_allclose(_apply(kind, x, frozen, params["bias"]), _torch_out(kind, module, x),
                               rtol=1e-5, atol=1e-5)
    # torch's u is jaxnorm's: one more training step of each gives the same weight and u
    w_next, new = jn.spectral_norm(params["kernel"], state, update_stats=True)
    module.train()
    with torch.no_grad():
        y_next = module(torch.from_numpy(x)).numpy()
    u_next = (module.weight_u if legacy else module.parametrizations.weight[0]._u).numpy()
    np.testing.assert_allclose(new.u[0], u_next, rtol=1e-4, atol=1e-5)
    y_ours = _apply(kind, x, w_next, params["bias"])
    np.testing.assert_allclose(y_ours, y_next if kind == "linear" else _to_nhwc(y_next), rtol=1e-4, atol=1e-4)
    # back: the eval output of the loaded module is jaxnorm's folded layer, exactly
    module.eval()
    params, state = ji.spectral_norm_from_torch(module.state_dict())
    state = state._replace(sigma=state.sigma * 1.01)  # a sigma that is not torch's own
    fresh = torch.nn.utils.spectral_norm(make()) if legacy else P.spectral_norm(make())
    fresh.load_state_dict(ji.spectral_norm_to_torch(params, state, style="legacy" if legacy else "parametrizations",
                                                    as_tensor=torch.from_numpy))
    fresh.eval()
    frozen = jn.fold_spectral_norm(params["kernel"], state)
    np.testing.assert_allclose(_torch_out(kind, fresh, x), _apply(kind, x, frozen, params["bias"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ji.weight_norm_from_torch({"fc.weight": np.ones((2, 2))}, prefix="fc"),
         r"weight_norm_from_torch: `state_dict` \(1 keys.*`prefix`='fc'"),
        (lambda: ji.spectral_norm_from_torch({"weight": np.ones((2, 2))}), r"spectral_norm_from_torch: `state_dict`"),
        (lambda: ji.weight_norm_from_torch({}, layout="nchw"), r"`layout`='nchw' is not one of 'flax', 'torch'"),
        (lambda: ji.weight_norm_to_torch({"kernel": np.ones((2, 2))}), r"needs 'kernel' and 'scale'"),
        (lambda: ji.spectral_norm_to_torch({"kernel": np.ones(2)}, None), r"a 'kernel' of rank >= 2"),
        (lambda: ji.spectral_norm_to_torch({"kernel": np.ones((2, 2))}, None, style="old"), r"`style`='old'"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
