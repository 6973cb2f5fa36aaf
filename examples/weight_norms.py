"""Weight normalizations on scikit-learn's 8x8 digits: micro-batch CNNs and a Lipschitz MLP.

Part 1, micro-batch training (Qiao et al. 2019; BiT's ResNet-GN-WS). A small
CNN on the 8x8 digits as images::

    conv 3x3 (16) -> norm -> relu -> conv 3x3 stride 2 (32) -> norm -> relu
    -> global mean pool -> dense(10)

trained with Adam at a batch of 2 images (lr 1e-3), with:

- ``bn``: batch norm (``jn.batch_norm``, momentum 0.9), evaluated with its
  running statistics: at batch 2 each channel's statistics come from
  2 x H x W values, noisy, and the running averages differ from them;
- ``gn``: group norm (``jn.group_norm``, 4 groups), no batch dependence;
- ``gn_ws``: group norm after weight-standardized convolutions
  (``jn.weight_standardize`` of each conv kernel, then ``jn.group_norm``);
- ``wn``: weight-normalized convolutions (``jn.weight_norm``) and no
  activation norm.

Part 2, a Lipschitz-constrained classifier (Miyato et al. 2018): an MLP
64 -> 128 -> 128 -> 10 with and without ``jn.spectral_norm`` on every
kernel (one power iteration per step, state carried explicitly). Reported:
test accuracy and the product of the layers' largest singular values (an
upper bound on the network's Lipschitz constant for ReLU), measured by SVD of
the kernels the network uses: spectral norm keeps it near 1.

Every number in ``results/weight_norms.json`` and in the Markdown table
(``--table``, for docs/_generated/weight_norms_table.md) is measured by this
script. ``python examples/weight_norms.py --table docs/_generated/weight_norms_table.md``
regenerates the guide's table.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import jaxnorm as jn  # noqa: E402

NAME = "weight_norms"
CNN_METHODS = ("bn", "gn", "gn_ws", "wn")
GROUPS = 4


def _conv(x, kernel, stride=1):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_cnn(key):
    k1, k2, k3 = jax.random.split(key, 3)
    he = jax.nn.initializers.he_normal()
    params = {
        "conv1": he(k1, (3, 3, 1, 16)), "conv2": he(k2, (3, 3, 16, 32)),
        "dense": jax.nn.initializers.lecun_normal()(k3, (32, 10)), "dense_b": jnp.zeros(10),
        "scale1": jnp.ones(16), "bias1": jnp.zeros(16), "scale2": jnp.ones(32), "bias2": jnp.zeros(32),
        # weight norm's gains start at the initial kernels' norms, as Salimans & Kingma's init does
        "g1": jnp.sqrt(jnp.sum(he(k1, (3, 3, 1, 16)) ** 2, (0, 1, 2))),
        "g2": jnp.sqrt(jnp.sum(he(k2, (3, 3, 16, 32)) ** 2, (0, 1, 2))),
    }
    stats = {"bn1": jn.init_batch_stats(16), "bn2": jn.init_batch_stats(32)}
    return params, stats


def cnn(method, params, stats, x, training):
    """Logits and new batch-norm statistics."""
    new = dict(stats)
    h = x
    for i, stride in ((1, 1), (2, 2)):
        kernel = params[f"conv{i}"]
        if method == "gn_ws":
            kernel = jn.weight_standardize(kernel)
        if method == "wn":
            kernel = jn.weight_norm(kernel, params[f"g{i}"])
        h = _conv(h, kernel, stride)
        scale, bias = params[f"scale{i}"], params[f"bias{i}"]
        if method == "bn":
            h, new[f"bn{i}"] = jn.batch_norm(h, stats[f"bn{i}"], scale, bias, training=training, momentum=0.9)
        elif method in ("gn", "gn_ws"):
            h = jn.group_norm(h, scale, bias, num_groups=GROUPS)
        else:
            h = h + bias
        h = jax.nn.relu(h)
    return jnp.mean(h, (1, 2)) @ params["dense"] + params["dense_b"], new


OPT = optax.adam(1e-3)


@functools.cache
def cnn_step(method):
    """One compiled training step per method, shared by every seed."""
    opt = OPT

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss(p):
            logits, new = cnn(method, p, stats, xb, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new, opt_state, value

    return step


def train_cnn(method, data, *, steps, batch, seed, progress):
    x_train = data.x_train.reshape(-1, 8, 8, 1)
    x_test = data.x_test.reshape(-1, 8, 8, 1)
    params, stats = init_cnn(jax.random.key(seed))
    opt_state = OPT.init(params)
    step = cnn_step(method)
    rng = np.random.default_rng(seed)
    bar = _common.progress(steps, f"cnn {method}", disable=not progress)
    for _ in range(steps):
        idx = rng.integers(0, len(x_train), batch)
        params, stats, opt_state, _ = step(params, stats, opt_state, x_train[idx], data.y_train[idx])
        bar.update(1)
    bar.close()
    logits, _ = jax.jit(lambda p, s, x: cnn(method, p, s, x, False))(params, stats, x_test)
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data.y_test))


def init_mlp(key):
    keys = jax.random.split(key, 3)
    sizes = [(64, 128), (128, 128), (128, 10)]
    init = jax.nn.initializers.lecun_normal()
    params = [{"kernel": init(k, s), "bias": jnp.zeros(s[1])} for k, s in zip(keys, sizes, strict=True)]
    state_keys = jax.random.split(jax.random.fold_in(key, 1), 3)
    states = [jn.init_spectral_state(k, s) for k, s in zip(state_keys, sizes, strict=True)]
    return params, states


def mlp(params, states, x, *, spectral, training):
    """Logits, new spectral states and the kernels used."""
    new_states, kernels = [], []
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        kernel = p["kernel"]
        if spectral:
            kernel, s = jn.spectral_norm(kernel, s, update_stats=training)
        new_states.append(s)
        kernels.append(kernel)
        x = x @ kernel + p["bias"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x, new_states, kernels


def train_mlp(spectral, data, *, steps, seed, progress):
    params, states = init_mlp(jax.random.key(seed))
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, states, opt_state, xb, yb):
        def loss(p):
            logits, new, _ = mlp(p, states, xb, spectral=spectral, training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

        (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new, opt_state

    rng = np.random.default_rng(seed)
    bar = _common.progress(steps, f"mlp {'spectral' if spectral else 'plain'}", disable=not progress)
    for _ in range(steps):
        idx = rng.integers(0, len(data.x_train), 64)
        params, states, opt_state = step(params, states, opt_state, data.x_train[idx], data.y_train[idx])
        bar.update(1)
    bar.close()
    logits, _, kernels = mlp(params, states, jnp.asarray(data.x_test), spectral=spectral, training=False)
    sigmas = [float(np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)[0]) for k in kernels]
    stored = [float(s.sigma) for s in states] if spectral else None
    true = [float(np.linalg.svd(np.asarray(p["kernel"], np.float64), compute_uv=False)[0]) for p in params]
    return {
        "test_accuracy": float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data.y_test)),
        "layer_sigmas": sigmas, "lipschitz_bound": float(np.prod(sigmas)),
        "stored_sigmas": stored, "raw_kernel_sigmas": true,
    }


def markdown_table(result):
    seeds = result["config"]["seeds"]
    lines = [
        f"Micro-batch CNN, batch {result['config']['batch']}, {result['config']['cnn_steps']} Adam steps, "
        f"test accuracy on {result['config']['test_size']} digits (mean over seeds {seeds}):",
        "",
        "| method | test accuracy | per seed |",
        "|---|---|---|",
    ]
    labels = {"bn": "batch norm (running statistics)", "gn": "group norm",
              "gn_ws": "group norm + weight standardization", "wn": "weight norm, no activation norm"}
    for m in CNN_METHODS:
        acc = result["cnn"][m]
        lines.append(f"| {labels[m]} | {np.mean(acc):.3f} | {', '.join(f'{a:.3f}' for a in acc)} |")
    lines += [
        "",
        f"Lipschitz MLP, {result['config']['mlp_steps']} Adam steps (batch 64), seed {seeds[0]}:",
        "",
        "| MLP | test accuracy | largest singular value per layer | product (Lipschitz bound) |",
        "|---|---|---|---|",
    ]
    for key, label in (("plain", "plain"), ("spectral", "spectral norm")):
        r = result["mlp"][key]
        lines.append(f"| {label} | {r['test_accuracy']:.3f} | {', '.join(f'{s:.3f}' for s in r['layer_sigmas'])} | "
                     f"{r['lipschitz_bound']:.3f} |")
    cmd = "python examples/weight_norms.py" + (" --quick" if result["config"]["quick"] else "")
    lines += ["", f"Written by `{cmd} --table <this file>`."]
    return "\n".join(lines) + "\n"


def plot(result, out):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    means = [np.mean(result["cnn"][m]) for m in CNN_METHODS]
    a.bar(CNN_METHODS, means, color=["tab:red", "tab:blue", "tab:green", "tab:gray"])
    a.set_ylim(0, 1)
    a.set_title(f"CNN at batch {result['config']['batch']}: test accuracy")
    for key, color in (("plain", "tab:gray"), ("spectral", "tab:purple")):
        b.plot(result["mlp"][key]["layer_sigmas"], "o-", color=color, label=key)
    b.axhline(1.0, color="k", lw=0.5)
    b.set_xlabel("layer")
    b.set_ylabel("largest singular value")
    b.set_title("MLP kernels")
    b.legend()
    return _common.save_figure(fig, out, NAME)


def main(argv=None):
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    data = _common.load_digits()
    cnn_steps, mlp_steps = (100, 100) if args.quick else (3000, 2000)
    seeds = [args.seed] if args.quick else [args.seed + i for i in range(3)]
    batch = 2
    progress = not args.no_progress
    result = {
        "config": {"quick": args.quick, "batch": batch, "cnn_steps": cnn_steps, "mlp_steps": mlp_steps,
                   "seeds": seeds, "test_size": len(data.y_test), "groups": GROUPS},
        "cnn": {m: [train_cnn(m, data, steps=cnn_steps, batch=batch, seed=s, progress=progress) for s in seeds]
                for m in CNN_METHODS},
        "mlp": {key: train_mlp(key == "spectral", data, steps=mlp_steps, seed=seeds[0], progress=progress)
                for key in ("plain", "spectral")},
    }
    table = markdown_table(result)
    out = Path(args.out)
    _common.write_json(out, NAME, result)
    (out / f"{NAME}.md").write_text(table)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    plot(result, out)
    print(table)
    return result


if __name__ == "__main__":
    main()
