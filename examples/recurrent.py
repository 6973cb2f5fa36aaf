"""Normalization in recurrent networks: LSTM, layer-norm LSTM, recurrent batch norm, shared statistics.

Batch norm's second weakness: in a recurrent net every time step has its own
statistics. Layer norm (Ba, Kiros & Hinton 2016) is computed per example, so it
needs nothing per step; recurrent batch norm (Cooijmans et al. 2016) keeps
separate running statistics for every step; the naive way, one set of
statistics for all steps, trains exactly like per-step batch norm (training
normalizes each step with its own batch statistics either way) but evaluates
every step with an average over steps.

This script trains four sequence classifiers that differ only in the cell,
with the same batches, optimizer and schedule:

- ``lstm``: ``flax.linen.LSTMCell``, no normalization;
- ``ln_lstm``: :class:`jaxnorm.linen.LayerNormLSTMCell` (Ba et al., eqs. 20-22);
- ``bn_lstm``: :class:`jaxnorm.linen.BatchNormLSTMCell` with per-step
  statistics, ``nn.RNN(cell, variable_axes={"batch_stats": 0},
  variable_broadcast="params", split_rngs={"params": False})``;
- ``bn_lstm_shared``: the same cell with one set of statistics carried through
  the steps in training (``variable_carry="batch_stats"``) and broadcast to
  every step in evaluation.

Data: MNIST-1D (Greydanus 2020), generated offline (4000 training and 1000 test
sequences of 40 values, 10 classes), read one value per step. Each step's input
is ``(x_t, 1)``: with a single input feature, layer norm of ``W_x x_t`` keeps
only the sign of ``x_t`` (the LN-LSTM is invariant to the scale of its input),
so a constant second feature gives it the value; the other cells see the same
inputs. The classifier is the cell (H units) followed by a dense layer on the
last hidden state, trained with Adam and gradient clipping.

Test accuracy is measured in evaluation mode (running statistics) for every
variant; the batch-norm variants are also evaluated with batch statistics
(training-mode normalization of the 1000 test sequences, statistics not
updated), which shows whether the network or its stored statistics are at fault.

Run ``python examples/recurrent.py`` (``--quick`` for the tests). Writes
``results/recurrent.json``, ``results/recurrent.png`` and
``results/recurrent.md`` (the table; a full run also writes it to
``docs/_generated/recurrent_results.md``).
"""

from __future__ import annotations

import time
from pathlib import Path

import _common
import flax.linen as nn  # noqa: E402  (after _common, which puts this checkout's jaxnorm first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxnorm.linen as jnl  # noqa: E402

NAME = "recurrent"
VARIANTS = ("lstm", "ln_lstm", "bn_lstm", "bn_lstm_shared")
LABELS = {
    "lstm": "LSTM",
    "ln_lstm": "layer-norm LSTM",
    "bn_lstm": "batch-norm LSTM, per-step statistics",
    "bn_lstm_shared": "batch-norm LSTM, shared statistics",
}
BATCH_NORM = ("bn_lstm", "bn_lstm_shared")
DOCS_TABLE = _common.ROOT / "docs" / "_generated" / "recurrent_results.md"


class Classifier(nn.Module):
    """A recurrent cell over (N, T, 2) sequences, then a dense layer on the last hidden state."""

    variant: str
    hidden: int
    train: bool
    momentum: float

    @nn.compact
    def __call__(self, x):
        if self.variant == "lstm":
            rnn = nn.RNN(nn.LSTMCell(self.hidden), name="rnn")
        elif self.variant == "ln_lstm":
            rnn = nn.RNN(jnl.LayerNormLSTMCell(self.hidden), name="rnn")
        else:
            cell = jnl.BatchNormLSTMCell(self.hidden, use_running_average=not self.train, momentum=self.momentum)
            if self.variant == "bn_lstm":
                scan = dict(variable_axes={"batch_stats": 0}, variable_broadcast="params", split_rngs={"params": False})
            elif self.train:  # one set of statistics, updated by every step in turn
                scan = dict(variable_broadcast="params", variable_carry="batch_stats")
            else:  # ... and used by every step
                scan = dict(variable_broadcast=["params", "batch_stats"])
            rnn = nn.RNN(cell, name="rnn", **scan)
        return nn.Dense(10, name="head")(rnn(x)[:, -1])


def as_sequences(x):
    """(N, 40) -> (N, 40, 2): one value a step, and a constant 1 (see the module docstring)."""
    x = np.asarray(x, np.float32)[..., None]
    return np.concatenate([x, np.ones_like(x)], axis=-1)


def make_functions(variant, hidden, momentum, lr):
    train_model = Classifier(variant, hidden, True, momentum)
    eval_model = Classifier(variant, hidden, False, momentum)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    mutable = ["batch_stats"] if variant in BATCH_NORM else []

    def init(key, x):
        # the shared variant's statistics are made broadcast (flax cannot carry what does not exist yet)
        variables = (eval_model if variant == "bn_lstm_shared" else train_model).init(key, x)
        params = variables["params"]
        return params, variables.get("batch_stats", {}), optimizer.init(params)

    def apply_train(params, stats, x):
        variables = {"params": params, **({"batch_stats": stats} if mutable else {})}
        if not mutable:
            return train_model.apply(variables, x), stats
        logits, upd = train_model.apply(variables, x, mutable=mutable)
        return logits, upd["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new_stats = apply_train(p, stats, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    @jax.jit
    def accuracy(params, stats, x, y):
        variables = {"params": params, **({"batch_stats": stats} if mutable else {})}
        return jnp.mean(jnp.argmax(eval_model.apply(variables, x), -1) == y)

    @jax.jit
    def accuracy_batch_stats(params, stats, x, y):
        # training-mode normalization of the test set; the updated statistics are dropped
        return jnp.mean(jnp.argmax(apply_train(params, stats, x)[0], -1) == y)

    return init, step, accuracy, accuracy_batch_stats


def train_variant(variant, data, *, steps, eval_every, batch, hidden, momentum, lr, seed, progress):
    init, step, accuracy, accuracy_batch_stats = make_functions(variant, hidden, momentum, lr)
    x_train, y_train = as_sequences(data.x_train), data.y_train
    x_test, y_test = jnp.asarray(as_sequences(data.x_test)), jnp.asarray(data.y_test)
    params, stats, opt_state = init(jax.random.key(seed), x_train[:batch])
    rng = np.random.default_rng(seed)  # the same batches for every variant
    out = {"test_accuracy": [], "train_loss": []}
    if variant in BATCH_NORM:
        out["test_accuracy_batch_stats"] = []
    start = time.perf_counter()
    bar = _common.progress(steps, variant, disable=not progress)
    losses = []
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(x_train), batch)
        params, stats, opt_state, loss = step(params, stats, opt_state, x_train[idx], y_train[idx])
        losses.append(loss)
        if i % eval_every == 0:
            out["train_loss"].append(float(np.mean(jax.device_get(losses))))
            losses = []
            out["test_accuracy"].append(float(accuracy(params, stats, x_test, y_test)))
            if variant in BATCH_NORM:
                out["test_accuracy_batch_stats"].append(float(accuracy_batch_stats(params, stats, x_test, y_test)))
            bar.update(eval_every)
            bar.set_postfix(acc=f"{out['test_accuracy'][-1]:.3f}")
    bar.close()
    out["seconds"] = time.perf_counter() - start
    out["final_test_accuracy"] = out["test_accuracy"][-1]
    out["best_test_accuracy"] = max(out["test_accuracy"])
    if variant in BATCH_NORM:
        out["final_test_accuracy_batch_stats"] = out["test_accuracy_batch_stats"][-1]
    return out


def run(*, steps, eval_every, batch=64, hidden=64, momentum=0.99, lr=2e-3, seed=0, progress=True, variants=VARIANTS):
    data = _common.load_mnist1d()
    result = {"steps": list(range(eval_every, steps + 1, eval_every))}
    start = time.perf_counter()
    for variant in variants:
        result[variant] = train_variant(variant, data, steps=steps, eval_every=eval_every, batch=batch, hidden=hidden,
                                        momentum=momentum, lr=lr, seed=seed, progress=progress)
    result["dataset"] = {"name": data.name, "train": len(data.x_train), "test": len(data.x_test),
                         "steps_per_sequence": data.num_features, "inputs_per_step": 2}
    result["config"] = {"batch": batch, "hidden": hidden, "momentum": momentum, "lr": lr, "seed": seed,
                        "optimizer": "adam, global-norm clipping 1.0"}
    result["summary"] = summarize(result, variants)
    result["seconds"] = time.perf_counter() - start
    return result


def summarize(result, variants):
    """Steps to 90% of the plain LSTM's best accuracy, and each BN variant's evaluation gap."""
    summary = {}
    if "lstm" in variants:
        target = 0.9 * result["lstm"]["best_test_accuracy"]
        summary["lstm_best"] = result["lstm"]["best_test_accuracy"]
        summary["target"] = target
        summary["steps_to_target"] = {
            v: _common.first_step_reaching(result["steps"], result[v]["test_accuracy"], target) for v in variants}
    for v in variants:
        if v in BATCH_NORM:
            summary[f"{v}_eval_gap"] = result[v]["final_test_accuracy_batch_stats"] - result[v]["final_test_accuracy"]
    return summary


def table(result, variants=VARIANTS):
    """The Markdown table of the run (docs/_generated/recurrent_results.md)."""
    s = result["summary"]
    c = result["config"]
    lines = [
        f"MNIST-1D read one value per step ({result['dataset']['steps_per_sequence']} steps), "
        f"{c['hidden']} hidden units, batch {c['batch']}, {result['steps'][-1]} Adam steps (lr {c['lr']}), "
        f"BN momentum {c['momentum']}, seed {c['seed']}; written by `python examples/recurrent.py`.",
        "",
        f"| cell | test accuracy (final) | best | with batch statistics (final) | steps to {s['target']:.3f} "
        f"(90% of the LSTM's best) |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        r = result[v]
        batch_stats = f"{r['final_test_accuracy_batch_stats']:.3f}" if v in BATCH_NORM else "-"
        reach = s["steps_to_target"].get(v)
        lines.append(f"| {LABELS[v]} (`{v}`) | {r['final_test_accuracy']:.3f} | {r['best_test_accuracy']:.3f} | "
                     f"{batch_stats} | {'-' if reach is None else reach} |")
    lines += ["", "Test accuracy is measured with the running statistics (evaluation mode); \"with batch statistics\" "
              "normalizes the test set with its own statistics, as in training."]
    return "\n".join(lines) + "\n"


def plot(result, variants=VARIANTS):
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(VARIANTS, ("tab:gray", "tab:blue", "tab:green", "tab:red"), strict=True))
    for v in variants:
        ax_acc.plot(result["steps"], result[v]["test_accuracy"], color=colors[v], label=LABELS[v])
        if v in BATCH_NORM:
            ax_acc.plot(result["steps"], result[v]["test_accuracy_batch_stats"], color=colors[v], ls=":",
                        label=f"{LABELS[v]}, batch statistics")
        ax_loss.plot(result["steps"], result[v]["train_loss"], color=colors[v], label=LABELS[v])
    ax_acc.set(xlabel="training step", ylabel="test accuracy", title="Test accuracy (evaluation mode)")
    ax_loss.set(xlabel="training step", ylabel="cross-entropy", title="Training loss", yscale="log")
    ax_acc.legend(fontsize=7)
    ax_loss.legend(fontsize=7)
    fig.suptitle("Normalization in an LSTM on MNIST-1D, one value per step")
    return fig


def main(argv=None):
    parser = _common.make_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (2000; 200 with --quick)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (100; 50 with --quick)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units (64; 32 with --quick)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    parser.add_argument("--momentum", type=float, default=None,
                        help="BN running-average momentum (0.99; 0.9 with --quick, too few steps for 0.99)")
    parser.add_argument("--table", default=None,
                        help="also write the Markdown table here "
                             "(default: docs/_generated/recurrent_results.md for full runs)")
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.quick else 2000)
    eval_every = args.eval_every or (50 if args.quick else 100)
    hidden = args.hidden or (32 if args.quick else 64)
    momentum = args.momentum if args.momentum is not None else (0.9 if args.quick else 0.99)
    result = run(steps=steps, eval_every=eval_every, hidden=hidden, momentum=momentum, lr=args.lr,
                 seed=args.seed, progress=not args.no_progress)
    json_path = _common.write_json(args.out, NAME, result)
    png_path = _common.save_figure(plot(result), args.out, NAME)
    markdown = table(result)
    (args.out / f"{NAME}.md").write_text(markdown)
    table_path = args.table or (None if args.quick else DOCS_TABLE)
    if table_path:
        Path(table_path).write_text(markdown)

    print(_common.format_table(
        ["cell", "final acc", "best acc", "final acc (batch stats)", "train loss", "seconds"],
        [[LABELS[v], result[v]["final_test_accuracy"], result[v]["best_test_accuracy"],
          result[v].get("final_test_accuracy_batch_stats"), result[v]["train_loss"][-1], result[v]["seconds"]]
         for v in VARIANTS]))
    print(f"\nSteps to {result['summary']['target']:.3f} test accuracy (90% of the plain LSTM's best): "
          + ", ".join(f"{v} {n}" for v, n in result["summary"]["steps_to_target"].items()))
    print(f"Wrote {json_path}, {png_path}{' and ' + str(table_path) if table_path else ''} "
          f"in {result['seconds']:.1f} s.")
    return result


if __name__ == "__main__":
    main()
