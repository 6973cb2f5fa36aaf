"""Forward mode (jvp, jacfwd) through every public Flax layer not covered by tests/test_forward_mode.py.

Each layer runs in training mode where it has one (batch statistics, updated
``u``/``sigma``, folded-in feature statistics), and is differentiated with
respect to its floating inputs (``x``, the condition, a recurrent carry) and
its parameters. The independent answers:

- flax.linen's ``SpectralNorm`` and ``WeightNorm``: flax's own jvp, with the
  same variables (same key, same layout).
- every other layer, which flax does not have: the transpose identity
  ``<u, J t> == <J^T u, t>`` between ``jax.jvp`` (the tangent rule) and
  ``jax.vjp`` (the hand-fused backward) for random ``u`` and ``t``, separately
  for the inputs and the parameters, and ``jax.jacfwd == jax.jacrev``.

Only floating outputs are differentiated: the layer's output and the floating
leaves of the state it updates (int ``count`` leaves have no tangent).
``test_every_flax_layer_is_covered`` fails when a Module in
``jaxnorm.linen.__all__`` or ``jaxnorm.nnx.__all__`` is in neither file.
"""

from __future__ import annotations

import functools
import inspect
import pathlib

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import jaxnorm.linen as jl
import jaxnorm.nnx as jnnx

KEY = jax.random.key(0)
# XLA's CPU backend optimizations cost seconds per Jacobian program and nothing measurable at these sizes
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn, *args):
    """``fn`` jit-compiled for ``args`` (op-by-op dispatch would cost seconds per case), quickly."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _normal(seed, shape, scale=1.0, shift=0.0):
    """NumPy draws: a jax.random draw compiles once per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(shift, scale, shape), jnp.float32)


def _np_init(seed):
    """A kernel initializer drawing with NumPy (the cells' orthogonal default costs seconds of op-by-op QR)."""
    rng = np.random.default_rng(seed)
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(rng.normal(0.0, 0.5, shape), dtype)


CELL_INIT = {"kernel_init": _np_init(20), "recurrent_kernel_init": _np_init(21)}


def _floats(tree):
    return [a for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]


def _perturbed(params, seed=100):
    """Parameters moved off their initial values (zero kernels would hide the condition's effect)."""
    leaves, treedef = jax.tree.flatten(params)
    moved = [p + 0.3 * _normal(seed + i, jnp.shape(p)) for i, p in enumerate(leaves)]
    return jax.tree.unflatten(treedef, moved)


def _split_args(args):
    """The floating leaves of ``args`` (differentiated) and a function putting them back among the others."""
    leaves, treedef = jax.tree.flatten(args)
    where = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in leaves]
    diff = [a for a, w in zip(leaves, where, strict=True) if w]

    def rebuild(new):
        it = iter(new)
        return jax.tree.unflatten(treedef, [next(it) if w else a for a, w in zip(leaves, where, strict=True)])

    return diff, rebuild


# --- the layers as pure functions f(inputs, params) -> list of floating outputs ---------------------------


def linen_case(module, args, *, mutable=(), init_kwargs=None, **call_kwargs):
    variables = _jit(functools.partial(module.init, **(init_kwargs or {})), KEY, *args)
    rest = {k: v for k, v in variables.items() if k != "params"}
    diff, rebuild = _split_args(args)

    def f(xs, params):
        out = module.apply({"params": params, **rest}, *rebuild(xs), mutable=list(mutable), **call_kwargs)
        return _floats(out)

    return f, diff, _perturbed(variables.get("params", {}))


def nnx_case(module, args, **call_kwargs):
    graph, params, rest = nnx.split(module, nnx.Param, ...)
    diff, rebuild = _split_args(args)

    def f(xs, params):
        # a fresh copy of the other state per trace: training updates it in place
        layer = nnx.merge(graph, params, jax.tree.map(jnp.asarray, rest))
        out = layer(*rebuild(xs), **call_kwargs)
        return _floats((out, nnx.state(layer, nnx.Not(nnx.Param))))

    return f, diff, _perturbed(params)


def _carry(h, c=None):
    return (_normal(30, h) * 0.5, _normal(31, h) * 0.5) if c is None else c


def _linen_in_trained(module, batches, **kwargs):
    """Variables after a first update (so the differentiated one starts from nonzero statistics)."""
    variables = _jit(functools.partial(module.init, **kwargs), KEY, batches[0])
    _, upd = _jit(functools.partial(module.apply, mutable=["batch_stats"], **kwargs), variables, batches[0])
    return {**variables, **upd}


def _linen_input_normalization():
    layer = jl.InputNormalization()
    first, x = _normal(40, (6, 3), 3.0, 2.0), _normal(41, (5, 3), 2.0, -1.0)
    variables = _linen_in_trained(layer, [first], update_stats=True)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def f(xs, params):
        return _floats(layer.apply({**params, **rest}, *xs, update_stats=True, mutable=["batch_stats"]))

    return f, [x], {}


def _nnx_input_normalization():
    layer = jnnx.InputNormalization(3, update_stats=True)
    nnx.jit(lambda m, x: m(x))(layer, _normal(40, (6, 3), 3.0, 2.0))  # a first batch: the statistics are not fresh
    return nnx_case(layer, (_normal(41, (5, 3), 2.0, -1.0),))


def _linen_bn_lstm_cell():
    cell = jl.BatchNormLSTMCell(4, use_running_average=False, **CELL_INIT)
    x = _normal(32, (5, 2), 2.0)
    carry = cell.initialize_carry(KEY, x.shape)
    carry = carry._replace(c=_normal(30, (5, 4), 0.5), h=_normal(31, (5, 4), 0.5))
    return linen_case(cell, (carry, x), mutable=["batch_stats"])


def _linen_bn_lstm_rnn():
    rnn = flax_nn.RNN(jl.BatchNormLSTMCell(3, use_running_average=False, **CELL_INIT), variable_axes={"batch_stats": 0},
                      variable_broadcast="params", split_rngs={"params": False})
    return linen_case(rnn, (_normal(33, (4, 3, 2), 2.0),), mutable=["batch_stats"])


def _nnx_bn_lstm_cell():
    cell = jnnx.BatchNormLSTMCell(2, 4, max_steps=3, rngs=nnx.Rngs(0), **CELL_INIT)
    x = _normal(32, (5, 2), 2.0)
    carry = cell.initialize_carry(x.shape)
    carry = carry._replace(c=_normal(30, (5, 4), 0.5), h=_normal(31, (5, 4), 0.5))
    return nnx_case(cell, (carry, x))


def _cond(seed, x_shape, c_shape):
    return (_normal(seed, x_shape, 2.0, 1.0), _normal(seed + 1, c_shape))


R = nnx.Rngs
# (framework, class name) -> builder of (f, inputs, params); cases of one class share its prefix
TRANSPOSE_CASES = {
    "linen.ConditionalBatchNorm": lambda: linen_case(
        jl.ConditionalBatchNorm(), _cond(1, (4, 2, 3), (4, 2)), mutable=["batch_stats"],
        init_kwargs={"use_running_average": False}, use_running_average=False),
    "linen.ConditionalLayerNorm": lambda: linen_case(jl.ConditionalLayerNorm(), _cond(3, (2, 3, 4), (2, 5))),
    "linen.ConditionalGroupNorm": lambda: linen_case(
        jl.ConditionalGroupNorm(num_groups=2), _cond(5, (2, 2, 2, 4), (2, 3))),
    "linen.ConditionalInstanceNorm": lambda: linen_case(jl.ConditionalInstanceNorm(), _cond(7, (2, 4, 3), (2, 2))),
    "linen.FilterResponseNorm": lambda: linen_case(
        jl.FilterResponseNorm(learned_epsilon=True), (_normal(9, (2, 3, 3, 2), 2.0),)),
    "linen.LocalResponseNorm": lambda: linen_case(
        jl.LocalResponseNorm(3, alpha=0.5, k=0.5), (_normal(10, (2, 3, 5), 2.0),)),
    "linen.WeightStandardization": lambda: linen_case(
        jl.WeightStandardization(flax_nn.Conv(3, (2, 2))), (_normal(11, (1, 3, 3, 2)),)),
    "linen.InputNormalization": _linen_input_normalization,
    "linen.LayerNormLSTMCell": lambda: linen_case(
        jl.LayerNormLSTMCell(4, **CELL_INIT), (_carry((5, 4)), _normal(12, (5, 2), 2.0))),
    "linen.LayerNormGRUCell": lambda: linen_case(
        jl.LayerNormGRUCell(4, **CELL_INIT), (_normal(13, (5, 4), 0.5), _normal(14, (5, 2), 2.0))),
    "linen.BatchNormLSTMCell": _linen_bn_lstm_cell,
    "linen.BatchNormLSTMCell/RNN": _linen_bn_lstm_rnn,
    "nnx.BatchRenorm": lambda: nnx_case(
        jnnx.BatchRenorm(3, r_max=1.5, d_max=0.5, rngs=R(0)), (_normal(15, (6, 3), 1.2, 0.3),)),
    "nnx.ConditionalBatchNorm": lambda: nnx_case(jnnx.ConditionalBatchNorm(3, 2, rngs=R(0)),
                                                 _cond(1, (4, 2, 3), (4, 2))),
    "nnx.ConditionalLayerNorm": lambda: nnx_case(jnnx.ConditionalLayerNorm(4, 5, rngs=R(0)),
                                                 _cond(3, (2, 3, 4), (2, 5))),
    "nnx.ConditionalGroupNorm": lambda: nnx_case(jnnx.ConditionalGroupNorm(4, 3, num_groups=2, rngs=R(0)),
                                                 _cond(5, (2, 2, 2, 4), (2, 3))),
    "nnx.ConditionalInstanceNorm": lambda: nnx_case(jnnx.ConditionalInstanceNorm(3, 2, rngs=R(0)),
                                                    _cond(7, (2, 4, 3), (2, 2))),
    "nnx.FilterResponseNorm": lambda: nnx_case(
        jnnx.FilterResponseNorm(2, learned_epsilon=True, rngs=R(0)), (_normal(9, (2, 3, 3, 2), 2.0),)),
    "nnx.LocalResponseNorm": lambda: nnx_case(
        jnnx.LocalResponseNorm(3, alpha=0.5, k=0.5), (_normal(10, (2, 3, 5), 2.0),)),
    "nnx.SpectralNorm": lambda: nnx_case(
        jnnx.SpectralNorm(nnx.Linear(5, 3, rngs=R(0)), rngs=R(1)), (_normal(16, (4, 5)),)),
    "nnx.WeightNorm": lambda: nnx_case(
        jnnx.WeightNorm(nnx.Linear(5, 3, rngs=R(0)), rngs=R(1)), (_normal(17, (4, 5)),)),
    "nnx.WeightStandardization": lambda: nnx_case(
        jnnx.WeightStandardization(nnx.Conv(2, 3, (2, 2), rngs=R(0))), (_normal(11, (1, 3, 3, 2)),)),
    "nnx.InputNormalization": _nnx_input_normalization,
    "nnx.LayerNormLSTMCell": lambda: nnx_case(
        jnnx.LayerNormLSTMCell(2, 4, rngs=R(0), **CELL_INIT), (_carry((5, 4)), _normal(12, (5, 2), 2.0))),
    "nnx.LayerNormGRUCell": lambda: nnx_case(
        jnnx.LayerNormGRUCell(2, 4, rngs=R(0), **CELL_INIT), (_normal(13, (5, 4), 0.5), _normal(14, (5, 2), 2.0))),
    "nnx.BatchNormLSTMCell": _nnx_bn_lstm_cell,
}


def _like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [_normal(seed + i, jnp.shape(v)) for i, v in enumerate(leaves)])


@pytest.mark.parametrize("name", sorted(TRANSPOSE_CASES))
def test_jvp_is_the_transpose_of_the_vjp_and_jacfwd_is_jacrev(name):
    f, xs, params = TRANSPOSE_CASES[name]()
    jacobians = not name.endswith("/RNN")
    # one vector in, one out: Jacobians of pytrees compile a block per pair of leaves (seconds per case)
    v, unravel = ravel_pytree((xs, params))
    flat = lambda v: ravel_pytree(f(*unravel(v)))[0]  # noqa: E731
    n_x, n_p = ravel_pytree(xs)[0].size, ravel_pytree(params)[0].size
    t = _normal(200, v.shape)
    tx, tp = t.at[n_x:].set(0.0), t.at[:n_x].set(0.0)  # tangents of the inputs only, of the params only
    u = _normal(300, jax.eval_shape(flat, v).shape)

    def check(v, tx, tp, u):
        _, jx = jax.jvp(flat, (v,), (tx,))
        _, jp = jax.jvp(flat, (v,), (tp,))
        (g,) = jax.vjp(flat, v)[1](u)
        sides = [(u @ jx, g @ tx, jnp.linalg.norm(u) * jnp.linalg.norm(jx)),
                 (u @ jp, g @ tp, jnp.linalg.norm(u) * jnp.linalg.norm(jp))]
        if not jacobians:  # a scan's Jacobians compile for seconds; its cell's are checked one step at a time
            return sides, jnp.ones(1), jnp.ones(1)
        return sides, jax.jacfwd(flat)(v), jax.jacrev(flat)(v)

    sides, fwd, rev = _jit(check, v, tx, tp, u)
    for (jvp_side, vjp_side, scale), wrt, n in zip(sides, ["inputs", "params"], [n_x, n_p], strict=True):
        if n == 0:  # a layer without parameters
            continue
        assert float(scale) > 1e-3, f"{name}: the output does not depend on the {wrt}"
        assert abs(float(jvp_side) - float(vjp_side)) <= 1e-5 * float(scale), (name, wrt, jvp_side, vjp_side)
    assert np.abs(fwd).max() > 1e-3
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-5)


# --- the layers flax.linen has too: jvp against flax's --------------------------------------------------


FLAX_PAIRS = {
    "linen.SpectralNorm": (
        lambda: jl.SpectralNorm(flax_nn.Dense(3)), lambda: flax_nn.SpectralNorm(flax_nn.Dense(3)),
        {"update_stats": True}, ["batch_stats"],
    ),
    "linen.WeightNorm": (lambda: jl.WeightNorm(flax_nn.Dense(3)), lambda: flax_nn.WeightNorm(flax_nn.Dense(3)), {}, []),
}


@pytest.mark.parametrize("name", sorted(FLAX_PAIRS))
def test_linen_layers_jvp_like_flax(name):
    ours, theirs, kwargs, mutable = FLAX_PAIRS[name]
    x = _normal(50, (4, 5))
    init = {"update_stats": False} if "update_stats" in kwargs else {}
    f_ours, xs, params = linen_case(ours(), (x,), mutable=mutable, init_kwargs=init, **kwargs)
    f_theirs, _, params_theirs = linen_case(theirs(), (x,), mutable=mutable, init_kwargs=init, **kwargs)
    assert jax.tree.structure(params) == jax.tree.structure(params_theirs)
    tangents = (_like(xs, 60), _like(params, 70))

    def both(xs, params, tangents):
        return jax.jvp(f_ours, (xs, params), tangents), jax.jvp(f_theirs, (xs, params), tangents)

    got, want = _jit(both, xs, params, tangents)
    assert float(jnp.linalg.norm(got[1][0])) > 1e-3
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --- coverage -------------------------------------------------------------------------------------------


def _covered_here():
    return {name.split("/")[0] for name in [*TRANSPOSE_CASES, *FLAX_PAIRS]}


def _covered_in_test_forward_mode():
    """The layers tests/test_forward_mode.py differentiates: ``jl.X`` / ``jnnx.X`` named in its Flax tests."""
    source = (pathlib.Path(__file__).parent / "test_forward_mode.py").read_text()
    flax_part = source[source.index("# --- Flax layers"):]
    found = set()
    for framework, prefix, module in [("linen", "jl.", jl), ("nnx", "jnnx.", jnnx)]:
        for name in module.__all__:
            if f"{prefix}{name}(" in flax_part or f"{prefix}{name}," in flax_part:
                found.add(f"{framework}.{name}")
    return found


def _public_modules():
    out = set()
    for framework, module, base in [("linen", jl, flax_nn.Module), ("nnx", jnnx, nnx.Module)]:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, base):
                out.add(f"{framework}.{name}")
    return out


def test_every_flax_layer_is_covered():
    public = _public_modules()
    elsewhere = _covered_in_test_forward_mode()
    assert {"linen.BatchNorm", "linen.BatchRenorm", "nnx.LayerNorm", "nnx.GroupNorm"} <= elsewhere, elsewhere
    missing = public - _covered_here() - elsewhere
    assert not missing, f"no forward-mode test for {sorted(missing)}: add a case to tests/test_forward_mode_layers.py"
    # and no stale names here
    assert _covered_here() <= public, sorted(_covered_here() - public)
    assert len(public) >= 38, sorted(public)  # the enumeration sees both modules
