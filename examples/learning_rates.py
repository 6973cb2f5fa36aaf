"""Batch norm allows higher learning rates (Ioffe & Szegedy 2015, sections 3.3 and 4.2), in small.

The paper trains Inception with batch norm at 5 and 30 times the baseline's
learning rate (BN-x5, BN-x30): BN-x5 reaches the baseline's accuracy in 14
times fewer steps, and without BN such rates diverge. This script measures the
same two things on a small problem: a deep ReLU MLP (6 hidden layers of 64
units, He-normal weights) on MNIST-1D, trained with SGD with momentum 0.9 at a
sweep of learning rates, with and without ``jn.batch_norm`` before every ReLU,
evaluated with population statistics (``training=False``).

It reports, for each variant:

- the largest stable learning rate: the largest rate of the sweep at which,
  for every seed, the training loss stays finite and ends below the loss of
  the untrained network (ln 10 = 2.30 for 10 balanced classes);
- the number of steps to reach the best test accuracy the network without BN
  reaches at any rate (seed mean; "best no-BN accuracy"), at the best rate for
  each variant, and the ratio of the two.

The whole sweep (rates x seeds) is one ``jax.vmap``-ed, ``lax.scan``-ned
program per variant, so it compiles twice and trains every configuration at
once. The numbers are what this small network measures, not the paper's.

Run ``python examples/learning_rates.py``; ``--quick`` trains a short sweep for
the tests. Writes ``results/learning_rates.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import functools
import math
import time

import _common
import jax  # noqa: E402  (after _common, which puts this checkout's jaxnorm first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnorm as jn  # noqa: E402

NAME = "learning_rates"
WIDTH = 64
DEPTH = 6
BATCH = 64
SGD_MOMENTUM = 0.9
BN_MOMENTUM = 0.99
LEARNING_RATES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
QUICK_LEARNING_RATES = (0.02, 0.1, 0.2, 0.5)
VARIANTS = ("without_bn", "with_bn")


def init_mlp(key, n_in, n_out, *, bn):
    """He-normal weights; with BN the hidden layers have no bias (BN's beta is one)."""
    sizes = [n_in] + [WIDTH] * DEPTH + [n_out]
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        layer = {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)}
        if bn and i < DEPTH:
            layer["gamma"] = jnp.ones(b)
            layer["beta"] = jnp.zeros(b)
        else:
            layer["b"] = jnp.zeros(b)
        params.append(layer)
    stats = [jn.init_batch_stats(WIDTH) for _ in range(DEPTH)] if bn else []
    return params, stats


def apply_mlp(params, stats, x, *, bn, training):
    new_stats = []
    h = x
    for i, layer in enumerate(params[:-1]):
        z = h @ layer["w"]
        if bn:
            z, s = jn.batch_norm(z, stats[i], layer["gamma"], layer["beta"], training=training, momentum=BN_MOMENTUM)
            new_stats.append(s)
        else:
            z = z + layer["b"]
        h = jax.nn.relu(z)
    return h @ params[-1]["w"] + params[-1]["b"], new_stats


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _one_chunk(state, lr, key, data, *, bn, eval_every):
    """One configuration: ``eval_every`` SGD steps, then (train loss, test accuracy) in eval mode."""
    x_train, y_train, x_test, y_test = data
    optimizer = optax.sgd(lr, momentum=SGD_MOMENTUM)

    def step(state, key):
        params, stats, opt_state = state
        idx = jax.random.randint(key, (BATCH,), 0, x_train.shape[0])

        def loss_fn(params):
            logits, new_stats = apply_mlp(params, stats, x_train[idx], bn=bn, training=True)
            return _loss(logits, y_train[idx]), new_stats

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), None

    state, _ = jax.lax.scan(step, state, jax.random.split(key, eval_every))
    params, stats, _ = state
    # The training loss on as many training examples as there are test examples (enough to see
    # divergence), in the same forward pass as the test set: one evaluation graph to compile.
    n = x_test.shape[0]
    logits, _ = apply_mlp(params, stats, jnp.concatenate([x_train[:n], x_test]), bn=bn, training=False)
    return state, _loss(logits[:n], y_train[:n]), jnp.mean(logits[n:].argmax(-1) == y_test)


@functools.partial(jax.jit, static_argnames=("bn", "eval_every"))
def sweep_chunk(states, lrs, seed_keys, chunk, data, *, bn, eval_every):
    """Every configuration of the sweep at once: ``vmap`` of :func:`_one_chunk` over its leading axis.

    Args:
      states: ``(params, bn_stats, opt_state)`` with a leading (K,) axis, K = rates x seeds.
      lrs: (K,) learning rates.
      seed_keys: (K,) PRNG keys of the batches (one per seed, repeated over rates).
      chunk: () int32, the chunk's index, folded into ``seed_keys``.
      data: ``(x_train, y_train, x_test, y_test)``, shared.

    Returns:
      ``(states, train_loss (K,), test_accuracy (K,))``.
    """
    one = functools.partial(_one_chunk, data=data, bn=bn, eval_every=eval_every)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, chunk))(seed_keys)
    return jax.vmap(one)(states, lrs, keys)


@functools.partial(jax.jit, static_argnums=(2, 3), static_argnames="bn")
def init_states(seeds, lrs, n_in, n_out, *, bn):
    """(K,)-stacked ``(params, bn_stats, opt_state)``: the weights depend on the seed only."""
    def init(seed, lr):
        params, stats = init_mlp(jax.random.PRNGKey(seed), n_in, n_out, bn=bn)
        return params, stats, optax.sgd(lr, momentum=SGD_MOMENTUM).init(params)
    return jax.vmap(init)(seeds, lrs)


def train_sweep(data, *, bn, lrs, seeds, steps, eval_every, progress=True):
    """Trains every (rate, seed) pair; returns (rates, seeds, evaluations) loss and accuracy arrays."""
    n_lr, n_seed = len(lrs), len(seeds)
    lr_flat = jnp.repeat(jnp.asarray(lrs, jnp.float32), n_seed)
    seed_flat = np.tile(np.asarray(seeds), n_lr)

    states = init_states(jnp.asarray(seed_flat), lr_flat, data.num_features, data.num_classes, bn=bn)
    arrays = tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    batch_keys = jax.jit(jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1)))(jnp.asarray(seed_flat))
    losses, accuracies = [], []
    label = "with BN" if bn else "without BN"
    bar = _common.progress(steps, f"sweep {label}", disable=not progress)
    for i in range(steps // eval_every):
        states, loss, acc = sweep_chunk(states, lr_flat, batch_keys, jnp.int32(i), arrays, bn=bn, eval_every=eval_every)
        losses.append(np.asarray(loss))
        accuracies.append(np.asarray(acc))
        bar.update(eval_every)
    bar.close()
    shape = (n_lr, n_seed, -1)
    return np.stack(losses, -1).reshape(shape), np.stack(accuracies, -1).reshape(shape)


def stable(loss: np.ndarray, num_classes: int) -> np.ndarray:
    """(rates,) bool: for every seed, the loss stayed finite and ends below the untrained network's ln(C)."""
    finite = np.all(np.isfinite(loss), axis=(1, 2))
    below = np.all(loss[:, :, -1] < math.log(num_classes), axis=1)
    return finite & below


def run(*, lrs, seeds, steps, eval_every, progress=True):
    start = time.perf_counter()
    data = _common.load_mnist1d()
    eval_steps = list(range(eval_every, steps + 1, eval_every))
    result = {
        "name": NAME,
        "paper": "Ioffe & Szegedy 2015, sections 3.3 and 4.2 (BN-x5, BN-x30)",
        "dataset": {"name": data.name, "train": len(data.y_train), "test": len(data.y_test)},
        "config": {
            "hidden_layers": DEPTH, "width": WIDTH, "activation": "relu", "batch_size": BATCH,
            "optimizer": f"optax.sgd(momentum={SGD_MOMENTUM})", "bn_momentum": BN_MOMENTUM,
            "steps": steps, "eval_every": eval_every, "seeds": list(seeds),
            "inference": "population statistics (training=False)",
        },
        "learning_rates": list(lrs),
        "steps": eval_steps,
    }
    for key in VARIANTS:
        loss, acc = train_sweep(data, bn=key == "with_bn", lrs=lrs, seeds=seeds, steps=steps,
                                eval_every=eval_every, progress=progress)
        ok = stable(loss, data.num_classes)
        mean_acc = acc.mean(axis=1)  # (rates, evaluations): the seed mean
        result[key] = {
            "train_loss": loss.mean(axis=1),  # non-finite means become null in the JSON
            "test_accuracy": mean_acc,
            "stable": ok,
            "final_test_accuracy": mean_acc[:, -1],
            "best_test_accuracy": mean_acc.max(axis=1),
            "largest_stable_lr": max((lr for lr, s in zip(lrs, ok) if s), default=None),
        }
    target = float(np.max(result["without_bn"]["best_test_accuracy"]))
    summary = {"best_without_bn_accuracy": target}
    for key in VARIANTS:
        reach = [_common.first_step_reaching(eval_steps, curve, target) for curve in result[key]["test_accuracy"]]
        result[key]["steps_to_best_without_bn"] = reach
        done = [(s, lr) for s, lr, ok in zip(reach, lrs, result[key]["stable"]) if s is not None and ok]
        best_steps, best_lr = min(done) if done else (None, None)
        summary[key] = {
            "largest_stable_lr": result[key]["largest_stable_lr"],
            "best_final_test_accuracy": float(np.max(result[key]["final_test_accuracy"])),
            "steps_to_best_without_bn": best_steps,
            "lr_of_fastest": best_lr,
        }
    a, b = summary["without_bn"]["steps_to_best_without_bn"], summary["with_bn"]["steps_to_best_without_bn"]
    summary["speedup"] = a / b if a and b else None
    lw, lb = summary["without_bn"]["largest_stable_lr"], summary["with_bn"]["largest_stable_lr"]
    summary["stable_lr_ratio"] = lb / lw if lw and lb else None
    result["summary"] = summary
    result["seconds"] = time.perf_counter() - start
    return result


def plot(result):
    import matplotlib.pyplot as plt

    lrs = np.asarray(result["learning_rates"])
    steps = np.asarray(result["steps"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    ax = axes[0]
    for key, style, label in (("without_bn", "o--", "Without BN"), ("with_bn", "s-", "With BN")):
        final = np.asarray(result[key]["final_test_accuracy"], dtype=float)
        ax.plot(lrs, final, style, label=label)
        bad = ~np.asarray(result[key]["stable"])
        ax.plot(lrs[bad], final[bad], "x", color="red", ms=10, mew=2)
    ax.set(xscale="log", title="(a) final test accuracy vs learning rate", xlabel="learning rate",
           ylabel="test accuracy")
    ax.plot([], [], "x", color="red", label="unstable")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    target = result["summary"]["best_without_bn_accuracy"]
    for ax, key, title in ((axes[1], "without_bn", "(b) without BN"), (axes[2], "with_bn", "(c) with BN")):
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(lrs)))
        for lr, curve, ok, c in zip(lrs, result[key]["test_accuracy"], result[key]["stable"], colors):
            ax.plot(steps, np.asarray(curve, dtype=float), "-" if ok else ":", color=c, label=f"lr {lr:g}")
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{title}: test accuracy", xlabel="training steps", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("test accuracy (seed mean)")
    axes[2].legend(loc="lower right", fontsize=7, ncol=2)
    cfg = result["config"]
    fig.suptitle(f"{cfg['hidden_layers']}x{cfg['width']} ReLU MLP on {result['dataset']['name']}, "
                 f"batch {cfg['batch_size']}, SGD momentum {SGD_MOMENTUM}; dashed gray: best accuracy without BN",
                 fontsize=10)
    fig.tight_layout()
    return fig


def table(result):
    rows = []
    for i, lr in enumerate(result["learning_rates"]):
        row = [f"{lr:g}"]
        for key in VARIANTS:
            r = result[key]
            row += [float(r["final_test_accuracy"][i]), "yes" if r["stable"][i] else "NO",
                    r["steps_to_best_without_bn"][i]]
        rows.append(row)
    headers = ["lr", "no BN acc", "stable", "steps", "BN acc", "stable", "steps"]
    return _common.format_table(headers, rows)


def main(argv=None):
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (2000; 500 with --quick)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (100)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help=f"learning rates (default {' '.join(map(str, LEARNING_RATES))}; "
                             f"{' '.join(map(str, QUICK_LEARNING_RATES))} with --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per rate (2; 1 with --quick)")
    args = parser.parse_args(argv)
    steps = args.steps or (500 if args.quick else 2000)
    eval_every = args.eval_every or 100
    n_seeds = args.seeds or (1 if args.quick else 2)
    seeds = [args.seed + i for i in range(n_seeds)]
    lrs = tuple(args.lrs or (QUICK_LEARNING_RATES if args.quick else LEARNING_RATES))
    result = run(lrs=lrs, seeds=seeds, steps=steps, eval_every=eval_every,
                 progress=not args.no_progress)
    json_path = _common.write_json(args.out, NAME, result)
    png_path = _common.save_figure(plot(result), args.out, NAME)

    s = result["summary"]
    print(f"Learning-rate sweep on {result['dataset']['name']}: {DEPTH}x{WIDTH} ReLU MLP, batch {BATCH}, "
          f"SGD momentum {SGD_MOMENTUM}, {steps} steps, seeds {seeds}")
    print(f"steps: first evaluated step at which the seed-mean test accuracy reaches the best accuracy "
          f"without BN ({s['best_without_bn_accuracy']:.3f}); '-' = never.")
    print(table(result))
    print()
    print(_common.format_table(
        ["", "largest stable lr", "best final acc", "steps to best no-BN acc", "at lr"],
        [[label, s[key]["largest_stable_lr"], s[key]["best_final_test_accuracy"],
          s[key]["steps_to_best_without_bn"], s[key]["lr_of_fastest"]]
         for label, key in (("without BN", "without_bn"), ("with BN", "with_bn"))]))
    ratio = f"{s['stable_lr_ratio']:g}x" if s["stable_lr_ratio"] else "-"
    speed = f" ({s['speedup']:.1f}x fewer)" if s["speedup"] else ""
    print(f"\nWith BN the largest stable learning rate is {ratio} that without BN; the best no-BN accuracy "
          f"({s['best_without_bn_accuracy']:.3f}) takes {s['with_bn']['steps_to_best_without_bn']} steps with BN, "
          f"{s['without_bn']['steps_to_best_without_bn']} without{speed}.")
    print(f"Wrote {json_path} and {png_path} in {result['seconds']:.1f} s.")
    return result


if __name__ == "__main__":
    main()
