"""A small CNN in flax.linen (and flax.nnx) with jaxnorm layers on the 8x8 digits.

The model::

    conv3x3(16) -> BatchNorm -> relu -> conv3x3/2(32) -> BatchNorm -> relu
    -> conv3x3/2(32) -> GroupNorm(4 groups) -> relu -> flatten
    -> dense(64) -> LayerNorm -> relu -> dense(10)

with :mod:`jaxnorm.linen` layers (``BatchNorm``, ``GroupNorm``, ``LayerNorm``),
trained with optax (Adam, a jitted step that applies with
``mutable=["batch_stats"]``), evaluated in eval mode (running statistics), then:

1. saved with ``flax.serialization.to_bytes`` to ``results/flax_cnn.msgpack``
   and restored with ``from_bytes``: the restored model must give identical
   outputs;
2. folded for inference (:func:`fold_for_inference`): each BatchNorm after a
   convolution becomes that convolution's kernel and bias (Ioffe & Szegedy
   2015, Algorithm 2: inference batch norm is a fixed affine map per channel)
   via ``jaxnorm.fold_batch_norm``; the folded network, which has no
   BatchNorm left, must match the unfolded one in eval mode;
3. the same architecture is trained with :mod:`jaxnorm.nnx` layers,
   ``model.train()`` / ``model.eval()`` and ``nnx.jit``.

Writes ``results/flax_cnn.json`` (accuracies, restore and fold checks) and
``results/flax_cnn.png`` (training curves). ``--quick`` trains for 2 epochs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import _batch_common as common
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

BATCH = 32
LR = 3e-3
EPOCHS = 8
QUICK_EPOCHS = 2
MOMENTUM = 0.9
BN_EPSILON = 1e-5
CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"))  # the convolutions whose BatchNorm folds


class CNN(nn.Module):
    """``folded=True`` is the inference network after folding: no BatchNorm, the same convolutions."""

    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for (conv, bn), features, stride in zip(CONV_BN, (16, 32), (1, 2)):
            x = nn.Conv(features, (3, 3), strides=stride, name=conv)(x)
            if not self.folded:
                x = jnl.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=BN_EPSILON, name=bn)(x)
            x = nn.relu(x)
        x = nn.Conv(32, (3, 3), strides=2, name="conv3")(x)
        x = nn.relu(jnl.GroupNorm(num_groups=4, name="gn")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(jnl.LayerNorm(name="ln")(nn.Dense(64, name="dense")(x)))
        return nn.Dense(10, name="head")(x)


class NNXCNN(nnx.Module):
    """The same network with :mod:`jaxnorm.nnx` layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn1 = jnx.BatchNorm(16, momentum=MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.bn2 = jnx.BatchNorm(32, momentum=MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.conv3 = nnx.Conv(32, 32, (3, 3), strides=2, rngs=rngs)
        self.gn = jnx.GroupNorm(32, num_groups=4, rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
        self.ln = jnx.LayerNorm(64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.gn(self.conv3(x)))
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.ln(self.dense(x))))


def init_key(seed: int) -> jax.Array:
    """The key for the initial weights.

    An ``rbg`` key (XLA's own random bit generator) rather than the default
    threefry one: on CPU, XLA takes seconds to compile threefry for each
    weight shape, far longer than this example trains; initialization inside
    one jitted call compiles once.
    """
    return jax.random.key(seed, impl="rbg")


def batches(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]


def train_linen(data, epochs: int, seed: int, bar) -> tuple[dict[str, Any], dict[str, list[float]]]:
    x_train, y_train, x_test, y_test = data
    model = CNN()
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(init_key(seed), jnp.asarray(x_train[:2]))
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, labels):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    rng = np.random.default_rng([seed, 1])
    curves: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
    for _ in range(epochs):
        losses = []
        for idx in batches(rng, len(x_train)):
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x_train[idx], y_train[idx])  # noqa: E501
            losses.append(loss)
        variables = {"params": params, "batch_stats": batch_stats}
        curves["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        curves["test_accuracy"].append(accuracy(linen_predict(variables, x_test), y_test))
        bar.update()
    return variables, curves


@jax.jit
def linen_predict(variables: dict[str, Any], x: jax.Array) -> jax.Array:
    """Eval-mode logits (running statistics)."""
    return CNN().apply(variables, x, train=False)


@jax.jit
def folded_predict(variables: dict[str, Any], x: jax.Array) -> jax.Array:
    return CNN(folded=True).apply(variables, x)


def accuracy(logits: jax.Array, labels: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def fold_for_inference(variables: dict[str, Any]) -> dict[str, Any]:
    """The variables of ``CNN(folded=True)``: every BatchNorm folded into the convolution before it.

    ``jaxnorm.fold_batch_norm`` turns (kernel, bias, running statistics,
    scale, bn_bias) into a kernel and bias with
    ``W' = W * scale / sqrt(var + eps)`` along the output channels and
    ``b' = (b - mean) * scale / sqrt(var + eps) + bn_bias``.
    (``jaxnorm.linen.batch_norm_pairs`` and ``fold_batch_norms`` do the same
    for a whole variable tree; the loop is spelled out here to show the map.)
    """
    params = {name: dict(p) for name, p in variables["params"].items()}
    for conv, bn in CONV_BN:
        s = variables["batch_stats"][bn]
        stats = jn.BatchStats(mean=s["mean"], var=s["var"], count=s["count"])
        bn_params = params.pop(bn)
        kernel, bias = jn.fold_batch_norm(
            params[conv]["kernel"],
            params[conv]["bias"],
            stats,
            bn_params["scale"],
            bn_params["bias"],
            epsilon=BN_EPSILON,
            feature_axis=-1,
        )  # HWIO: output channels last
        params[conv] = {"kernel": kernel, "bias": bias}
    return {"params": params}


def save_and_restore(variables: dict[str, Any], path) -> dict[str, Any]:
    path.write_bytes(flax.serialization.to_bytes(variables))
    template = jax.tree.map(jnp.zeros_like, variables)
    return flax.serialization.from_bytes(template, path.read_bytes())


def train_nnx(data, epochs: int, seed: int, bar) -> tuple[NNXCNN, dict[str, list[float]]]:
    x_train, y_train, x_test, y_test = data
    model = nnx.jit(lambda: NNXCNN(nnx.Rngs(init_key(seed))))()
    optimizer = nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)  # the batch statistics were updated in place
        return loss

    predict = nnx.jit(lambda model, x: model(x))
    rng = np.random.default_rng([seed, 1])
    curves: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
    for _ in range(epochs):
        model.train()
        losses = [train_step(model, optimizer, x_train[idx], y_train[idx]) for idx in batches(rng, len(x_train))]
        model.eval()
        curves["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        curves["test_accuracy"].append(accuracy(predict(model, x_test), y_test))
        bar.update()
    return model, curves


def plot(curves: dict[str, dict[str, list[float]]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, c in curves.items():
        epochs = np.arange(1, len(c["train_loss"]) + 1)
        ax_loss.plot(epochs, c["train_loss"], marker="o", label=name)
        ax_acc.plot(epochs, 100 * np.asarray(c["test_accuracy"]), marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss (batch statistics)")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (eval mode)")
    for a in (ax_loss, ax_acc):
        a.xaxis.get_major_locator().set_params(integer=True)
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default=None, help="output folder (default results/)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    out = common.results_dir(args.out)
    start = time.perf_counter()
    data = common.load_digits()
    x_test = jnp.asarray(data[2])

    with tqdm(total=2 * epochs, desc="flax_cnn", disable=args.no_progress, leave=False) as bar:
        variables, linen_curves = train_linen(data, epochs, args.seed, bar)
        logits = linen_predict(variables, x_test)

        restored = save_and_restore(variables, out / "flax_cnn.msgpack")
        restore_diff = float(jnp.max(jnp.abs(linen_predict(restored, x_test) - logits)))

        folded = fold_for_inference(variables)
        fold_diff = float(jnp.max(jnp.abs(folded_predict(folded, x_test) - logits)))

        model, nnx_curves = train_nnx(data, epochs, args.seed, bar)
    elapsed = time.perf_counter() - start

    linen_acc, nnx_acc = linen_curves["test_accuracy"][-1], nnx_curves["test_accuracy"][-1]
    print(f"{'':<44}{'test accuracy':>14}")
    print(f"{'flax.linen + jaxnorm.linen (eval mode)':<44}{100 * linen_acc:>13.2f}%")
    print(f"{'flax.nnx + jaxnorm.nnx (model.eval())':<44}{100 * nnx_acc:>13.2f}%")
    print(f"restored from msgpack: max |logit difference| = {restore_diff:.1e} (identical: {restore_diff == 0.0})")
    print(f"folded BatchNorm into the convolutions: max |logit difference| = {fold_diff:.2e}")
    print(f"({epochs} epochs, {elapsed:.1f} s)")

    payload = {
        "epochs": epochs,
        "linen": {"test_accuracy": linen_acc, **{f"curve_{k}": v for k, v in linen_curves.items()}},
        "nnx": {"test_accuracy": nnx_acc, **{f"curve_{k}": v for k, v in nnx_curves.items()}},
        "restore": {"path": "flax_cnn.msgpack", "max_abs_diff": restore_diff, "identical": restore_diff == 0.0},
        "fold": {
            "max_abs_diff": fold_diff,
            "folded_layers": [c for c, _ in CONV_BN],
            "max_abs_logit": float(jnp.max(jnp.abs(logits))),
        },
        "config": {
            "seed": args.seed,
            "batch": BATCH,
            "lr": LR,
            "optimizer": "adam",
            "bn_momentum": MOMENTUM,
            "data": "sklearn digits 8x8, 1300 train / 497 test",
        },
        "runtime_s": round(elapsed, 2),
    }
    common.write_json(out / "flax_cnn.json", payload)
    plot({"linen": linen_curves, "nnx": nnx_curves}, out / "flax_cnn.png")
    print(f"wrote {out / 'flax_cnn.json'}, {out / 'flax_cnn.png'} and {out / 'flax_cnn.msgpack'}")
    return payload


if __name__ == "__main__":
    main()
