"""Data-parallel training with synchronized batch norm on 8 host CPU devices.

A small convolutional network learns scikit-learn's bundled 8x8 digits with
optax, three ways, from the same initial weights and the same global batches:

- ``single``: one device, batch norm over the whole global batch;
- ``synced``: the batch split over 8 devices under ``jax.shard_map``, batch norm
  with ``axis_name`` (statistics of the global batch, count-weighted, one
  collective forward and one backward);
- ``per-device``: the same split, batch norm without ``axis_name`` (each device
  normalizes its own slice; the running statistics are averaged).

Synchronized batch norm computes the single-device function, so its loss curve
matches single-device training to float32 rounding; per-device batch norm
normalizes with the statistics of a few examples and trains a different model.
The script prints a table, and writes ``results/data_parallel.json`` and
``results/data_parallel.png``.

Run: ``python examples/data_parallel.py [--quick] [--seed 0]``. Nothing is
downloaded (the digits ship with scikit-learn). The 8 devices are host CPU
devices made by ``--xla_force_host_platform_device_count=8``, set before jax is
imported; on a machine with 8 GPUs or TPUs the same code runs on those.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run against the jaxnorm next to this script
    sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jaxnorm.linen as jnl  # noqa: E402

matplotlib.use("Agg")

DEVICES = 8
AXIS = "batch"
METHODS = ("single", "synced", "per-device")


class ConvNet(nn.Module):
    """conv-BN-relu, strided conv-BN-relu, global average pool, dense: about 6k parameters."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: jnl.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(16, (3, 3), use_bias=False)(x)))
        x = nn.relu(bn()(nn.Conv(32, (3, 3), strides=(2, 2), use_bias=False)(x)))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def load(seed: int):
    """Digits as (N, 8, 8, 1) float32 in [0, 1] and int32 labels; a fixed 1500/297 split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1500], order[1500:]
    return x[train], y[train], x[test], y[test]


def batches(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) indices: shuffled epochs, the same for every method."""
    rng = np.random.default_rng(seed + 1)
    per_epoch = n_train // batch
    epochs = -(-steps // per_epoch)
    idx = np.concatenate([rng.permutation(n_train)[: per_epoch * batch] for _ in range(epochs)])
    return idx[: steps * batch].reshape(steps, batch)


def make_steps(optimizer, global_batch: int):
    """Jitted train steps for the three methods: (params, stats, opt_state, x, y) -> same + loss."""

    def local_loss(model, params, stats, x, y):
        # Each device's loss is its share of the global mean: summed over the
        # devices it is the single-device loss, so their gradients agree.
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce) / global_batch, upd["batch_stats"]

    def update(model, params, stats, opt_state, x, y, devices):
        (loss, stats), grads = jax.value_and_grad(functools_partial(local_loss, model), has_aux=True)(
            params, stats, x, y
        )
        if devices:
            # Under shard_map's replication typing, the gradient w.r.t. the
            # replicated parameters already is the sum over devices. Per-device
            # running statistics differ between devices: average them.
            loss = jax.lax.psum(loss, AXIS)
            if devices == "per-device":
                stats = jax.tree.map(sync_stat, stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    mesh = jax.make_mesh((DEVICES,), (AXIS,))
    steps = {"single": jax.jit(lambda *a: update(ConvNet(None), *a, devices=None))}
    for method, axis_name in (("synced", AXIS), ("per-device", None)):
        model = ConvNet(axis_name)
        f = jax.shard_map(
            lambda *a, model=model, method=method: update(model, *a, devices=method),
            mesh=mesh,
            in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
            out_specs=(P(), P(), P(), P()),
        )
        steps[method] = jax.jit(f)
    return steps, NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())


def sync_stat(s):
    """Mean of the devices' running statistics; the integer batch counter is the same on all."""
    return jax.lax.pmax(s, AXIS) if jnp.issubdtype(s.dtype, jnp.integer) else jax.lax.pmean(s, AXIS)


def functools_partial(f, *bound):
    return lambda *a: f(*bound, *a)


def evaluate(params, stats, x, y):
    logits = ConvNet(None).apply({"params": params, "batch_stats": stats}, x, False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 40 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600, 40 with --quick)")
    parser.add_argument("--batch", type=int, default=32, help="global batch, split over 8 devices")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    steps_n = args.steps or (40 if args.quick else 600)
    if len(jax.devices()) < DEVICES:
        raise SystemExit(
            f"needs {DEVICES} devices, found {len(jax.devices())}: set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} before jax is imported"
        )
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load(args.seed)
    order = batches(len(x_tr), args.batch, steps_n, args.seed)
    optimizer = optax.adam(3e-3)
    variables = ConvNet(None).init(jax.random.key(args.seed), x_tr[: args.batch], True)
    steps, sharding, replicated = make_steps(optimizer, args.batch)

    curves, final = {}, {}
    for method in METHODS:
        params, stats = variables["params"], variables["batch_stats"]
        opt_state = optimizer.init(params)
        if method != "single":
            # Replicated from the start, so the step compiles once (its outputs are replicated).
            params, stats, opt_state = jax.device_put((params, stats, opt_state), replicated)
        losses = []
        for idx in tqdm(order, desc=f"{method:>10s}", leave=False, mininterval=0.5):
            xb, yb = x_tr[idx], y_tr[idx]
            if method != "single":
                xb, yb = jax.device_put(xb, sharding), jax.device_put(yb, sharding)
            params, stats, opt_state, loss = steps[method](params, stats, opt_state, xb, yb)
            # Waiting for each step keeps one multi-device program in flight at a
            # time: XLA's CPU collectives can starve when several queue up on a
            # busy machine with fewer cores than devices.
            losses.append(float(loss))
        curves[method] = losses
        test_loss, acc = jax.jit(evaluate)(params, stats, x_te, y_te)
        final[method] = {"train_loss": curves[method][-1], "test_loss": float(test_loss), "test_accuracy": float(acc)}

    single = np.asarray(curves["single"])
    early = min(20, len(single))
    for method in METHODS:
        diff = np.abs(np.asarray(curves[method]) - single)
        # Float32 rounding differs between one device and eight (the sums are
        # grouped differently); training amplifies it slowly, so the early
        # steps show the agreement of the computation itself.
        final[method]["max_loss_diff_vs_single"] = float(diff.max())
        final[method]["max_loss_diff_first_20_steps"] = float(diff[:early].max())
    seconds = time.perf_counter() - start

    print(f"\n{len(order)} steps, global batch {args.batch} ({args.batch // DEVICES} per device), seed {args.seed}")
    print(f"{'method':>10s} | {'train loss':>10s} | {'test loss':>9s} | {'test acc':>8s} | "
          f"max |loss - single|: first {early} steps | all steps")
    for method in METHODS:
        r = final[method]
        print(f"{method:>10s} | {r['train_loss']:10.4f} | {r['test_loss']:9.4f} | {r['test_accuracy']:8.3f} | "
              f"{r['max_loss_diff_first_20_steps']:>31.2e} | {r['max_loss_diff_vs_single']:9.2e}")
    print(f"{seconds:.1f} s")

    result = {
        "config": {"steps": len(order), "global_batch": args.batch, "devices": DEVICES, "seed": args.seed,
                   "optimizer": "adam(3e-3)", "quick": args.quick},
        "final": final,
        "curves": curves,
        "seconds": seconds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_parallel.json").write_text(json.dumps(result, indent=1))
    plot(curves, args.out / "data_parallel.png", args.batch)
    return result


def plot(curves, path, batch):
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"single": dict(lw=3, alpha=0.4), "synced": dict(lw=1.2, ls="--"), "per-device": dict(lw=1.2)}
    for method, curve in curves.items():
        ax.plot(curve, label=method, **styles[method])
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"8 devices, global batch {batch} ({batch // DEVICES} per device)")
    ax.legend()
    single = np.asarray(curves["single"])
    for method in METHODS[1:]:
        ax_diff.plot(np.abs(np.asarray(curves[method]) - single) + 1e-9, label=method, **styles[method])
    ax_diff.set(xlabel="step", ylabel="|loss - single-device loss|", yscale="log",
                title="difference from single-device training")
    ax_diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
