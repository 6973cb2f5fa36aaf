"""Batch statistics across 8 host CPU devices against a float64 single-device NumPy reference.

Every way JAX spreads a batch over devices is checked on outputs, new running
statistics and gradients: ``shard_map`` (with and without ``check_vma``),
``pmap``, ``vmap(axis_name=...)`` and sharded ``jax.jit`` with a
``NamedSharding`` on the batch axis (no ``axis_name``). The gradient is the one
data-parallel training uses: each device differentiates its own local loss
``sum(y_local * w_local)`` with respect to its own input, and that must equal
the single-device gradient of the global loss ``sum(y * w)``.

Run as a script (``python tests/test_distributed.py``) it prints the measured
agreement of every mode with the reference.
"""

import os

if "jax" not in os.sys.modules:  # run as a script; under pytest conftest.py did this
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx
from jaxnorm._src.standardize import standardize

D = 8
AXIS = "batch"
MESH = jax.make_mesh((D,), (AXIS,))
EPS = 1e-5
MOMENTUM = 0.9
MODES = ["shard_map", "shard_map_unchecked", "pmap", "vmap", "sharded_jit"]


def shard(a):
    return jax.device_put(a, NamedSharding(MESH, P(AXIS)))


def problem(n=32, c=3, seed=0, loc=1.5, spread=3.0):
    rng = np.random.default_rng(seed)
    x = (loc + spread * rng.standard_normal((n, c))).astype(np.float32)
    w = rng.standard_normal((n, c)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    return x, w, scale, bias


# ---------------------------------------------------------------- reference


def reference(x, w, scale, bias, valid=None, eps=EPS):
    """Float64 Algorithm 1 over the valid rows of (N, C) x, and the gradient of sum(y * w).

    ``w`` must be zero on invalid rows (the loss ignores padded outputs), where
    the gradient is then zero too. Returns y, batch mean, biased batch var,
    running mean and (unbiased) running var after one step from (0, 1), dx,
    dscale, dbias.
    """
    x, w, scale, bias = (np.asarray(a, np.float64) for a in (x, w, scale, bias))
    valid = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    xv = x[valid]
    n = len(xv)
    mean, var = xv.mean(0), xv.var(0)
    inv = 1 / np.sqrt(var + eps)
    x_hat = np.where(valid[:, None], (x - mean) * inv, 0.0)
    y = np.where(valid[:, None], x_hat * scale + bias, 0.0)
    g = w * scale
    sum_g, sum_gx = g[valid].sum(0), (g * x_hat)[valid].sum(0)
    dx = np.where(valid[:, None], inv * (g - (sum_g + x_hat * sum_gx) / n), 0.0)
    run_mean = MOMENTUM * 0.0 + (1 - MOMENTUM) * mean
    run_var = MOMENTUM * 1.0 + (1 - MOMENTUM) * var * n / (n - 1)
    return dict(y=y, mean=run_mean, var=run_var, dx=dx, dscale=(w * x_hat).sum(0), dbias=w.sum(0))


# ---------------------------------------------------------------- the modes


def bn_step(x, scale, bias, w, *mask, core=jn.batch_norm, axis_name=AXIS, **kw):
    """One device's step: y, new running statistics, and d(local loss)/d(local x)."""
    mask = mask[0] if mask else None
    stats = jn.init_batch_stats(x.shape[-1])

    def local_loss(x):
        y, new = core(x, stats, scale, bias, training=True, momentum=MOMENTUM, unbiased=True,
                      mask=mask, axis_name=axis_name, **kw)
        return jnp.sum(y * w), (y, new)

    dx, (y, new) = jax.grad(local_loss, has_aux=True)(x)
    return y, new.mean, new.var, dx


def distribute(mode, step, stats_out=P()):  # noqa: B008
    """Wraps a per-device ``step(x, scale, bias, w, *mask)`` for ``mode``; global arrays in and out.

    Returns ``run(x, scale, bias, w, *mask) -> (y, mean, var, dx)`` with y and
    dx of x's global shape and the statistics of device 0 (after checking that
    every device holds the same ones where they are replicated).
    """
    if mode == "sharded_jit":
        f = jax.jit(functools.partial(step, axis_name=None))

        def run(x, scale, bias, w, *mask):
            return f(shard(x), scale, bias, shard(w), *map(shard, mask))

        return run
    if mode.startswith("shard_map"):
        def run(x, scale, bias, w, *mask):
            specs = (P(AXIS), P(), P(), P(AXIS)) + (P(AXIS),) * len(mask)
            f = jax.jit(jax.shard_map(step, mesh=MESH, in_specs=specs,
                                      out_specs=(P(AXIS), stats_out, stats_out, P(AXIS)),
                                      check_vma=mode == "shard_map"))
            return f(shard(x), scale, bias, shard(w), *map(shard, mask))

        return run

    def run(x, scale, bias, w, *mask):
        axes = (0, None, None, 0) + (0,) * len(mask)
        if mode == "pmap":
            f = jax.pmap(step, axis_name=AXIS, in_axes=axes)
        else:
            f = jax.jit(jax.vmap(step, axis_name=AXIS, in_axes=axes))
        local = lambda a: np.reshape(a, (D, -1) + np.shape(a)[1:])  # noqa: E731
        y, mean, var, dx = f(local(x), scale, bias, local(w), *map(local, mask))
        if stats_out == P():
            np.testing.assert_array_equal(mean, np.broadcast_to(mean[0], mean.shape))
            mean, var = mean[0], var[0]
        else:
            mean, var = np.reshape(mean, (-1,) + mean.shape[2:]), np.reshape(var, (-1,) + var.shape[2:])
        return np.reshape(y, np.shape(x)), mean, var, np.reshape(dx, np.shape(x))

    return run


def outside_grads(mode, x, scale, bias, w, *mask):
    """jax.grad of the global loss taken outside the distribution, w.r.t. x, scale and bias."""
    def forward(x, scale, bias):
        y = jn.batch_norm(x, jn.init_batch_stats(x.shape[-1]), scale, bias, training=True,
                          mask=mask[0] if mask else None, axis_name=None if mode == "sharded_jit" else AXIS)[0]
        return y

    if mode == "sharded_jit":
        f = forward
    elif mode.startswith("shard_map"):
        f = jax.shard_map(forward, mesh=MESH, in_specs=(P(AXIS), P(), P()), out_specs=P(AXIS),
                          check_vma=mode == "shard_map")
    else:
        vm = (functools.partial(jax.pmap, axis_name=AXIS, in_axes=(0, None, None)) if mode == "pmap"
              else functools.partial(jax.vmap, axis_name=AXIS, in_axes=(0, None, None)))
        g = vm(forward)
        f = lambda x, s, b: jnp.reshape(g(jnp.reshape(x, (D, -1) + x.shape[1:]), s, b), x.shape)  # noqa: E731
    loss = lambda x, s, b: jnp.sum(f(x, s, b) * w)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1, 2))
    if mode in ("pmap", "vmap"):
        return jax.jit(grad)(x, scale, bias)
    return jax.jit(grad)(shard(x), scale, bias)


def diffs(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    return float(err.max()), float((err / np.maximum(np.abs(want), 1e-3)).max())


def check(got, want, atol, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- tests


def agreement(mode, masked=False):
    """Measured max |difference| (abs, rel) of y, stats and gradients against the reference."""
    x, w, scale, bias = problem()
    mask = ()
    valid = None
    if masked:
        x, w, valid = uneven(x, w)
        mask = (valid,)
    want = reference(x, w, scale, bias, valid)
    y, mean, var, dx = distribute(mode, bn_step)(x, scale, bias, w, *mask)
    if valid is not None:
        y = np.where(valid, y, 0.0)
    got = dict(y=y, mean=mean, var=var, dx=dx)
    if not masked:
        got["dx_outside"], got["dscale"], got["dbias"] = outside_grads(mode, x, scale, bias, w)
        want["dx_outside"] = want["dx"]
    return got, want


@pytest.mark.parametrize("mode", MODES)
def test_matches_single_device_reference(mode):
    got, want = agreement(mode)
    check(got["y"], want["y"], 2e-5)
    check(got["mean"], want["mean"], 1e-6, 1e-5)
    check(got["var"], want["var"], 1e-6, 1e-5)
    for k in ("dx", "dx_outside", "dscale", "dbias"):
        check(got[k], want[k], 2e-5)


def uneven(x, w):
    """4 rows per device with 4, 3, 1, 2, 4, 0, 3, 2 valid; device 2's one valid row is an outlier.

    Padded rows hold NaN (they must reach neither statistics nor gradients) and
    get zero weight in the loss.
    """
    counts = [4, 3, 1, 2, 4, 0, 3, 2]
    per = len(x) // D
    valid = np.zeros((len(x), 1), bool)
    for d, c in enumerate(counts):
        valid[d * per: d * per + c] = True
    x = x.copy()
    x[2 * per] = 40.0 + np.arange(x.shape[1])
    x = np.where(valid, x, np.nan).astype(np.float32)
    return x, np.where(valid, w, 0).astype(np.float32), valid


@pytest.mark.parametrize("mode", MODES)
def test_uneven_masked_counts_equal_the_reference_over_valid_rows(mode):
    got, want = agreement(mode, masked=True)
    check(got["y"], want["y"], 2e-5)
    check(got["mean"], want["mean"], 1e-6, 1e-5)
    check(got["var"], want["var"], 1e-5, 1e-5)
    assert np.all(np.isfinite(got["dx"]))
    check(got["dx"], want["dx"], 2e-5)


class MaskedBN(nn.Module):
    """A BatchNorm taking the mask positionally, so that nn.vmap maps it with x."""

    cls: type
    kw: dict

    @nn.compact
    def __call__(self, x, mask):
        bn = self.cls(use_running_average=False, axis_name=AXIS, momentum=0.0, name="bn", **self.kw)
        return bn(x, mask=mask)


def test_flax_averages_per_device_means_and_is_wrong_with_uneven_counts():
    x, w, _, _ = problem()
    counts = [4, 3, 1, 2, 4, 1, 3, 2]  # flax returns NaN outright for a device without valid rows
    per = len(x) // D
    valid = np.zeros((len(x), 1), bool)
    for d, c in enumerate(counts):
        valid[d * per: d * per + c] = True
    x[2 * per] = 40.0
    ys, stats = {}, {}
    for lib, cls, kw in (("flax", nn.BatchNorm, {"use_fast_variance": False}), ("ours", jnl.BatchNorm, {})):
        vm = nn.vmap(MaskedBN, variable_axes={"params": None, "batch_stats": None}, split_rngs={"params": False},
                     axis_name=AXIS)(cls, kw)
        xs, ms = x.reshape(D, per, -1), valid.reshape(D, per, 1)
        v = jax.jit(vm.init)(jax.random.key(0), xs, ms)
        y, upd = jax.jit(lambda v, x, m: vm.apply(v, x, m, mutable=["batch_stats"]))(v, xs, ms)  # noqa: B023
        ys[lib], stats[lib] = y.reshape(x.shape), upd["batch_stats"]["bn"]
    mean = x[valid[:, 0]].astype(np.float64).mean(0)
    var = x[valid[:, 0]].astype(np.float64).var(0)
    flax_err = np.abs(np.asarray(stats["flax"]["mean"]) - mean).max()
    ours_err = np.abs(np.asarray(stats["ours"]["mean"]) - mean).max()
    assert ours_err < 1e-5 and flax_err > 1.0, (ours_err, flax_err)
    check(stats["ours"]["var"], var, 1e-4, 1e-5)
    y_ref = (x - mean) / np.sqrt(var + EPS)
    keep = valid[:, 0]
    check(np.asarray(ys["ours"])[keep], y_ref[keep], 2e-5)
    assert np.abs(np.asarray(ys["flax"])[keep] - y_ref[keep]).max() > 0.1


@pytest.mark.parametrize("mode", ["shard_map", "vmap", "sharded_jit"])
def test_large_offset_float32_variance_right_to_one_percent(mode):
    rng = np.random.default_rng(3)
    n = 64
    # each device also sits a little apart, so the merge must add the spread of the device means
    device_offset = np.repeat(np.arange(D) * 0.5e-2, n)[:, None]
    x = (1e4 + 1e-2 * rng.standard_normal((D * n, 4)) + device_offset).astype(np.float32)
    w = np.zeros_like(x)
    xv = x.astype(np.float64)

    def step(x, scale, bias, w, axis_name=AXIS):
        y, _, _, _ = bn_step(x, scale, bias, w, axis_name=axis_name)
        mean, var = jn.moments(x, 0, axis_name=axis_name)
        return y, mean, var, y

    y, mean, var, _ = distribute(mode, step)(x, np.ones(4, np.float32), np.zeros(4, np.float32), w)
    # measured: 2e-8 relative; one-pass E[x^2] - E[x]^2 in float32 loses every digit here
    np.testing.assert_allclose(var, xv.var(0), rtol=1e-2)
    np.testing.assert_allclose(mean, xv.mean(0), rtol=1e-7)
    check(y, (xv - xv.mean(0)) / np.sqrt(xv.var(0) + EPS), 1e-2)


GROUPS = {"halves": [[0, 1, 2, 3], [4, 5, 6, 7]], "interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]],
          "uneven_sizes": [[0, 1, 2, 3, 4, 5], [6, 7]]}


def group_step(x, scale, bias, w, groups):
    y, mean, var, dx = bn_step(x, scale, bias, w, axis_index_groups=groups)
    return y, mean[None], var[None], dx


@pytest.mark.parametrize("mode", ["shard_map", "pmap", "vmap"])
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_axis_index_groups_each_group_equals_its_own_reference(mode, name):
    if mode == "pmap" and name == "uneven_sizes":
        pytest.skip("covered by shard_map and vmap; one pmap case is enough")
    groups = GROUPS[name]
    x, w, scale, bias = problem(seed=4)
    step = functools.partial(group_step, groups=groups)
    y, mean, var, dx = distribute(mode, step, stats_out=P(AXIS))(x, scale, bias, w)
    per = len(x) // D
    for g in groups:
        rows = np.concatenate([np.arange(d * per, (d + 1) * per) for d in g])
        want = reference(x[rows], w[rows], scale, bias)
        check(np.asarray(y)[rows], want["y"], 2e-5)
        check(np.asarray(dx)[rows], want["dx"], 2e-5)
        for d in g:
            check(np.asarray(mean)[d], want["mean"], 1e-6, 1e-5)
            check(np.asarray(var)[d], want["var"], 1e-6, 1e-5)


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3], [4, 5, 6]], [[0, 1, 2, 3], [3, 4, 5, 6, 7]], [[0, 1, 2, 3, 4, 5, 6, 7], []]])  # noqa: E501
def test_bad_axis_index_groups_are_refused(groups):
    x, w, scale, bias = problem()
    f = distribute("vmap", functools.partial(group_step, groups=groups), stats_out=P(AXIS))
    with pytest.raises(
        ValueError, match=r"batch_norm: `axis_index_groups`=.* must split the 8 indices of `axis_name`='batch'"
    ):
        f(x, scale, bias, w)


def test_axis_index_groups_without_axis_name_are_refused():
    x, w, scale, bias = problem()
    with pytest.raises(ValueError, match=r"moments: `axis_index_groups`=.* without `axis_name`"):
        jn.moments(x, 0, axis_index_groups=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"batch_norm: `axis_index_groups`=.* without `axis_name`"):
        bn_step(x, scale, bias, w, axis_name=None, axis_index_groups=[[0, 1], [2, 3]])


def test_several_mesh_axes_as_one_axis_name():
    """A batch sharded over two mesh axes: axis_name=("a", "b") synchronizes over both."""
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    x, w, scale, bias = problem(seed=13)
    names = ("a", "b")
    f = jax.jit(
        jax.shard_map(
            functools.partial(bn_step, axis_name=names),
            mesh=mesh,
            in_specs=(P(names), P(), P(), P(names)),
            out_specs=(P(names), P(), P(), P(names)),
        )
    )
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(names)))  # noqa: E731
    y, mean, var, dx = f(put(x), scale, bias, put(w))
    want = reference(x, w, scale, bias)
    check(y, want["y"], 2e-5)
    check(dx, want["dx"], 2e-5)
    check(mean, want["mean"], 1e-6, 1e-5)
    check(var, want["var"], 1e-6, 1e-5)


def test_one_example_per_device_under_vmap_is_not_refused():
    x, w, scale, bias = problem(n=16)
    step = lambda x, w: bn_step(x, scale, bias, w)  # noqa: E731  each device holds one example of shape (C,)
    y, mean, var, dx = jax.jit(jax.vmap(step, axis_name=AXIS))(x, w)
    want = reference(x, w, scale, bias)
    check(y, want["y"], 2e-5)
    check(dx, want["dx"], 2e-5)
    check(mean[0], want["mean"], 1e-6, 1e-5)
    with pytest.raises(ValueError, match="more than one value per feature"):
        jax.vmap(lambda x, w: bn_step(x, scale, bias, w, axis_name=None))(x, w)


# ---------------------------------------------------------------- collectives in the compiled HLO


def collectives(f, *args):
    """{op: count} of the cross-device ops in the optimized HLO of ``jax.jit(f)``."""
    text = jax.jit(f).lower(*args).compile().as_text()
    ops = re.findall(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", text)
    return {op: ops.count(op) for op in sorted(set(ops))}


def _conv_input():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 4, 4, 3)).astype(np.float32)
    mask = np.ones((16, 1, 1, 1), bool)
    mask[3:8] = False
    return x, mask, np.ones(3, np.float32), np.zeros(3, np.float32)


def _bn(x, scale, bias, mask, axis_name):
    return jn.batch_norm(x, jn.init_batch_stats(3), scale, bias, training=True, mask=mask, axis_name=axis_name)


def _loss(x, scale, bias, mask, axis_name):
    return jnp.sum(jnp.sin(_bn(x, scale, bias, mask, axis_name)[0]))


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_jit_hlo_has_all_reduces_and_no_all_gather_of_the_data(masked):
    x, mask, scale, bias = _conv_input()
    m = shard(mask) if masked else None
    fwd = collectives(lambda x: _bn(x, scale, bias, m, None), shard(x))
    both = collectives(jax.grad(lambda x, s, b: _loss(x, s, b, m, None), argnums=(0, 1, 2)), shard(x), scale, bias)
    # Forward: the shift pass, then (offset, mean square[, count]) combined; backward: one more.
    assert fwd == {"all-reduce": 2}, fwd
    assert both == {"all-reduce": 3}, both


def test_sharded_jit_on_an_auto_mesh_matches_the_reference_without_gathering_the_data():
    # On an Auto mesh the sharding is not in x's type, so the unmasked shift (the
    # first value) is read from the device that holds it: XLA sends it with small
    # all-reduces (5 in all here, against 2 on an Explicit mesh), never the data.
    mesh = jax.make_mesh((D,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    x, _, scale, bias = _conv_input()
    x = x + 1e3
    xs = jax.device_put(x, NamedSharding(mesh, P(AXIS)))
    y, new = jax.jit(lambda x: _bn(x, scale, bias, None, None))(xs)
    xd = x.astype(np.float64)
    mean, var = xd.mean((0, 1, 2)), xd.var((0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (xd - mean) / np.sqrt(var + EPS), atol=2e-3)
    np.testing.assert_allclose(np.asarray(new.mean), 0.01 * mean, rtol=1e-5)  # default momentum 0.99
    ops = collectives(lambda x: _bn(x, scale, bias, None, None), xs)
    assert set(ops) == {"all-reduce"}, ops


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_hlo_uses_one_collective_forward_and_one_backward(masked):
    x, mask, scale, bias = _conv_input()
    specs = (P(AXIS), P(), P(), P(AXIS))

    def step(x, scale, bias, mask):
        mask = mask if masked else None
        y, new = _bn(x, scale, bias, mask, AXIS)
        dx = jax.grad(_loss)(x, scale, bias, mask, AXIS)
        return y, new.mean, dx

    def fwd(x, scale, bias, mask):
        y, new = _bn(x, scale, bias, mask if masked else None, AXIS)
        return y, new.mean

    f = jax.shard_map(fwd, mesh=MESH, in_specs=specs, out_specs=(P(AXIS), P()))
    g = jax.shard_map(step, mesh=MESH, in_specs=specs, out_specs=(P(AXIS), P(), P(AXIS)))
    assert collectives(f, shard(x), scale, bias, shard(mask)) == {"all-reduce": 1}
    assert collectives(g, shard(x), scale, bias, shard(mask)) == {"all-reduce": 2}


# ---------------------------------------------------------------- the rest of the cross-device surface


def test_batch_renorm_with_axis_name_matches_the_reference():
    x, w, scale, bias = problem(seed=6)
    run_mean, run_var = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    r_max, d_max = 1.5, 0.25

    def step(x, scale, bias, w):
        stats = jn.BatchStats(jnp.asarray(run_mean), jnp.asarray(run_var), jnp.zeros((), jnp.int32))

        def local_loss(x):
            y, new = jn.batch_renorm(
                x,
                stats,
                scale,
                bias,
                training=True,
                r_max=r_max,
                d_max=d_max,
                momentum=MOMENTUM,
                axis_name=AXIS,
                axis_index_groups=None,
            )
            return jnp.sum(y * w), (y, new)

        dx, (y, new) = jax.grad(local_loss, has_aux=True)(x)
        return y, new.mean, new.var, dx

    y, mean, var, dx = distribute("shard_map", step)(x, scale, bias, w)
    xf = x.astype(np.float64)
    mu_b, var_b = xf.mean(0), xf.var(0)
    sigma_b, sigma = np.sqrt(var_b + EPS), np.sqrt(run_var + EPS)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - run_mean) / sigma, -d_max, d_max)
    assert np.any(r != sigma_b / sigma) or np.any(d != (mu_b - run_mean) / sigma)  # the clip is active
    check(y, ((xf - mu_b) / sigma_b * r + d) * scale + bias, 2e-5)
    check(mean, MOMENTUM * run_mean + (1 - MOMENTUM) * mu_b, 1e-6, 1e-5)
    check(var, MOMENTUM * run_var + (1 - MOMENTUM) * var_b, 1e-6, 1e-5)
    # r and d are constants: the gradient is batch norm's with scale * r in place of scale.
    check(dx, reference(x, w, scale * r, bias)["dx"], 2e-5)


def _per_device_weights(seed, c=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((D, c)).astype(np.float32), rng.standard_normal((D, c)).astype(np.float32)


@pytest.mark.parametrize("mode", ["shard_map", "shard_map_unchecked", "vmap"])
def test_moments_with_axis_name_values_and_gradients(mode):
    """Each device's loss weighs the global mean and var by its own u, v: d(sum of losses)/dx."""
    x, _, _, _ = problem(seed=7)
    u, v = _per_device_weights(8)

    def step(x, u, v):
        def local_loss(x):
            mean, var = jn.moments(x, 0, axis_name=AXIS)
            return jnp.sum(u * mean + v * var), (mean, var)

        dx, (mean, var) = jax.grad(local_loss, has_aux=True)(x)
        return mean[None], var[None], dx

    if mode == "vmap":
        mean, var, dx = jax.jit(jax.vmap(step, axis_name=AXIS))(x.reshape(D, -1, 3), u, v)
    else:
        f = jax.shard_map(
            step,
            mesh=MESH,
            in_specs=(P(AXIS), P(AXIS), P(AXIS)),
            out_specs=(P(AXIS),) * 3,
            check_vma=mode == "shard_map",
        )
        mean, var, dx = jax.jit(f)(shard(x), shard(u), shard(v))
    mean, var = np.reshape(mean, (D, 3)), np.reshape(var, (D, 3))
    xf = x.astype(np.float64)
    n = len(x)
    check(mean, np.broadcast_to(xf.mean(0), (D, 3)), 1e-5, 1e-5)
    check(var, np.broadcast_to(xf.var(0), (D, 3)), 1e-5, 1e-5)
    want_dx = u.sum(0) / n + 2 * v.sum(0) * (xf - xf.mean(0)) / n
    check(np.reshape(dx, x.shape), want_dx, 1e-5)


@pytest.mark.parametrize("mode", ["shard_map", "shard_map_unchecked", "vmap"])
def test_fused_backward_sums_statistic_cotangents_once(mode):
    """Gradient through x_hat and the returned statistics of the fused op, per-device weights."""
    x, w, _, _ = problem(seed=9)
    u, v = _per_device_weights(10)

    def step(x, w, u, v):
        def local_loss(x):
            x_hat, m = standardize(x, (0,), epsilon=EPS, axis_name=AXIS)
            return jnp.sum(w * x_hat) + jnp.sum(u * m.var) + jnp.sum(v * m.mean)

        return jax.grad(local_loss)(x)

    if mode == "vmap":
        dx = jax.jit(jax.vmap(step, axis_name=AXIS))(x.reshape(D, -1, 3), w.reshape(D, -1, 3), u, v)
    else:
        f = jax.shard_map(step, mesh=MESH, in_specs=(P(AXIS),) * 4, out_specs=P(AXIS), check_vma=mode == "shard_map")
        dx = jax.jit(f)(shard(x), shard(w), shard(u), shard(v))
    xf = x.astype(np.float64)
    n = len(x)
    want = reference(x, w, np.ones(3), np.zeros(3))["dx"]
    want = want + 2 * u.sum(0) * (xf - xf.mean(0)) / n + v.sum(0) / n
    check(np.reshape(dx, x.shape), want, 2e-5)


def test_linen_batch_norm_under_shard_map_matches_the_reference():
    x, w, scale, bias = problem(seed=11)
    bn = jnl.BatchNorm(use_running_average=False, axis_name=AXIS, momentum=MOMENTUM, unbiased=True)
    variables = bn.init(jax.random.key(0), x)
    variables = {**variables, "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}

    def step(variables, x, w):
        def local_loss(x):
            y, upd = bn.apply(variables, x, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd["batch_stats"])

        dx, (y, stats) = jax.grad(local_loss, has_aux=True)(x)
        return y, stats, dx

    f = jax.jit(jax.shard_map(step, mesh=MESH, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(), P(AXIS))))
    y, stats, dx = f(variables, shard(x), shard(w))
    want = reference(x, w, scale, bias)
    check(y, want["y"], 2e-5)
    check(dx, want["dx"], 2e-5)
    check(stats["mean"], want["mean"], 1e-6, 1e-5)
    check(stats["var"], want["var"], 1e-6, 1e-5)
    assert int(stats["count"]) == 1


def test_nnx_batch_norm_under_shard_map_matches_the_reference():
    x, w, scale, bias = problem(seed=12)
    model = jnx.BatchNorm(3, axis_name=AXIS, momentum=MOMENTUM, unbiased=True, rngs=nnx.Rngs(0))
    model.scale[...] = jnp.asarray(scale)
    model.bias[...] = jnp.asarray(bias)
    graphdef, state = nnx.split(model)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, nnx.state(m, nnx.BatchStat)

    f = jax.jit(jax.shard_map(step, mesh=MESH, in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P())))
    y, stats = f(state, shard(x))
    want = reference(x, w, scale, bias)
    check(y, want["y"], 2e-5)
    check(stats["mean"][...], want["mean"], 1e-6, 1e-5)
    check(stats["var"][...], want["var"], 1e-6, 1e-5)


if __name__ == "__main__":
    print(f"{'mode':22s} {'quantity':10s} {'max abs':>10s} {'max rel':>10s}")
    for masked in (False, True):
        for mode in MODES:
            got, want = agreement(mode, masked)
            for k in got:
                a, r = diffs(got[k], want[k])
                print(f"{mode + (' masked' if masked else ''):22s} {k:10s} {a:10.2e} {r:10.2e}")


def test_per_device_batch_norm_under_checked_shard_map_sums_replicated_parameter_gradients():
    # Without axis_name each device normalizes its own rows; the scale and bias
    # are replicated, so their gradient is the sum of the devices' gradients.
    x, w, scale, bias = problem()

    def local_loss(x, scale, bias, w):
        y, _ = jn.batch_norm(x, jn.init_batch_stats(3), scale, bias, training=True)
        return jnp.sum(y * w)

    def step(x, scale, bias, w):
        return jax.grad(local_loss, argnums=(1, 2))(x, scale, bias, w)

    f = jax.jit(jax.shard_map(step, mesh=MESH, in_specs=(P(AXIS), P(), P(), P(AXIS)), out_specs=(P(), P())))
    d_scale, d_bias = f(shard(x), scale, bias, shard(w))
    xd, wd = x.astype(np.float64).reshape(D, -1, 3), w.astype(np.float64).reshape(D, -1, 3)
    x_hat = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(d_scale), (wd * x_hat).sum((0, 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_bias), wd.sum((0, 1)), rtol=1e-5, atol=1e-5)
