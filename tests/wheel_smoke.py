"""A training step of every norm, using only jaxnorm's runtime dependencies (jax, flax, numpy).

Run by tests/test_wheel.py inside a fresh virtual environment that holds the
built wheel and nothing of the test extras; also usable by hand to check a
version floor: ``python tests/wheel_smoke.py`` prints one line per norm and
"ok" last.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxnorm as jn
import jaxnorm.interop as ji
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (8, 4, 4, 6)) * 2 + 1  # N, H, W, C
TARGET = jax.random.normal(jax.random.key(1), (8, 4, 4, 6))
C = 6


def sgd_step(norm, params, state):
    """One step of gradient descent on a squared error through `norm`; returns the loss and new state."""

    def loss_fn(params):
        y, new_state = norm(X, params, state)
        return jnp.mean((y - TARGET) ** 2), new_state

    (loss, state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert np.isfinite(float(loss)), loss
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    return float(loss), params, state


def affine():
    return {"scale": jnp.ones(C), "bias": jnp.zeros(C)}


FUNCTIONAL = {
    "batch_norm": lambda x, p, s: jn.batch_norm(x, s, p["scale"], p["bias"], training=True),
    "batch_renorm": lambda x, p, s: jn.batch_renorm(x, s, p["scale"], p["bias"], training=True),
    "ghost batch_norm": lambda x, p, s: jn.batch_norm(x, s, p["scale"], p["bias"], training=True, ghost_batch_size=4),
    "layer_norm": lambda x, p, s: (jn.layer_norm(x, p["scale"], p["bias"]), s),
    "rms_norm": lambda x, p, s: (jn.rms_norm(x, p["scale"]), s),
    "group_norm": lambda x, p, s: (jn.group_norm(x, p["scale"], p["bias"], num_groups=3), s),
    "instance_norm": lambda x, p, s: (jn.instance_norm(x, p["scale"], p["bias"]), s),
}


def main() -> None:
    for name, norm in FUNCTIONAL.items():
        loss, _, state = sgd_step(norm, affine(), jn.init_batch_stats(C))
        print(f"{name}: loss {loss:.4f}, count {int(state.count)}")

    stats = jn.recalibrate(lambda s, x: jn.batch_norm(x, s, training=True)[1], jn.init_batch_stats(C), [X, X + 1])
    assert int(stats.count) == 2
    params = ji.batch_norm_from_torch(ji.batch_norm_to_torch(affine(), stats))[0]
    assert set(params) == {"scale", "bias"}

    for layer in ("BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"):
        kwargs = {"num_groups": 3} if layer == "GroupNorm" else {}
        module = getattr(jnl, layer)(**kwargs) if layer not in ("BatchNorm", "BatchRenorm") else \
            getattr(jnl, layer)(use_running_average=False)
        variables = module.init(KEY, X)

        def linen_norm(x, params, state, module=module):
            y, updates = module.apply({"params": params, **state}, x, mutable=list(state))
            return y, updates

        loss, _, _ = sgd_step(linen_norm, variables["params"], {k: v for k, v in variables.items() if k != "params"})
        print(f"linen.{layer}: loss {loss:.4f}")

        model = getattr(jnx, layer)(C, rngs=nnx.Rngs(0), **kwargs)
        model.train()

        @nnx.jit
        def nnx_step(model):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - TARGET) ** 2))(model)
            return loss, grads

        loss, _ = nnx_step(model)
        assert np.isfinite(float(loss))
        print(f"nnx.{layer}: loss {float(loss):.4f}")
    print(f"ok: jaxnorm {jn.__version__} from {jn.__file__}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
