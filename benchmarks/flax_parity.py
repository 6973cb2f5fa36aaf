"""Max differences between jaxnorm's Flax layers and flax's own (use_fast_variance=False).

Prints a Markdown table: for every layer and layout of tests/flax_cases.py, the
largest absolute difference in the outputs (training steps and evaluation) and
in the running statistics, for linen and NNX, float32 on CPU.

    PYTHONPATH=$PWD python benchmarks/flax_parity.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from flax_cases import LAYOUTS, STATELESS, feature_mask, make_input, make_mask, max_abs  # noqa: E402

import jaxnorm.linen as jnl  # noqa: E402
import jaxnorm.nnx as jnx  # noqa: E402

KEY = jax.random.key(0)
STEPS = 5


def linen_bn(layout):
    shape, axis, mask_shape = LAYOUTS[layout]
    xs = [make_input(shape, s) for s in range(STEPS)]
    masks = [make_mask(mask_shape, s) for s in range(STEPS)]
    runs = []
    for bn in (nn.BatchNorm(axis=axis, momentum=0.8, use_fast_variance=False), jnl.BatchNorm(axis=axis, momentum=0.8)):
        v = bn.init(KEY, xs[0], use_running_average=False)
        step = jax.jit(
            lambda v, x, m, bn=bn: bn.apply(v, x, use_running_average=False, mask=m, mutable=["batch_stats"])
        )
        ys, stats = [], []
        for x, m in zip(xs, masks):
            y, upd = step(v, x, m)
            v = {**v, **upd}
            ys.append(y)
            stats.append((upd["batch_stats"]["mean"], upd["batch_stats"]["var"]))
        ys.append(bn.apply(v, make_input(shape, 99), use_running_average=True))
        runs.append((ys, stats))
    return max_abs(np.stack(runs[0][0]), np.stack(runs[1][0])), max_abs(np.array(runs[0][1]), np.array(runs[1][1]))


def nnx_bn(layout):
    shape, axis, mask_shape = LAYOUTS[layout]
    runs = []
    for mod in (
        nnx.BatchNorm(shape[axis], axis=axis, momentum=0.8, use_fast_variance=False, rngs=nnx.Rngs(0)),
        jnx.BatchNorm(shape[axis], axis=axis, momentum=0.8, rngs=nnx.Rngs(0)),
    ):
        ys, stats = [], []
        for s in range(STEPS):
            ys.append(nnx.jit(lambda m, x, k: m(x, mask=k))(mod, make_input(shape, s), make_mask(mask_shape, s)))
            stats.append((mod.mean[...], mod.var[...]))
        mod.eval()
        ys.append(mod(make_input(shape, 99)))
        runs.append((ys, stats))
    return max_abs(np.stack(runs[0][0]), np.stack(runs[1][0])), max_abs(np.array(runs[0][1]), np.array(runs[1][1]))


def stateless(layout, name):
    shape, _, mask_shape = LAYOUTS[layout]
    kwargs, _, param_axes, _ = STATELESS[layout][name]
    x = make_input(shape, 3)
    mask = None
    if mask_shape is not None:
        mask = (
            feature_mask(shape, 3)
            if name in ("LayerNorm", "RMSNorm")
            else np.broadcast_to(make_mask(mask_shape, 3), shape)
        )
    theirs = getattr(nn, name)(use_fast_variance=False, **kwargs)
    v = theirs.init(KEY, x)
    d_linen = max_abs(theirs.apply(v, x, mask=mask), getattr(jnl, name)(**kwargs).apply(v, x, mask=mask))
    c = shape[param_axes[0]]
    a = getattr(nnx, name)(c, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    b = getattr(jnx, name)(c, rngs=nnx.Rngs(0), **kwargs)
    return d_linen, max_abs(a(x, mask=mask), b(x, mask=mask))


def main():
    print("| layer | layout | linen: outputs | linen: running stats | nnx: outputs | nnx: running stats |")
    print("|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        lo, ls = linen_bn(layout)
        no, ns = nnx_bn(layout)
        print(f"| BatchNorm | {layout} | {lo:.1e} | {ls:.1e} | {no:.1e} | {ns:.1e} |")
    for layout, layers in STATELESS.items():
        for name in layers:
            lo, no = stateless(layout, name)
            print(f"| {name} | {layout} | {lo:.1e} | - | {no:.1e} | - |")

    from flax_cases import ref_standardize, ref_stateless

    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 8))).astype(np.float32)
    ref = ref_standardize(x, (0,), None, 1e-5)[0]
    print("\nLarge offset (mean 1e4, std 1e-2, (16, 8)), BatchNorm training output vs float64:")
    for label, mod in (
        ("flax default (one-pass)", nn.BatchNorm()),
        ("flax use_fast_variance=False", nn.BatchNorm(use_fast_variance=False)),
        ("jaxnorm", jnl.BatchNorm()),
    ):
        v = mod.init(KEY, x, use_running_average=False)
        y, _ = mod.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        print(f"  {label}: {max_abs(y, ref):.2e}")
    x = make_input((3, 5, 6), 4)
    ref = ref_stateless(x, "GroupNorm", (2,), 2, 1e-6)
    kw = dict(num_groups=2, reduction_axes=(-1,))
    print("\nGroupNorm(num_groups=2, reduction_axes=(-1,)) on (3, 5, 6) vs float64:")
    print(f"  flax.nnx: {max_abs(nnx.GroupNorm(6, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)(x), ref):.2e}")
    v = nn.GroupNorm(**kw).init(KEY, x)
    print(f"  flax.linen: {max_abs(nn.GroupNorm(use_fast_variance=False, **kw).apply(v, x), ref):.2e}")
    print(f"  jaxnorm.nnx: {max_abs(jnx.GroupNorm(6, rngs=nnx.Rngs(0), **kw)(x), ref):.2e}")


if __name__ == "__main__":
    main()
