"""Wu & He 2018 (Group Normalization), Table 2 and Figure 1, in small.

The paper trains ResNet-50 on ImageNet with 32, 16, 8, 4 and 2 images per GPU
(8 GPUs, learning rate scaled linearly with the batch, the same number of
epochs) and reports the validation error of batch norm and group norm: batch
norm degrades from 23.6% to 34.7% as the per-GPU batch shrinks, group norm
stays at 24.0-24.2%.

Here the same experiment runs on scikit-learn's 8x8 digits (1300 training and
497 test images, flattened to 64 features) with a small fully connected
network::

    dense(128) -> norm -> relu -> dense(128) -> norm -> relu
    -> dense(128) -> norm -> relu -> dense(10)

trained with SGD (momentum 0.9, weight decay 5e-4, cosine decay) for the same
number of epochs (10) at every batch size, the learning rate scaled linearly
with the batch (0.1 at 32), 3 seeds per configuration. The methods:

- ``bn``: batch norm, evaluated with its moving averages (momentum 0.9, the
  paper's Caffe2 default).
- ``bn_precise``: the same trained networks, evaluated after PreciseBN
  (``jn.recalibrate``: population statistics as the mean of the per-batch
  statistics over ``1300 // 2`` batches of the training batch size: one
  pass over the training set at B = 2, several at larger B; Wu & Johnson
  2021).
- ``renorm``: batch renormalization (``jn.batch_renorm``) with the warm-up of
  ``jn.renorm_schedule`` scaled to the run: plain batch norm for the first 5%
  of the steps, ``d_max`` 0 -> 5 by 20% and ``r_max`` 1 -> 3 by 30% (about
  the paper's 5k/25k/40k steps of a ~130k-step run).
- ``ghost``: the closest analogue of the paper's own setting. There the total
  batch is 8 GPUs x B, but each GPU normalizes over its B images. Here the
  optimizer always sees 32 images (learning rate 0.1, the same number of
  steps at every B) and batch norm normalizes each group of B of them on its
  own (``ghost_batch_size=B``): only the statistics get worse as B shrinks,
  not the optimization. At B = 32 it is ``bn`` exactly (the same program), so
  that point is shared.
- ``gn``: group norm with 4 groups of 32 features (``jn.group_norm``); the
  paper uses 32 groups of convolution channels.
- ``ln``: layer norm over the 128 features of each example (``jn.layer_norm``).
- ``none``: no normalization, dense layers with a bias.

Each method is one jit-compiled program for every batch size: the seeds are
``jax.vmap``-ed, the steps run in a ``lax.fori_loop``, and a batch of B is 32
rows of which the first B count (``mask=`` in batch norm and renorm, zero
weight in the loss), so that B and the number of steps are traced values.
XLA compiles such a program in several seconds on CPU, much longer than it
trains, so one compilation per method instead of one per batch size is what
keeps the run short. Ghost batch norm needs one program per ghost size.

Where this differs from ResNet-50 on ImageNet, so read the numbers as a
qualitative check, not a reproduction:

- A 3-layer MLP on 8x8 digits, not 50 convolutional layers with residual
  connections; the task is easy (about 2% error at B = 32) and 497 test
  images resolve 0.2%.
- Fully connected batch norm estimates each feature's statistics from the B
  values of the batch, nothing else: at B = 2 every feature is normalized
  to -1 and +1 (up to epsilon) in training. A convolutional layer has B x H x W
  values per channel (ResNet-50 at B = 2: 98 in its last stage, 25,088 in
  the first). The collapse here is therefore much steeper than the paper's
  (tens of points, not eleven). We tried a 3-layer CNN on the 8x8 images
  first: with 2 x 8 x 8 values per channel its batch norm hardly degraded
  at B = 2, so the MLP is the setting where the small-batch effect shows.
- The paper changes the total batch with the per-GPU batch (8 x B); ``bn``,
  ``renorm``, ``gn``, ``ln`` and ``none`` here change the one batch (B), so the
  noise of SGD at small B adds to the normalization's effect; ``ghost`` keeps
  the optimizer's batch fixed instead.
- No data augmentation, 10 epochs, no learning-rate tuning per method; on
  this small problem the per-example norms and no normalization at all do
  about equally well, unlike on ImageNet.

Run ``python examples/batch_size.py`` or with ``--quick`` (batch sizes 32
and 2, 3 epochs; ``--methods bn,gn,ln`` narrows it further, as the test does).
Writes ``results/batch_size.json`` and ``results/batch_size.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import _batch_common as common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm import tqdm

import jaxnorm as jn

BATCH_SIZES = (32, 16, 8, 4, 2)
METHODS = ("bn", "bn_precise", "renorm", "ghost", "gn", "ln", "none")
LABELS = {
    "bn": "BN (moving averages)",
    "bn_precise": "BN + PreciseBN",
    "renorm": "Batch renorm",
    "ghost": "Ghost BN (batch 32, stats over B)",
    "gn": "GN (4 groups)",
    "ln": "LN",
    "none": "No normalization",
}
# Wu & He 2018, Table 2: ResNet-50 ImageNet validation error (%) at 32/16/8/4/2 images per GPU.
PAPER = {"bn": [23.6, 23.7, 24.8, 27.3, 34.7], "gn": [24.1, 24.2, 24.0, 24.2, 24.1]}

WIDTHS = (128, 128, 128)
NUM_GROUPS = 4
MOMENTUM = 0.9  # weight on the old value: PyTorch's momentum=0.1, Caffe2's 0.9
BASE_BATCH = 32
BASE_LR = 0.1
WEIGHT_DECAY = 5e-4
EPOCHS = 10
QUICK_EPOCHS = 3


def init_params(rng: np.random.Generator) -> dict[str, Any]:
    """He-initialized dense layers with norm scale/bias and a dense bias for every hidden layer.

    NumPy, not ``jax.random``: XLA on CPU compiles in-graph random number
    generation slowly (seconds), longer than this whole initialization takes.
    """
    hidden, n_in = [], 64
    for n_out in WIDTHS:
        w = rng.standard_normal((n_in, n_out), np.float32) * np.float32(np.sqrt(2.0 / n_in))
        hidden.append({"w": w, "b": np.zeros(n_out, np.float32), "scale": np.ones(n_out, np.float32),
                       "bias": np.zeros(n_out, np.float32)})
        n_in = n_out
    head = {"w": rng.standard_normal((n_in, 10), np.float32) / np.float32(np.sqrt(n_in)), "b": np.zeros(10, np.float32)}
    return {"hidden": hidden, "head": head}


def stack(trees: Sequence[Any]) -> Any:
    """Stacks pytrees along a new leading axis, on the host (no compilation per leaf shape)."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


def init_state() -> list[jn.BatchStats]:
    return [jn.init_batch_stats(n) for n in WIDTHS]


def forward(
    params: dict[str, Any],
    state: list[jn.BatchStats],
    x: jax.Array,
    *,
    method: str,
    training: bool,
    ghost: int | None = None,
    limits: tuple[Any, Any] = (3.0, 5.0),
    mask: jax.Array | None = None,
) -> tuple[jax.Array, list[jn.BatchStats]]:
    """Logits (N, 10) and the new batch statistics for one of the normalization methods; x is (N, 64)."""
    h, new_state = x, []
    for i, layer in enumerate(params["hidden"]):
        h = h @ layer["w"]
        if method in ("bn", "ghost"):
            h, s = jn.batch_norm(h, state[i], layer["scale"], layer["bias"], training=training,
                                 momentum=MOMENTUM, ghost_batch_size=ghost, mask=mask)
            new_state.append(s)
        elif method == "renorm":
            h, s = jn.batch_renorm(h, state[i], layer["scale"], layer["bias"], training=training,
                                   momentum=MOMENTUM, r_max=limits[0], d_max=limits[1], mask=mask)
            new_state.append(s)
        elif method == "gn":
            h = jn.group_norm(h, layer["scale"], layer["bias"], num_groups=NUM_GROUPS)
        elif method == "ln":
            h = jn.layer_norm(h, layer["scale"], layer["bias"])
        else:
            h = h + layer["b"]
        h = jax.nn.relu(h)
    logits = h @ params["head"]["w"] + params["head"]["b"]
    return logits, new_state if new_state else state


def make_trainer(method: str, ghost: int | None = None):
    """One jitted program that trains ``method`` at any batch size, vmapped over seeds.

    ``(params (S, ...), orders (S, T, 32), x, y, batch, n_steps) -> (params, state)``:
    step ``t`` draws the rows ``orders[:, t]`` of the training set, of which
    the first ``batch`` count (the others are masked out of the loss and of
    the batch statistics), for ``n_steps`` steps. ``batch`` and ``n_steps`` are
    traced, so the five batch sizes share one compilation (XLA's compile time
    on CPU, seconds per program, would otherwise dominate the run).
    """
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.trace(decay=0.9))

    def one_seed(params, orders, x, y, batch, n_steps):
        rows = jnp.arange(orders.shape[-1]) < batch
        mask = rows[:, None] if method in ("bn", "renorm") else None
        peak_lr = BASE_LR * batch / BASE_BATCH  # linear scaling (Goyal et al. 2017), as Wu & He

        def step(t, carry):
            params, state, opt_state = carry
            xb, yb = x[orders[t]], y[orders[t]]
            progress = t / n_steps
            lr = peak_lr * 0.5 * (1 + jnp.cos(jnp.pi * progress))
            # the paper's warm-up (5k / 25k / 40k steps of ~130k) in fractions of this run
            limits = jn.renorm_schedule(1000.0 * progress, warmup_steps=50, r_max_steps=300, d_max_steps=200)

            def loss_fn(params):
                logits, new_state = forward(params, state, xb, method=method, training=True,
                                            ghost=ghost, limits=limits, mask=mask)
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
                return jnp.sum(jnp.where(rows, losses, 0.0)) / batch, new_state

            (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: -lr * u, updates)
            return optax.apply_updates(params, updates), state, opt_state

        params, state, _ = lax.fori_loop(0, n_steps, step, (params, init_state(), tx.init(params)))
        return params, state

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None, None, None, None)))


def batch_orders(seed: int, n_seeds: int, n_train: int, batch: int, epochs: int, length: int) -> tuple[np.ndarray, int]:
    """(S, length, 32) row indices: per seed and epoch a permutation cut into batches; and the step count."""
    steps = n_train // batch
    out = np.zeros((n_seeds, length, BASE_BATCH), np.int32)
    for s in range(n_seeds):
        rng = np.random.default_rng([seed, s, batch])
        perms = [rng.permutation(n_train)[: steps * batch].reshape(steps, batch) for _ in range(epochs)]
        idx = np.concatenate(perms)
        out[s, : len(idx)] = np.tile(idx, (1, BASE_BATCH // batch))  # masked copies fill the 32 rows
    return out, steps * epochs


def _errors(params, state, x, y, method):
    def one(p, s):
        logits, _ = forward(p, s, x, method=method, training=False)
        return jnp.mean(logits.argmax(-1) != y)

    return jax.vmap(one)(params, state)


_EVAL = {m: jax.jit(lambda p, s, x, y, m=m: _errors(p, s, x, y, m)) for m in ("bn", "renorm", "gn", "ln", "none")}


def precise_bn(params, state, x_train, batch_sizes: Sequence[int], seed: int):
    """PreciseBN for every batch size and seed at once, with one compiled step.

    ``params`` and ``state`` carry leading (batch sizes, seeds) axes. Each of
    the ``n_train // min(batch_sizes)`` recalibration batches holds, for every
    batch size B, 32 rows of which the first B count (the ``mask``), drawn
    from shuffled passes over the training set: one pass at the smallest
    batch, several at the larger ones. Every network thus gets statistics of
    batches of the size it was trained with.
    """
    n = len(x_train)
    n_batches = n // min(batch_sizes)
    rng = np.random.default_rng([seed, 1])
    idx = np.zeros((n_batches, len(batch_sizes), BASE_BATCH), np.int64)
    for j, b in enumerate(batch_sizes):
        passes = -(-n_batches * b // n)
        flat = np.concatenate([rng.permutation(n)[: (n // b) * b] for _ in range(passes + 1)])
        idx[:, j] = np.tile(flat[: n_batches * b].reshape(n_batches, b), (1, BASE_BATCH // b))
    masks = jnp.asarray(np.arange(BASE_BATCH)[None, :, None] < np.asarray(batch_sizes)[:, None, None])
    batches = [jnp.asarray(x_train[i]) for i in idx]

    def update(stats, xb):
        def one(p, s, x, m):
            return forward(p, s, x, method="bn", training=True, mask=m)[1]

        per_batch = jax.vmap(one, in_axes=(0, 0, None, None))  # over seeds
        return jax.vmap(per_batch)(params, stats, xb, masks)  # over batch sizes

    return jn.recalibrate(update, state, batches)


def run(epochs: int, batch_sizes: Sequence[int], seeds: int, seed: int, progress: bool = True,
        methods: Sequence[str] = METHODS) -> tuple[dict[str, Any], dict[str, float]]:
    """Test errors per method: ``{method: {test_error (batch sizes x seeds, %), mean, std}}``, and seconds per job."""
    x_train, y_train, x_test, y_test = (a.reshape(len(a), -1) if a.ndim > 1 else a for a in common.load_digits())
    n = len(x_train)
    xt, yt = jnp.asarray(x_train), jnp.asarray(y_train)
    # every method and batch size starts from the same weights per seed
    params0 = stack([init_params(np.random.default_rng([seed, s])) for s in range(seeds)])
    length = (n // min(batch_sizes)) * epochs
    orders = {b: batch_orders(seed, seeds, n, b, epochs, length) for b in batch_sizes}
    orders[BASE_BATCH] = batch_orders(seed, seeds, n, BASE_BATCH, epochs, length)
    errors: dict[str, dict[int, list[float]]] = {m: {} for m in METHODS}
    timings: dict[str, float] = {}
    methods = [m for m in METHODS if m in methods or (m == "bn_precise" and "bn" in methods)]
    if "ghost" in methods and "bn" not in methods:
        methods.insert(0, "bn")  # ghost at B=32 is bn's run
    jobs = [(m, None) for m in ("bn", "renorm", "gn", "ln", "none") if m in methods]
    jobs += [("ghost", b) for b in batch_sizes if b < BASE_BATCH and "ghost" in methods]
    bar = tqdm(total=len(jobs) * 1, desc="batch_size", disable=not progress, leave=False)
    trained_bn: list[Any] = []
    for method, ghost in jobs:
        t0 = time.perf_counter()
        trainer = make_trainer(method, ghost)
        for batch in ([BASE_BATCH] if ghost else batch_sizes):
            bar.set_postfix_str(f"{method} B={ghost or batch}")
            o, steps = orders[batch]
            params, state = trainer(params0, jnp.asarray(o), xt, yt, batch, steps)
            eval_as = "bn" if method == "ghost" else method
            errors[method][ghost or batch] = np.asarray(_EVAL[eval_as](params, state, x_test, y_test)).tolist()
            if method == "bn":
                trained_bn.append((params, state))
                if batch == BASE_BATCH:  # ghost groups of 32 in a batch of 32: plain batch norm, the same program
                    errors["ghost"][batch] = errors["bn"][batch]
        if method == "bn":
            bar.set_postfix_str("PreciseBN")
            params, state = stack([p for p, _ in trained_bn]), stack([s for _, s in trained_bn])
            state = precise_bn(params, state, x_train, batch_sizes, seed)
            for j, b in enumerate(batch_sizes):
                p, s = jax.tree.map(lambda a, j=j: np.asarray(a)[j], (params, state))
                errors["bn_precise"][b] = np.asarray(_EVAL["bn"](p, s, x_test, y_test)).tolist()
        timings[method if ghost is None else f"ghost/{ghost}"] = round(time.perf_counter() - t0, 2)
        bar.update()
    bar.close()
    errors = {m: [errors[m][b] for b in batch_sizes] for m in methods}
    out = {}
    for m in methods:
        e = 100 * np.asarray(errors[m])  # (batch sizes, seeds), percent
        out[m] = {
            "label": LABELS[m],
            "test_error": e.round(3).tolist(),
            "test_error_mean": e.mean(1).round(3).tolist(),
            "test_error_std": (e.std(1, ddof=1) if e.shape[1] > 1 else np.zeros(len(e))).round(3).tolist(),
        }
    return out, timings


def table(results: dict[str, Any], batch_sizes: Sequence[int]) -> str:
    width = 36
    head = f"{'test error (%), mean ± std':<{width}}" + "".join(f"{'B=' + str(b):>14}" for b in batch_sizes)
    lines = [head, "-" * len(head)]
    for m in (m for m in METHODS if m in results):
        r = results[m]
        cells = "".join(f"{f'{mu:.2f} ± {sd:.2f}':>14}" for mu, sd in zip(r["test_error_mean"], r["test_error_std"]))
        lines.append(f"{LABELS[m]:<{width}}" + cells)
    for m, name in (("bn", "paper, ResNet-50 BN"), ("gn", "paper, ResNet-50 GN")):
        vals = dict(zip(BATCH_SIZES, PAPER[m]))
        lines.append(f"{name:<{width}}" + "".join(f"{vals[b]:>14.1f}" for b in batch_sizes))
    return "\n".join(lines)


def plot(results: dict[str, Any], batch_sizes: Sequence[int], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    xs = np.arange(len(batch_sizes))
    styles = {"bn": ("C0", "o", "-"), "bn_precise": ("C0", "s", "--"), "renorm": ("C4", "^", "-"),
              "ghost": ("C9", "v", ":"), "gn": ("C3", "D", "-"), "ln": ("C2", "P", "-"), "none": ("0.4", "x", "-")}
    for m in (m for m in METHODS if m in results):
        color, marker, ls = styles[m]
        mu, sd = np.asarray(results[m]["test_error_mean"]), np.asarray(results[m]["test_error_std"])
        n_seeds = len(results[m]["test_error"][0])
        ax.plot(xs, mu, color=color, marker=marker, ls=ls, label=LABELS[m])
        ax.fill_between(xs, np.maximum(mu - sd, 0.5), mu + sd, color=color, alpha=0.12, lw=0)
    ax.set_title(f"This run: 3-layer MLP on 8x8 digits ({n_seeds} seeds, ±1 std)")
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
    ax.set_ylabel("test error (%), log scale")
    ax_paper.set_title("Wu & He 2018: ResNet-50, ImageNet")
    ax_paper.set_ylabel("validation error (%)")
    pxs = np.arange(len(BATCH_SIZES))
    ax_paper.plot(pxs, PAPER["bn"], color="C0", marker="o", label="BN")
    ax_paper.plot(pxs, PAPER["gn"], color="C3", marker="D", label="GN")
    for a, bs, x in ((ax, batch_sizes, xs), (ax_paper, BATCH_SIZES, pxs)):
        a.set_xticks(x, [str(b) for b in bs])
        a.set_xlabel("batch size (images per batch-norm group)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch sizes 32 and 2, fewer epochs (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (vmapped)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS) + " (bn_precise comes with bn)")
    parser.add_argument("--out", default=None, help="output folder (default results/)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    batch_sizes = (32, 2) if args.quick else BATCH_SIZES
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    results, timings = run(epochs, batch_sizes, args.seeds, args.seed, progress=not args.no_progress, methods=methods)
    elapsed = time.perf_counter() - start
    print(table(results, batch_sizes))
    print(f"({args.seeds} seeds, {epochs} epochs, {elapsed:.1f} s)")

    out = common.results_dir(args.out)
    payload = {
        "batch_sizes": list(batch_sizes),
        "methods": results,
        "paper": {"source": "Wu & He 2018, Table 2 (ResNet-50, ImageNet val error %, images per GPU)",
                  "batch_sizes": list(BATCH_SIZES), **PAPER},
        "config": {"seed": args.seed, "seeds": args.seeds, "epochs": epochs, "quick": args.quick,
                   "base_batch": BASE_BATCH, "base_lr": BASE_LR, "lr_scaling": "linear in batch size",
                   "weight_decay": WEIGHT_DECAY, "momentum_bn": MOMENTUM, "widths": list(WIDTHS),
                   "gn_groups": NUM_GROUPS, "data": "sklearn digits 8x8, 1300 train / 497 test"},
        "runtime_s": round(elapsed, 2),
        "job_seconds": timings,
    }
    common.write_json(out / "batch_size.json", payload)
    plot(results, batch_sizes, out / "batch_size.png")
    print(f"wrote {out / 'batch_size.json'} and {out / 'batch_size.png'}")
    return payload


if __name__ == "__main__":
    main()
