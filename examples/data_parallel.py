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

With ``--processes N`` the script also runs ``synced`` training as one JAX job
of N local processes with 8/N devices each (``jax.distributed.initialize``,
gloo collectives over localhost, each process feeding its slice of every batch
with ``jax.make_array_from_process_local_data``) and adds that run, ``synced,
N processes``, to the table: it matches single-device training as the
one-process run does. docs/guides/multi_process.md is the recipe.

Run: ``python examples/data_parallel.py [--quick] [--seed 0] [--processes 2]``.
Nothing is downloaded (the digits ship with scikit-learn). The 8 devices are
host CPU devices made by ``--xla_force_host_platform_device_count=8``, set
before jax is imported; on a machine with 8 GPUs or TPUs the same code runs on
those.
"""

from __future__ import annotations

import os

if "JAXNORM_PROCESS_ID" not in os.environ:  # a process of a --processes run has its devices from the launcher
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "examples"):
    if str(_path) not in sys.path:  # run against the jaxnorm next to this script; its helpers
        sys.path.insert(0, str(_path))

import _multiprocess  # noqa: E402
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


def process_main(args, steps_n: int) -> None:
    """One process of a ``--processes`` run: ``synced`` training on the mesh of every process's devices.

    Every process starts from the same weights (the same seed) and feeds its
    slice of each global batch; process 0 writes the loss curve and the test
    metrics to ``<out>/process_0.json``.
    """
    start = time.perf_counter()
    process_id, num_processes = _multiprocess.initialize()
    initialized = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load(args.seed)
    order = batches(len(x_tr), args.batch, steps_n, args.seed)
    optimizer = optax.adam(3e-3)
    # One compiled init: op by op, on a busy machine, it took 30 s in each process.
    init = jax.jit(ConvNet(None).init, static_argnums=2)
    variables = init(jax.random.key(args.seed), x_tr[: args.batch], True)
    steps, sharding, replicated = make_steps(optimizer, args.batch)  # the mesh spans all processes' devices
    host = jax.tree.map(np.asarray, (variables["params"], variables["batch_stats"],
                                     optimizer.init(variables["params"])))
    params, stats, opt_state = jax.device_put(host, replicated)  # the same values in every process
    per_process = args.batch // num_processes
    mine = slice(process_id * per_process, (process_id + 1) * per_process)
    losses, step_seconds = [], []
    for idx in tqdm(order, desc=f"process {process_id}", leave=False, mininterval=0.5, disable=args.no_progress):
        xb, yb = (jax.make_array_from_process_local_data(sharding, a[idx[mine]]) for a in (x_tr, y_tr))
        params, stats, opt_state, loss = steps["synced"](params, stats, opt_state, xb, yb)
        losses.append(float(loss.addressable_data(0)))  # replicated: the local copy is the value
        step_seconds.append(time.perf_counter())
    if process_id == 0:
        local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (params, stats))
        test_loss, acc = jax.jit(evaluate)(*local, x_te, y_te)  # on process 0's own device only
        (args.out / "process_0.json").write_text(json.dumps({
            "curve": losses, "test_loss": float(test_loss), "test_accuracy": float(acc),
            "processes": num_processes, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "seconds": {"initialize": initialized - start, "first_step": step_seconds[0] - initialized,
                        "later_steps": step_seconds[-1] - step_seconds[0]},
        }))


def launch_processes(args, steps_n: int) -> tuple[dict, float]:
    """Runs ``synced`` training as ``args.processes`` local processes; their results and wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        child_args = ["--steps", str(steps_n), "--seed", str(args.seed), "--batch", str(args.batch),
                      "--out", tmp, "--no-progress"]
        seconds = _multiprocess.launch(Path(__file__), child_args, num_processes=args.processes,
                                       local_devices=DEVICES // args.processes, log_dir=tmp,
                                       timeout=300 + 2 * steps_n)
        return json.loads((Path(tmp) / "process_0.json").read_text()), seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: 40 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600, 40 with --quick)")
    parser.add_argument("--batch", type=int, default=32, help="global batch, split over 8 devices")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--processes", type=int, default=1,
                        help="also train synced over this many local processes (a divisor of 8), e.g. 2")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    steps_n = args.steps or (40 if args.quick else 600)
    if "JAXNORM_PROCESS_ID" in os.environ:  # started by launch_processes
        _multiprocess.run_worker(lambda: process_main(args, steps_n))
        return {}
    if args.processes < 1 or DEVICES % args.processes:
        parser.error(f"`--processes`={args.processes} must divide the {DEVICES} devices; pass 1, 2, 4 or 8")
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
        for idx in tqdm(order, desc=f"{method:>10s}", leave=False, mininterval=0.5, disable=args.no_progress):
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
    processes_seconds = None
    if args.processes > 1:
        run, processes_seconds = launch_processes(args, steps_n)
        method = f"synced, {args.processes} processes"
        curves[method] = run["curve"]
        final[method] = {"train_loss": run["curve"][-1], "test_loss": run["test_loss"],
                         "test_accuracy": run["test_accuracy"]}
    methods = list(curves)

    single = np.asarray(curves["single"])
    early = min(20, len(single))
    for method in methods:
        diff = np.abs(np.asarray(curves[method]) - single)
        # Float32 rounding differs between one device and eight (the sums are
        # grouped differently); training amplifies it slowly, so the early
        # steps show the agreement of the computation itself.
        final[method]["max_loss_diff_vs_single"] = float(diff.max())
        final[method]["max_loss_diff_first_20_steps"] = float(diff[:early].max())
    seconds = time.perf_counter() - start

    print(f"\n{len(order)} steps, global batch {args.batch} ({args.batch // DEVICES} per device), seed {args.seed}")
    width = max(map(len, methods))
    print(f"{'method':>{width}s} | {'train loss':>10s} | {'test loss':>9s} | {'test acc':>8s} | "
          f"max |loss - single|: first {early} steps | all steps")
    for method in methods:
        r = final[method]
        print(f"{method:>{width}s} | {r['train_loss']:10.4f} | {r['test_loss']:9.4f} | {r['test_accuracy']:8.3f} | "
              f"{r['max_loss_diff_first_20_steps']:>31.2e} | {r['max_loss_diff_vs_single']:9.2e}")
    if processes_seconds is not None:
        print(f"({args.processes} processes x {DEVICES // args.processes} devices, gloo collectives: "
              f"{processes_seconds:.1f} s of the total, start-up included)")
    print(f"{seconds:.1f} s")

    result = {
        "config": {"steps": len(order), "global_batch": args.batch, "devices": DEVICES, "seed": args.seed,
                   "optimizer": "adam(3e-3)", "quick": args.quick, "processes": args.processes},
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
        ax.plot(curve, label=method, **styles.get(method, dict(lw=1.5, ls=":")))
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"8 devices, global batch {batch} ({batch // DEVICES} per device)")
    ax.legend()
    single = np.asarray(curves["single"])
    for method in list(curves)[1:]:
        ax_diff.plot(np.abs(np.asarray(curves[method]) - single) + 1e-9, label=method,
                     **styles.get(method, dict(lw=1.5, ls=":")))
    ax_diff.set(xlabel="step", ylabel="|loss - single-device loss|", yscale="log",
                title="difference from single-device training")
    ax_diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
