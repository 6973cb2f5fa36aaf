"""A class-conditional generator on the 8x8 digits whose only input of the class is its norms.

A conditional VAE (Kingma & Welling 2014; Sohn et al. 2015) whose decoder sees
the requested digit *only* through conditional batch norm (de Vries et al.
2017, BigGAN): every hidden layer is ``jaxnorm.linen.ConditionalBatchNorm``,
whose per-example scale and shift are Dense projections of the one-hot class,
zero-initialized so that training starts from the plain batch norm::

    encoder:  x (64) -> dense(256) -> LayerNorm -> relu -> dense(2 * latent)
    decoder:  z (latent) -> dense(256) -> ConditionalBatchNorm(class) -> relu
              -> dense(256) -> ConditionalBatchNorm(class) -> relu -> dense(64)

trained with optax (Adam, one jitted step, Bernoulli likelihood plus the KL
term). Then samples are generated from the prior, in eval mode (running
statistics), for each requested class, and a logistic-regression classifier
fitted on the real training digits says which digit each sample shows:

- ``requested_class_accuracy``: how often the classifier reads the class that
  was asked for (10% is chance);
- ``zero_condition_accuracy``: the same with the condition vector set to zero
  (the decoder's plain batch norm: no class information), the control;
- ``real_test_accuracy``: the classifier on real held-out digits, its ceiling.

The picture (``results/conditional.png``) shows a grid: one row per requested
class, one column per latent sample shared across the rows, so each column is
one "style" and each row one condition, next to the zero-condition row.

Writes ``results/conditional.json`` and ``results/conditional.png``. ``--quick``
trains for a few hundred steps (for the tests).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import _common as common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnorm.linen as jnl

NAME = "conditional"
LATENT = 8
HIDDEN = 256
BATCH = 128
LR = 2e-3
STEPS = 4000
QUICK_STEPS = 300
SAMPLES_PER_CLASS = 100
GRID_COLUMNS = 8


def load_pixels(seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, ...]:
    """The digits as pixels in [0, 1] (the likelihood is Bernoulli), split as examples/_common.load_digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    n_test = int(round(len(x) * test_fraction))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(jnl.LayerNorm()(nn.Dense(HIDDEN)(x)))
        out = nn.Dense(2 * LATENT)(h)
        return out[:, :LATENT], out[:, LATENT:]


class Decoder(nn.Module):
    """The class enters only through the conditional batch norms' scale and shift."""

    @nn.compact
    def __call__(self, z: jax.Array, condition: jax.Array, *, train: bool) -> jax.Array:
        h = z
        for _ in range(2):
            h = nn.Dense(HIDDEN)(h)
            h = nn.relu(jnl.ConditionalBatchNorm(momentum=0.9)(h, condition, use_running_average=not train))
        return nn.Dense(64)(h)  # pixel logits


class CVAE(nn.Module):
    def setup(self) -> None:
        self.encoder = Encoder()
        self.decoder = Decoder()

    def __call__(self, x: jax.Array, condition: jax.Array, key: jax.Array, *, train: bool) -> tuple[jax.Array, ...]:
        mu, log_var = self.encoder(x)
        z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape)
        return self.decoder(z, condition, train=train), mu, log_var

    def generate(self, z: jax.Array, condition: jax.Array) -> jax.Array:
        return nn.sigmoid(self.decoder(z, condition, train=False))


def train(seed: int, steps: int, x_train: np.ndarray, y_train: np.ndarray, *, show_progress: bool) -> tuple[Any, list]:
    model = CVAE()
    key = jax.random.key(seed)
    key, init_key, noise_key = jax.random.split(key, 3)
    onehot = jax.nn.one_hot(y_train[:BATCH], 10)
    variables = model.init({"params": init_key}, x_train[:BATCH], onehot, noise_key, train=True)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(LR)
    opt_state = tx.init(params)

    def loss_fn(params, stats, x, c, key):
        (logits, mu, log_var), upd = model.apply(
            {"params": params, "batch_stats": stats}, x, c, key, train=True, mutable=["batch_stats"],
        )
        recon = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1)
        kl = 0.5 * jnp.sum(jnp.exp(log_var) + mu ** 2 - 1.0 - log_var, axis=-1)
        return jnp.mean(recon + kl), (upd["batch_stats"], jnp.mean(recon), jnp.mean(kl))

    @jax.jit
    def step(params, stats, opt_state, x, c, key):
        (loss, (stats, recon, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, c, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, recon, kl

    rng = np.random.default_rng(seed)
    history = []
    bar = common.progress(steps, "conditional VAE", disable=not show_progress)
    for i in range(steps):
        idx = rng.integers(0, len(x_train), BATCH)
        key, sub = jax.random.split(key)
        params, stats, opt_state, loss, recon, kl = step(
            params, stats, opt_state, x_train[idx], jax.nn.one_hot(y_train[idx], 10), sub,
        )
        if i % 100 == 0 or i == steps - 1:
            history.append({"step": i, "loss": float(loss), "recon": float(recon), "kl": float(kl)})
        bar.update(1)
    bar.close()
    return {"params": params, "batch_stats": stats}, history


def generate(variables: Any, z: np.ndarray, condition: np.ndarray) -> np.ndarray:
    model = CVAE()
    return np.asarray(jax.jit(lambda v, z, c: model.apply(v, z, c, method=CVAE.generate))(variables, z, condition))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.make_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    steps = QUICK_STEPS if args.quick else STEPS
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_pixels()

    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=3000).fit(x_train, y_train)
    real_accuracy = float(classifier.score(x_test, y_test))

    variables, history = train(args.seed, steps, x_train, y_train, show_progress=not args.no_progress)

    rng = np.random.default_rng(args.seed + 1)
    requested = np.repeat(np.arange(10), SAMPLES_PER_CLASS)
    z = rng.standard_normal((len(requested), LATENT)).astype(np.float32)
    samples = generate(variables, z, np.eye(10, dtype=np.float32)[requested])
    zero = generate(variables, z, np.zeros((len(requested), 10), np.float32))
    predicted = classifier.predict(samples)
    per_class = [float(np.mean(predicted[requested == c] == c)) for c in range(10)]
    result = {
        "steps": steps,
        "quick": bool(args.quick),
        "seed": args.seed,
        "latent": LATENT,
        "samples_per_class": SAMPLES_PER_CLASS,
        "real_test_accuracy": real_accuracy,
        "requested_class_accuracy": float(np.mean(predicted == requested)),
        "requested_class_accuracy_per_class": per_class,
        "zero_condition_accuracy": float(np.mean(classifier.predict(zero) == requested)),
        "chance": 0.1,
        "final_loss": history[-1]["loss"],
        "history": history,
    }

    # Grid: rows = requested class, columns = one latent sample shared by every row.
    grid_z = rng.standard_normal((GRID_COLUMNS, LATENT)).astype(np.float32)
    rows = [generate(variables, grid_z, np.tile(np.eye(10, dtype=np.float32)[c], (GRID_COLUMNS, 1))) for c in range(10)]
    rows.append(generate(variables, grid_z, np.zeros((GRID_COLUMNS, 10), np.float32)))
    result["runtime_s"] = time.perf_counter() - start
    plot(rows, result, args.out)
    path = common.write_json(args.out, NAME, result)
    print(
        f"requested class recognized in {result['requested_class_accuracy']:.1%} of generated digits "
        f"(zero condition: {result['zero_condition_accuracy']:.1%}; classifier on real test digits: "
        f"{real_accuracy:.1%}); wrote {path}"
    )
    return result


def plot(rows: list[np.ndarray], result: dict, out: Any) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), GRID_COLUMNS, figsize=(GRID_COLUMNS * 0.8, len(rows) * 0.85))
    for r, images in enumerate(rows):
        for c in range(GRID_COLUMNS):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r) if r < 10 else "zero", rotation=0, labelpad=14, fontsize=9)
    fig.suptitle(
        f"class only via ConditionalBatchNorm: requested digit recognized "
        f"{result['requested_class_accuracy']:.0%} (zero condition {result['zero_condition_accuracy']:.0%})\n"
        f"rows: requested class (last: zero condition); columns: one latent sample each",
        fontsize=8,
    )
    common.save_figure(fig, out, NAME)


if __name__ == "__main__":
    main()
