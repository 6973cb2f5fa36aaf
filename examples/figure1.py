"""Ioffe & Szegedy (2015), Figure 1, in small: batch norm on a sigmoid MLP.

The paper trains a network of 3 fully connected hidden layers of 100 sigmoid
units on MNIST with plain SGD, batch size 60, with and without batch norm
before every sigmoid, and shows (a) test accuracy against training steps:
the network with BN trains faster and ends higher; (b, c) the 15th, 50th and
85th percentiles of the input to one sigmoid of the last hidden layer over
training: without BN the distribution drifts (internal covariate shift), with
BN it stays put.

This script repeats that set-up with the same architecture, batch size and
optimizer (``optax.sgd``, no momentum). Evaluation uses the population
statistics (``training=False``, the paper's Algorithm 2: here a running
average kept during training). The two networks start from the same weights
and see the same batches (drawn uniformly with replacement).

The data is MNIST-1D (Greydanus 2020), generated offline with
``mnist1d.data.make_dataset`` (4000 training and 1000 test sequences of 40
values). It shows the paper's effect better than scikit-learn's 8x8 digits:
on the digits (in a trial run of this set-up) both networks are at 95-98%
test accuracy by step 500 and 97-99% by step 1000, so the accuracy curves
lie on top of each other, while MNIST-1D is hard
enough for an MLP (a plain one ends near 50-60%) that the gap between the
curves is large and lasts, and the sigmoid inputs of the plain network drift
visibly. It takes about 2 seconds to generate and nothing is downloaded.

The learning rate (0.5) is not the paper's (it does not give one); it is a
rate at which the plain network trains well. The percentiles are taken over the
whole test set in inference mode, for every unit of the last hidden layer. The
drift of a unit is how far the median of its input moves between the first and
the last evaluation; the summary averages it over the 100 units, and (b, c)
show a typical unit: the one whose drift without BN is the median of the layer.

Run ``python examples/figure1.py`` (this is ``make demo``); ``--quick`` trains
1000 steps for the tests. Writes ``results/figure1.json`` and
``results/figure1.png`` and prints a table.
"""

from __future__ import annotations

import functools
import time

import _common
import jax  # noqa: E402  (after _common, which puts this checkout's jaxnorm first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnorm as jn  # noqa: E402

NAME = "figure1"
WIDTH = 100
DEPTH = 3
BATCH = 60
PERCENTILES = (15, 50, 85)


def init_mlp(key, n_in, n_out, *, bn):
    """LeCun-normal weights. With BN the hidden layers have no bias (BN's beta is one)."""
    sizes = [n_in] + [WIDTH] * DEPTH + [n_out]
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        layer = {"w": jax.random.normal(k, (a, b)) / np.sqrt(a)}
        if bn and i < DEPTH:
            layer["gamma"] = jnp.ones(b)
            layer["beta"] = jnp.zeros(b)
        else:
            layer["b"] = jnp.zeros(b)
        params.append(layer)
    stats = [jn.init_batch_stats(WIDTH) for _ in range(DEPTH)] if bn else []
    return params, stats


def apply_mlp(params, stats, x, *, bn, training, momentum):
    """Logits, new BN statistics, and the last hidden layer's sigmoid inputs (N, WIDTH)."""
    new_stats = []
    h = x
    for i, layer in enumerate(params[:-1]):
        z = h @ layer["w"]
        if bn:
            z, s = jn.batch_norm(z, stats[i], layer["gamma"], layer["beta"], training=training, momentum=momentum)
            new_stats.append(s)
        else:
            z = z + layer["b"]
        h = jax.nn.sigmoid(z)
    return h @ params[-1]["w"] + params[-1]["b"], new_stats, z


@functools.partial(jax.jit, static_argnames=("lr", "momentum", "eval_every"))
def train_chunk(carry, key, chunk, data, *, lr, momentum, eval_every):
    """Trains both networks ``eval_every`` steps on the same batches, then evaluates both.

    One compiled program (``lax.scan`` over the steps); it is compiled once per
    (lr, momentum, eval_every) and reused for every chunk and every run.

    Args:
      carry: ``(plain, normed)``, each ``(params, bn_stats, opt_state)``.
      key: PRNG key of the batches.
      chunk: () int32, the chunk's index, folded into ``key``.
      data: ``(x_train, y_train, x_test, y_test)`` arrays.

    Returns:
      ``(carry, plain_eval, bn_eval)``; each eval is ``(test accuracy, (3, WIDTH) percentiles)``.
    """
    x_train, y_train, x_test, y_test = data
    optimizer = optax.sgd(lr)

    def sgd_step(state, x, y, bn):
        params, stats, opt_state = state

        def loss_fn(params):
            logits, new_stats, _ = apply_mlp(params, stats, x, bn=bn, training=True, momentum=momentum)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), loss

    def step(carry, key):
        plain, normed = carry
        idx = jax.random.randint(key, (BATCH,), 0, x_train.shape[0])
        x, y = x_train[idx], y_train[idx]
        plain, _ = sgd_step(plain, x, y, False)
        normed, _ = sgd_step(normed, x, y, True)
        return (plain, normed), None

    def evaluate(state, bn):
        params, stats, _ = state
        logits, _, z = apply_mlp(params, stats, x_test, bn=bn, training=False, momentum=momentum)
        accuracy = jnp.mean(logits.argmax(-1) == y_test)
        # (3, WIDTH): every unit, so the summary need not rest on the one unit that is plotted
        return accuracy, jnp.percentile(z, jnp.asarray(PERCENTILES, jnp.float32), axis=0)

    carry, _ = jax.lax.scan(step, carry, jax.random.split(jax.random.fold_in(key, chunk), eval_every))
    return carry, evaluate(carry[0], False), evaluate(carry[1], True)


def median_drift(pct: np.ndarray) -> np.ndarray:
    """Per unit, how far the median of its sigmoid input moved from the first evaluation to the last.

    Args:
      pct: (evaluations, 3, WIDTH) percentiles of every unit's input over the test set.

    Returns:
      (WIDTH,) ``|p50(last) - p50(first)|``.
    """
    return np.abs(pct[-1, 1] - pct[0, 1])


def run(*, steps, eval_every, lr, momentum, seed, progress=True):
    """Trains both networks and returns the results as a JSON-ready dict."""
    start = time.perf_counter()
    data = _common.load_mnist1d()
    init_key, batch_key = jax.random.split(jax.random.PRNGKey(seed))
    init = jax.jit(init_mlp, static_argnums=(1, 2), static_argnames="bn")  # eager init would compile op by op
    plain_params, _ = init(init_key, data.num_features, data.num_classes, bn=False)
    bn_params, bn_stats = init(init_key, data.num_features, data.num_classes, bn=True)
    optimizer = optax.sgd(lr)
    carry = (
        (plain_params, [], optimizer.init(plain_params)),
        (bn_params, bn_stats, optimizer.init(bn_params)),
    )
    arrays = tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))

    keys = ("without_bn", "with_bn")
    accuracy = {key: [] for key in keys}
    percentiles = {key: [] for key in keys}
    eval_steps = list(range(eval_every, steps + 1, eval_every))
    bar = _common.progress(steps, "figure1", disable=not progress)
    for i, _ in enumerate(eval_steps):
        carry, plain_eval, bn_eval = train_chunk(
            carry, batch_key, jnp.int32(i), arrays, lr=lr, momentum=momentum, eval_every=eval_every)
        for key, (acc, pct) in zip(keys, (plain_eval, bn_eval)):
            accuracy[key].append(float(acc))
            percentiles[key].append(np.asarray(pct))
        bar.update(eval_every)
        bar.set_postfix(bn=f"{float(bn_eval[0]):.3f}", plain=f"{float(plain_eval[0]):.3f}")
    bar.close()

    pct = {key: np.stack(percentiles[key]) for key in keys}
    drift = {key: median_drift(pct[key]) for key in keys}
    # The unit shown in (b, c): a typical one, whose drift without BN is the median over the layer's units.
    unit = int(np.argsort(drift["without_bn"])[WIDTH // 2])
    result = {
        "name": NAME,
        "paper": "Ioffe & Szegedy 2015, Figure 1",
        "dataset": {"name": data.name, "train": len(data.y_train), "test": len(data.y_test)},
        "config": {
            "hidden_layers": DEPTH, "width": WIDTH, "activation": "sigmoid", "batch_size": BATCH,
            "optimizer": "optax.sgd", "learning_rate": lr, "bn_momentum": momentum,
            "steps": steps, "eval_every": eval_every, "seed": seed,
            "inference": "population statistics (training=False)",
        },
        "unit": unit,
        "steps": eval_steps,
    }
    for key in keys:
        result[key] = {
            "test_accuracy": accuracy[key],
            "sigmoid_input_percentiles": {f"p{q}": pct[key][:, j, unit].tolist() for j, q in enumerate(PERCENTILES)},
            "final_test_accuracy": accuracy[key][-1],
            "best_test_accuracy": max(accuracy[key]),
            "median_drift_mean_over_units": float(drift[key].mean()),
            "median_drift_of_unit": float(drift[key][unit]),
        }
    target = result["without_bn"]["best_test_accuracy"]
    result["summary"] = {
        "best_without_bn": target,
        "steps_without_bn_to_its_best": _common.first_step_reaching(
            eval_steps, accuracy["without_bn"], target),
        "steps_with_bn_to_best_without_bn": _common.first_step_reaching(
            eval_steps, accuracy["with_bn"], target),
    }
    result["seconds"] = time.perf_counter() - start
    return result


def plot(result):
    import matplotlib.pyplot as plt

    steps = np.asarray(result["steps"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(steps, result["without_bn"]["test_accuracy"], "--", color="tab:gray", label="Without BN")
    ax.plot(steps, result["with_bn"]["test_accuracy"], color="tab:blue", label="With BN")
    ax.set(title="(a) test accuracy", xlabel="training steps", ylabel="accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    lows, highs = [], []
    for ax, key, title in ((axes[1], "without_bn", "(b) without BN"), (axes[2], "with_bn", "(c) with BN")):
        series = result[key]["sigmoid_input_percentiles"]
        for q, style in zip(PERCENTILES, (":", "-", ":")):
            ax.plot(steps, series[f"p{q}"], style, color="black", label=f"{q}th percentile")
            lows.append(min(series[f"p{q}"]))
            highs.append(max(series[f"p{q}"]))
        ax.set(title=f"{title}: input to one sigmoid", xlabel="training steps")
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("sigmoid input (test set)")
    axes[1].legend(loc="best", fontsize=8)
    pad = 0.05 * (max(highs) - min(lows))
    for ax in axes[1:]:
        ax.set_ylim(min(lows) - pad, max(highs) + pad)  # same scale, so the drift compares at a glance
    cfg = result["config"]
    fig.suptitle(
        f"3x{cfg['width']} sigmoid MLP on {result['dataset']['name']}, batch {cfg['batch_size']}, "
        f"SGD lr {cfg['learning_rate']} (Ioffe & Szegedy 2015, Fig. 1)", fontsize=10)
    fig.tight_layout()
    return fig


def table(result, rows=10):
    steps = result["steps"]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(steps) - 1, min(rows, len(steps)))})
    def pct(key, i):
        s = result[key]["sigmoid_input_percentiles"]
        return "/".join(f"{s[f'p{q}'][i]:+.2f}" for q in PERCENTILES)
    body = [
        [steps[i], result["without_bn"]["test_accuracy"][i], result["with_bn"]["test_accuracy"][i],
         pct("without_bn", i), pct("with_bn", i)]
        for i in picks
    ]
    headers = ["step", "acc no BN", "acc BN", "no BN p15/p50/p85", "BN p15/p50/p85"]
    return _common.format_table(headers, body)


def main(argv=None):
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (10000; 1000 with --quick)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (100)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.99, help="BN running-average momentum")
    args = parser.parse_args(argv)
    steps = args.steps or (1000 if args.quick else 10000)
    eval_every = args.eval_every or 100
    result = run(steps=steps, eval_every=eval_every, lr=args.lr, momentum=args.momentum,
                 seed=args.seed, progress=not args.no_progress)
    json_path = _common.write_json(args.out, NAME, result)
    png_path = _common.save_figure(plot(result), args.out, NAME)

    print(f"Figure 1 (Ioffe & Szegedy 2015) on {result['dataset']['name']}: 3x100 sigmoid MLP, "
          f"batch {BATCH}, SGD lr {args.lr}, seed {args.seed}")
    print(table(result))
    s = result["summary"]
    print()
    print(_common.format_table(
        ["", "final acc", "best acc", "median drift (all units)", f"median drift (unit {result['unit']})"],
        [[label, result[key]["final_test_accuracy"], result[key]["best_test_accuracy"],
          result[key]["median_drift_mean_over_units"], result[key]["median_drift_of_unit"]]
         for label, key in (("without BN", "without_bn"), ("with BN", "with_bn"))]))
    print(f"\nBest accuracy without BN {s['best_without_bn']:.3f}: reached at step "
          f"{s['steps_without_bn_to_its_best']} without BN, at step {s['steps_with_bn_to_best_without_bn']} with BN.")
    print(f"median drift: |p50 at step {result['steps'][-1]} - p50 at step {result['steps'][0]}| of a last-layer "
          "sigmoid input over the test set; the table shows unit " f"{result['unit']}.")
    print(f"Wrote {json_path} and {png_path} in {result['seconds']:.1f} s.")
    return result


if __name__ == "__main__":
    main()
