"""Normalized recurrent cells against float64 NumPy references of the papers' equations.

Ba, Kiros & Hinton 2016 (eqs. 20-22) for the layer-normalized LSTM (and the
same idea on flax's GRU), Cooijmans et al. 2016 for recurrent batch norm with
per-step statistics. The references below are written from the papers, with
no jaxnorm code; gates are read in the cells' layout (i, f, g, o / r, z, n).
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

N, T, D, H = 6, 4, 3, 5


def f64(a):
    return np.asarray(a, dtype=np.float64)


def sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # 1 / (1 + exp(-v)), without overflow


def ln(v, gain, bias, eps):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + eps) * gain + bias


def bn_batch(v, valid):
    """Mean and biased variance over the batch (axis 0) of the rows where ``valid``."""
    rows = v[valid]
    mean = rows.mean(0)
    return mean, ((rows - mean) ** 2).mean(0)


def ref_ln_lstm(p, xs, eps=1e-6):
    xs = f64(xs)
    c = h = np.zeros((xs.shape[0], p["recurrent_kernel"].shape[0]))
    out = []
    for t in range(xs.shape[1]):
        gates = (ln(xs[:, t] @ p["input_kernel"], *p["input_norm"], eps)
                 + ln(h @ p["recurrent_kernel"], *p["recurrent_norm"], eps) + p["bias"])
        i, f, g, o = np.split(gates, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(ln(c, *p["cell_norm"], eps))
        out.append(h)
    return np.stack(out, 1)


def ref_ln_gru(p, xs, eps=1e-6):
    xs = f64(xs)
    h = np.zeros((xs.shape[0], p["recurrent_kernel"].shape[0]))
    out = []
    for t in range(xs.shape[1]):
        rx, zx, nx = np.split(ln(xs[:, t] @ p["input_kernel"], *p["input_norm"], eps), 3, axis=-1)
        rh, zh, nh = np.split(ln(h @ p["recurrent_kernel"], *p["recurrent_norm"], eps), 3, axis=-1)
        r, z = sigmoid(rx + rh), sigmoid(zx + zh)
        n = np.tanh(nx + r * nh)
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, 1)


NORMS = ("input_norm", "recurrent_norm", "cell_norm")


def ref_bn_lstm(p, xs, stats=None, *, training, momentum=0.99, eps=1e-5, lengths=None):
    """Cooijmans et al. 2016, eqs. 6-8. ``stats[name]`` = (mean (T', C), var (T', C)) per norm.

    Training normalizes each step with the batch statistics of that step's valid
    examples and returns the running statistics updated from ``stats`` (fresh:
    mean 0, var 1); evaluation uses row ``min(t, T' - 1)`` of ``stats``.
    """
    xs = f64(xs)
    n, steps = xs.shape[:2]
    hidden = p["recurrent_kernel"].shape[0]
    lengths = np.full(n, steps) if lengths is None else np.asarray(lengths)
    if stats is None:
        stats = {k: (np.zeros((steps, 4 * hidden if k != "cell_norm" else hidden)),
                     np.ones((steps, 4 * hidden if k != "cell_norm" else hidden))) for k in NORMS}
    new = {k: (f64(m).copy(), f64(v).copy()) for k, (m, v) in stats.items()}

    def bn(v, name, t):
        gain, bias = p[name]
        if training:
            mean, var = bn_batch(v, t < lengths)
            old_m, old_v = new[name]
            old_m[t] = momentum * old_m[t] + (1 - momentum) * mean
            old_v[t] = momentum * old_v[t] + (1 - momentum) * var
        else:
            row = min(t, len(stats[name][0]) - 1)
            mean, var = f64(stats[name][0][row]), f64(stats[name][1][row])
        return (v - mean) / np.sqrt(var + eps) * gain + bias

    c = h = np.zeros((n, hidden))
    out = []
    for t in range(steps):
        gates = bn(xs[:, t] @ p["input_kernel"], "input_norm", t) + bn(h @ p["recurrent_kernel"], "recurrent_norm", t)
        i, f, g, o = np.split(gates + p["bias"], 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(bn(c, "cell_norm", t))
        out.append(h)
    return np.stack(out, 1), new


def linen_params(params):
    p = params["cell"]
    out = {k: f64(p[k]) for k in ("input_kernel", "recurrent_kernel") if k in p}
    out["bias"] = f64(p["bias"]) if "bias" in p else 0.0
    for k in NORMS:
        if k in p:
            out[k] = (f64(p[k]["scale"]), f64(p[k]["bias"]) if "bias" in p[k] else 0.0)
    return out


def nnx_params(cell):
    out = {k: f64(getattr(cell, k)[...]) for k in ("input_kernel", "recurrent_kernel")}
    out["bias"] = f64(cell.bias[...]) if hasattr(cell, "bias") else 0.0
    for k in NORMS:
        if hasattr(cell, k):
            norm = getattr(cell, k)
            out[k] = (f64(norm.scale[...]), 0.0 if norm.bias is None else f64(norm.bias[...]))
    return out


def linen_stats(batch_stats):
    s = batch_stats["cell"]
    return {k: (f64(s[k]["mean"]), f64(s[k]["var"])) for k in NORMS}


def nnx_stats(cell):
    return {k: (f64(getattr(cell, k).mean[...]), f64(getattr(cell, k).var[...])) for k in NORMS}


def per_step(cell):
    return nn.RNN(cell, variable_axes={"batch_stats": 0}, variable_broadcast="params", split_rngs={"params": False})


def perturb(params, key, scale=0.3):
    """Non-trivial gains and biases (fresh ones are 1/0.1 and 0)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


# Every nn.RNN call traces and compiles a scan (about a second each on CPU): the
# programs below are jitted once per module and shared by the tests.
XS = jax.random.normal(jax.random.key(0), (N, T, D)) * 2.0 + 0.5
MOMENTUM = 0.5
LN_RNN = {"lstm": nn.RNN(jnl.LayerNormLSTMCell(H)), "gru": nn.RNN(jnl.LayerNormGRUCell(H))}
BN_TRAIN = per_step(jnl.BatchNormLSTMCell(H, use_running_average=False, momentum=MOMENTUM))
BN_EVAL = per_step(jnl.BatchNormLSTMCell(H, use_running_average=True))


@functools.cache
def ln_apply(kind):
    return jax.jit(LN_RNN[kind].apply)


@functools.cache
def ln_params(kind):
    return perturb(jax.jit(LN_RNN[kind].init)(jax.random.key(1), XS)["params"], jax.random.key(2))


bn_train = jax.jit(functools.partial(BN_TRAIN.apply, mutable=["batch_stats"]))
bn_eval = jax.jit(BN_EVAL.apply)


@functools.cache
def bn_variables():
    variables = jax.jit(BN_TRAIN.init)(jax.random.key(1), XS)
    return {"params": perturb(variables["params"], jax.random.key(2)), "batch_stats": variables["batch_stats"]}


# ---------------------------------------------------------------- layer norm cells


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_linen_layer_norm_cells_match_reference_and_ignore_input_scale(kind):
    params = ln_params(kind)
    y = ln_apply(kind)({"params": params}, XS)
    ref = (ref_ln_lstm if kind == "lstm" else ref_ln_gru)(linen_params(params), XS)
    chex.assert_shape(y, (N, T, H))
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)
    # W_x x is normalized on its own: scaling every input by a > 0 changes nothing
    # (epsilon aside: much smaller factors bring the variance near it)
    for a in (0.3, 7.0):
        np.testing.assert_allclose(ln_apply(kind)({"params": params}, a * XS), y, atol=5e-5)
    np.testing.assert_allclose(ref_ln_lstm(linen_params(ln_params("lstm")), 7.0 * XS),
                               ref_ln_lstm(linen_params(ln_params("lstm")), XS), atol=1e-5)


def test_plain_lstm_is_not_scale_invariant():
    # the invariance is the cell's, not the data's: without the norms (flax's LSTMCell) outputs change
    p = linen_params(ln_params("lstm"))
    identity = {**p, "bias": 0.0}

    def plain(xs):
        c = h = np.zeros((N, H))
        for t in range(T):
            gates = f64(xs)[:, t] @ identity["input_kernel"] + h @ identity["recurrent_kernel"]
            i, f, g, o = np.split(gates, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
        return h

    assert np.abs(plain(7.0 * XS) - plain(XS)).max() > 1e-2


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_layer_norm_cells_match_reference(kind):
    cls = jnx.LayerNormLSTMCell if kind == "lstm" else jnx.LayerNormGRUCell
    cell = cls(D, H, rngs=nnx.Rngs(1), bias_init=nnx.initializers.normal(0.3), scale_init=nnx.initializers.normal(1.0))
    y = nnx.RNN(cell)(XS)
    ref = (ref_ln_lstm if kind == "lstm" else ref_ln_gru)(nnx_params(cell), XS)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)


def test_flax_fields_and_gate_blocks():
    cell = jnl.LayerNormLSTMCell(H, kernel_init=nn.initializers.ones,
                                 recurrent_kernel_init=nn.initializers.orthogonal(),
                                 bias_init=nn.initializers.constant(0.5), param_dtype=jnp.float32)
    carry = cell.initialize_carry(jax.random.key(1), (2, D))
    p = jax.jit(cell.init)(jax.random.key(0), carry, jnp.ones((2, D)))["params"]
    np.testing.assert_array_equal(p["input_kernel"], np.ones((D, 4 * H)))
    np.testing.assert_array_equal(p["bias"], np.full(4 * H, 0.5))
    # each gate's recurrent block is orthogonal, as flax's per-gate kernels are
    for block in np.split(np.asarray(p["recurrent_kernel"]), 4, axis=1):
        np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)
    assert cell.num_feature_axes == 1
    carry = jnl.LayerNormLSTMCell(H, carry_init=nn.initializers.ones).initialize_carry(jax.random.key(0), (2, 3, D))
    chex.assert_trees_all_equal(carry, (jnp.ones((2, 3, H)), jnp.ones((2, 3, H))))


# ---------------------------------------------------------------- batch norm cell


def test_linen_batch_norm_cell_matches_reference():
    variables = bn_variables()
    for leaf in jax.tree.leaves(variables["batch_stats"]):
        assert leaf.shape[0] == T  # one row of statistics per step
    y, upd = bn_train(variables, XS)
    ref_y, ref_stats = ref_bn_lstm(linen_params(variables["params"]), XS, training=True, momentum=MOMENTUM)
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(linen_stats(upd["batch_stats"]), ref_stats, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(upd["batch_stats"]["cell"]["cell_norm"]["count"], np.ones(T))

    y_eval = bn_eval({"params": variables["params"], "batch_stats": upd["batch_stats"]}, XS)
    ref_eval, _ = ref_bn_lstm(linen_params(variables["params"]), XS, linen_stats(upd["batch_stats"]), training=False)
    np.testing.assert_allclose(y_eval, ref_eval, atol=2e-5, rtol=1e-4)


def test_nnx_batch_norm_cell_matches_reference():
    cell = jnx.BatchNormLSTMCell(D, H, max_steps=T, momentum=MOMENTUM, rngs=nnx.Rngs(1),
                                 bias_init=nnx.initializers.normal(0.3), scale_init=nnx.initializers.normal(0.5))
    cell.cell_norm.bias[...] = jax.random.normal(jax.random.key(3), (H,))
    rnn = nnx.RNN(cell)
    p = nnx_params(cell)
    y = rnn(XS)
    ref_y, ref_stats = ref_bn_lstm(p, XS, training=True, momentum=MOMENTUM)
    np.testing.assert_allclose(y, ref_y, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(nnx_stats(cell), ref_stats, atol=1e-5, rtol=1e-4)

    rnn.eval()
    assert cell.use_running_average
    longer = jnp.concatenate([XS, XS[:, ::-1]], axis=1)  # 2T steps: rows beyond max_steps are the last one's
    ref_eval, _ = ref_bn_lstm(p, longer, nnx_stats(cell), training=False)
    np.testing.assert_allclose(rnn(longer), ref_eval, atol=2e-5, rtol=1e-4)
    chex.assert_trees_all_close(nnx_stats(cell), ref_stats, atol=1e-5, rtol=1e-4)  # eval leaves them
    rnn.train()
    assert not cell.use_running_average
    assert nnx.view(rnn, use_running_average=True).cell.use_running_average


def test_statistics_differ_per_step():
    # each step's inputs have their own mean: every step gets its own statistics
    x = XS + jnp.arange(T, dtype=jnp.float32)[None, :, None] * 3.0
    variables = bn_variables()
    _, upd = bn_train(variables, x)
    mean = np.asarray(upd["batch_stats"]["cell"]["input_norm"]["mean"])  # (T, 4H): of W_x x_t, from 0
    kernel = f64(variables["params"]["cell"]["input_kernel"])
    np.testing.assert_allclose(mean, (1 - MOMENTUM) * f64(x).mean(0) @ kernel, atol=1e-4, rtol=1e-4)
    gaps = np.abs(np.diff(mean, axis=0)).max(axis=1)
    assert np.all(gaps > 0.5), gaps
    # the recurrent norm sees h_0 = 0 at step 0 only: no batch variance there, some later
    var = np.asarray(upd["batch_stats"]["cell"]["recurrent_norm"]["var"])
    np.testing.assert_allclose(var[0], MOMENTUM, atol=1e-7)
    assert np.all(np.abs(var[1:] - MOMENTUM).max(axis=1) > 1e-3)


def test_train_and_eval_agree_once_statistics_converge():
    variables = bn_variables()
    y_train, _ = bn_train(variables, XS)
    assert np.abs(bn_eval(variables, XS) - y_train).max() > 1e-2  # fresh statistics: eval differs
    for _ in range(40):
        y_train, upd = bn_train(variables, XS)
        variables = {**variables, **upd}
    np.testing.assert_allclose(bn_eval(variables, XS), y_train, atol=1e-5)

    cell = jnx.BatchNormLSTMCell(D, H, max_steps=T, momentum=MOMENTUM, rngs=nnx.Rngs(1))
    rnn = nnx.RNN(cell)
    step = nnx.jit(lambda rnn, x: rnn(x))
    for _ in range(40):
        y_train = step(rnn, XS)
    rnn.eval()
    np.testing.assert_allclose(step(rnn, XS), y_train, atol=1e-5)


def test_longer_sequences_use_the_last_steps_statistics():
    variables = bn_variables()
    _, upd = bn_train(variables, XS)
    longer = jnp.concatenate([XS, 2.0 * XS], axis=1)  # 2T steps
    with pytest.raises(ValueError):  # flax's scan refuses statistics of another length
        BN_EVAL.apply({"params": variables["params"], **upd}, longer)
    stats = jnl.extend_step_stats(upd["batch_stats"], 2 * T)
    y = bn_eval({"params": variables["params"], "batch_stats": stats}, longer)
    ref, _ = ref_bn_lstm(linen_params(variables["params"]), longer, linen_stats(upd["batch_stats"]), training=False)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-4)
    # the first T steps are those of the short run; the input tree is unchanged
    np.testing.assert_allclose(y[:, :T], bn_eval({"params": variables["params"], **upd}, XS), atol=1e-6)
    assert upd["batch_stats"]["cell"]["cell_norm"]["mean"].shape == (T, H)
    np.testing.assert_array_equal(stats["cell"]["cell_norm"]["count"], np.ones(2 * T))
    short = jnl.extend_step_stats(upd["batch_stats"], 2)
    chex.assert_trees_all_equal(short, jax.tree.map(lambda a: a[:2], upd["batch_stats"]))


def test_shared_statistics_the_naive_way():
    # one set of statistics: initialized (and evaluated) broadcast, trained carried through the steps
    variables = bn_variables()
    cell = jnl.BatchNormLSTMCell(H, use_running_average=False, momentum=MOMENTUM)
    stats = nn.RNN(cell, variable_broadcast=["params", "batch_stats"]).init(jax.random.key(1), XS)["batch_stats"]
    assert stats["cell"]["cell_norm"]["mean"].shape == (H,)
    shared = nn.RNN(cell, variable_broadcast="params", variable_carry="batch_stats")
    y, upd = shared.apply({"params": variables["params"], "batch_stats": stats}, XS, mutable=["batch_stats"])
    assert int(upd["batch_stats"]["cell"]["cell_norm"]["count"]) == T
    # training computes what per-step statistics compute: batch statistics at every step
    np.testing.assert_allclose(y, bn_train(variables, XS)[0], atol=1e-6)


# ---------------------------------------------------------------- padding


LENGTHS = jnp.array([4, 4, 3, 2, 2, 1])
VALID = jnp.arange(T)[None, :] < LENGTHS[:, None]


def test_padded_steps_stay_out_of_the_statistics():
    garbage = jnp.where(VALID[..., None], XS, 1e3)  # padding
    variables = bn_variables()
    cell = BN_TRAIN.cell
    carry0 = cell.initialize_carry(jax.random.key(0), garbage[:, 0].shape, seq_lengths=LENGTHS)
    (carry, y), upd = BN_TRAIN.apply(variables, garbage, initial_carry=carry0, seq_lengths=LENGTHS,
                                     return_carry=True, mutable=["batch_stats"])
    _, ref_stats = ref_bn_lstm(linen_params(variables["params"]), garbage, training=True, momentum=MOMENTUM,
                               lengths=np.asarray(LENGTHS))
    chex.assert_trees_all_close(linen_stats(upd["batch_stats"]), ref_stats, atol=1e-4, rtol=1e-4)
    # nn.RNN selects each sequence's last valid carry; the step counter says how far it got
    np.testing.assert_array_equal(carry.step, LENGTHS)
    np.testing.assert_allclose(carry.h, y[jnp.arange(N), LENGTHS - 1], atol=1e-6)
    # without the lengths in the carry, padding pollutes the statistics
    _, polluted = bn_train(variables, garbage)
    assert np.abs(f64(polluted["batch_stats"]["cell"]["input_norm"]["mean"][3])
                  - ref_stats["input_norm"][0][3]).max() > 1.0

    nnx_cell = jnx.BatchNormLSTMCell(D, H, max_steps=T, momentum=MOMENTUM, rngs=nnx.Rngs(1))
    nnx.RNN(nnx_cell)(garbage, seq_lengths=LENGTHS,
                      initial_carry=nnx_cell.initialize_carry(garbage[:, 0].shape, seq_lengths=LENGTHS))
    _, ref_stats = ref_bn_lstm(nnx_params(nnx_cell), garbage, training=True, momentum=MOMENTUM,
                               lengths=np.asarray(LENGTHS))
    chex.assert_trees_all_close(nnx_stats(nnx_cell), ref_stats, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- transformations and flax's RNN


@pytest.mark.parametrize("kind", ["ln_lstm", "ln_gru", "bn_lstm"])
def test_grad(kind):
    if kind == "bn_lstm":
        variables = bn_variables()
        carry0 = BN_TRAIN.cell.initialize_carry(jax.random.key(0), XS[:, 0].shape, seq_lengths=LENGTHS)

        def apply(params, x):  # padded, with the lengths in the carry: padding gets no gradient
            return BN_TRAIN.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  initial_carry=carry0, mutable=["batch_stats"])[0]
    else:
        variables = {"params": ln_params(kind[3:])}

        def apply(params, x):
            return LN_RNN[kind[3:]].apply({"params": params}, x)

    def loss(params, x):
        return jnp.sum(jnp.where(VALID[..., None], apply(params, x), 0.0) ** 2)

    params = variables["params"]
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, g = value_and_grad(params, XS)
    chex.assert_tree_all_finite(g)
    # a directional derivative against central differences (float32: loose)
    d = jax.tree.map(lambda a: 1e-3 * jnp.sign(jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0)), params)
    plus, _ = value_and_grad(jax.tree.map(jnp.add, params, d), XS)
    minus, _ = value_and_grad(jax.tree.map(jnp.subtract, params, d), XS)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True))
    np.testing.assert_allclose((plus - minus) / 2, directional, rtol=0.03)
    # other values in the padding: the same gradient
    _, g_other = value_and_grad(params, jnp.where(VALID[..., None], XS, -5.0))
    chex.assert_trees_all_close(g_other, g, atol=1e-5)


def test_linen_bidirectional():
    bi = nn.Bidirectional(LN_RNN["lstm"], BN_TRAIN)
    variables = jax.jit(bi.init)(jax.random.key(1), XS)
    assert variables["batch_stats"]["backward_rnn"]["cell"]["input_norm"]["mean"].shape == (T, 4 * H)
    y, _ = jax.jit(functools.partial(bi.apply, mutable=["batch_stats"]))(variables, XS)
    chex.assert_shape(y, (N, T, 2 * H))
    # the halves are the two RNNs, the backward one on the reversed sequence, put back in order
    sub = {k: v["backward_rnn"] for k, v in variables.items()}
    back, _ = bn_train(sub, XS[:, ::-1])
    np.testing.assert_allclose(y[..., H:], back[:, ::-1], atol=1e-5)
    np.testing.assert_allclose(y[..., :H], ln_apply("lstm")({"params": variables["params"]["forward_rnn"]}, XS),
                               atol=1e-5)


def test_nnx_bidirectional():
    bi = nnx.Bidirectional(nnx.RNN(jnx.LayerNormGRUCell(D, H, rngs=nnx.Rngs(0))),
                           nnx.RNN(jnx.BatchNormLSTMCell(D, H, max_steps=T, rngs=nnx.Rngs(1))))
    y = bi(XS, seq_lengths=LENGTHS)
    chex.assert_shape(y, (N, T, 2 * H))
    assert bi.backward_rnn.cell.input_norm.count[...].tolist() == [1] * T


# ---------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match=r"BatchNormLSTMCell: `use_running_average` is None.*use_running_average=not"):
        jnl.BatchNormLSTMCell(H).init(jax.random.key(0), BN_TRAIN.cell.initialize_carry(jax.random.key(0), (N, D)),
                                      XS[:, 0])
    cell = jnl.BatchNormLSTMCell(H, use_running_average=True)
    with pytest.raises(ValueError, match=r"`carry` must be the cell's StepCarry.*initialize_carry"):
        cell.init(jax.random.key(0), (jnp.zeros((N, H)), jnp.zeros((N, H))), XS[:, 0])
    with pytest.raises(ValueError, match=r"initialize_carry: `seq_lengths` must be an integer array of the batch"):
        cell.initialize_carry(jax.random.key(0), (N, D), seq_lengths=jnp.ones((N, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"LayerNormLSTMCell: the carry's hidden state has 3 features.*`features`=5"):
        jnl.LayerNormLSTMCell(H).init(jax.random.key(0), (jnp.zeros((N, 3)), jnp.zeros((N, 3))), XS[:, 0])
    stats = {"cell": {"m": jnp.zeros((T, 2)), "count": jnp.zeros((T,), jnp.int32)}}
    with pytest.raises(ValueError, match=r"extend_step_stats: `num_steps` must be a positive Python int, got 0"):
        jnl.extend_step_stats(stats, 0)
    with pytest.raises(ValueError, match=r"extend_step_stats: the leaf .* has shape \(\), but per-step"):
        jnl.extend_step_stats({"a": jnp.zeros((T,)), "b": jnp.zeros(())}, 8)
    with pytest.raises(ValueError, match=r"extend_step_stats: the leaves of `batch_stats` have different leading"):
        jnl.extend_step_stats({"a": jnp.zeros((T,)), "b": jnp.zeros((T + 1,))}, 8)
    with pytest.raises(ValueError, match=r"nnx.BatchNormLSTMCell: `max_steps` must be a positive Python int"):
        jnx.BatchNormLSTMCell(D, H, max_steps=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"nnx.BatchNormLSTMCell: `use_running_average` must be a Python bool"):
        bad = jnx.BatchNormLSTMCell(D, H, max_steps=T, use_running_average=None, rngs=nnx.Rngs(0))
        bad(bad.initialize_carry((N, D)), XS[:, 0])
    with pytest.raises(ValueError, match=r"nnx.LayerNormGRUCell: the carry's hidden state has 3 features.*"
                       r"`hidden_features`=5.*initialize_carry\(x.shape\)"):
        jnx.LayerNormGRUCell(D, H, rngs=nnx.Rngs(0))(jnp.zeros((N, 3)), XS[:, 0])


def test_per_step_statistics_rows():
    """The core's per-step rows: a fresh row is init_batch_stats', a write replaces its row only."""
    import jaxnorm
    from jaxnorm._src import recurrent as core

    rows = core.init_step_stats(T, (H,))
    chex.assert_shape((rows.mean, rows.var, rows.count), [(T, H), (T, H), (T,)])
    np.testing.assert_array_equal(rows.mean, np.zeros((T, H)))
    np.testing.assert_array_equal(rows.var, np.ones((T, H)))
    new = jaxnorm.BatchStats(jnp.full((H,), 2.0), jnp.full((H,), 3.0), jnp.asarray(7, jnp.int32))
    written = core.with_step_stats(rows, jnp.asarray(2), new)
    expect_mean = np.zeros((T, H))
    expect_mean[2] = 2.0
    np.testing.assert_array_equal(written.mean, expect_mean)
    np.testing.assert_array_equal(written.count, [0, 0, 7, 0])
    np.testing.assert_array_equal(rows.count, np.zeros(T))  # the input is unchanged
    read = core.step_stats(written, jnp.asarray(2))
    np.testing.assert_array_equal(read.var, np.full(H, 3.0))
    assert int(read.count) == 7
    shapes = core.cell_shapes("lstm", D, H)
    assert (shapes.input_kernel, shapes.recurrent_kernel, shapes.bias) == ((D, 4 * H), (H, 4 * H), (4 * H,))
    assert core.cell_shapes("gru", D, H).recurrent_kernel == (H, 3 * H) and core.cell_shapes("gru", D, H).bias is None
