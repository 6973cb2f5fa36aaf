"""Inference time of a small CNN with its batch norms, and with them folded into the convolutions.

The model is a linen CNN: three 3x3 convolutions (no bias), each followed by a
``jaxnorm.linen.BatchNorm`` and ReLU, a global average pool and a Dense
head. ``jaxnorm.linen.batch_norm_pairs`` finds the (Conv, BatchNorm) pairs,
``jaxnorm.linen.fold_batch_norms`` folds them, and the same architecture built
with ``use_bn=False`` (convolutions with a bias, no batch norm) runs the folded
variables. Both forward passes are jit-compiled; they are timed in turns
(round-robin, so load changes hit both alike) and the median of the repeats
is reported, with the largest difference between the two outputs.

Run::

    python benchmarks/folding.py                      # batch 32, 32x32x3, widths 32 64 64
    python benchmarks/folding.py --batch 128 --repeats 100

Writes ``results/folding.json`` (``--out`` elsewhere): a run never touches the
committed ``benchmarks/folding.json``, which ``make bench-folding`` regenerates
(``--out benchmarks/folding.json``) for the inference guide's table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm.linen as jnl


class CNN(nn.Module):
    widths: tuple[int, ...] = (32, 64, 64)
    use_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, use_bias=not self.use_bn)(x)
            if self.use_bn:
                x = jnl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def median_ms(fns: dict, args: dict, repeats: int) -> dict:
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--train-steps", type=int, default=5, help="steps that move the running statistics")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "results" / "folding.json"))
    args = parser.parse_args()

    widths = tuple(args.widths)
    model, folded_model = CNN(widths), CNN(widths, use_bn=False)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3)) * 2 + 0.5
    variables = jax.jit(model.init)(jax.random.key(1), x)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1])
    for i in range(args.train_steps):
        variables = {**variables, **train(variables, x * (1 + 0.1 * i))}

    fold_ms = []
    for _ in range(2):  # the first call also compiles the eager ops it runs
        start = time.perf_counter()
        pairs = jnl.batch_norm_pairs(model, variables, x)
        folded = jax.block_until_ready(jnl.fold_batch_norms(variables, pairs))
        fold_ms.append(1e3 * (time.perf_counter() - start))

    fns = {"with batch norm": jax.jit(model.apply), "folded": jax.jit(folded_model.apply)}
    inputs = {"with batch norm": (variables, x), "folded": (folded, x)}
    diff = float(jnp.max(jnp.abs(fns["folded"](folded, x) - fns["with batch norm"](variables, x))))
    ms = median_ms(fns, inputs, args.repeats)
    speedup = ms["with batch norm"] / ms["folded"]

    print(f"device: {jax.devices()[0].device_kind}, input {tuple(x.shape)}, widths {widths}, "
          f"{len(pairs)} batch norms found and folded in {fold_ms[1]:.1f} ms ({fold_ms[0]:.0f} ms the first time)")
    for name, t in ms.items():
        print(f"  {name:16s} {t:8.3f} ms (median of {args.repeats})")
    print(f"  speed-up {speedup:.2f}x, max |difference| of the outputs {diff:.1e}")
    result = {
        "device": jax.devices()[0].device_kind,
        "input_shape": list(x.shape),
        "widths": list(widths),
        "repeats": args.repeats,
        "batch_norms_folded": len(pairs),
        "ms_to_fold": fold_ms[1],
        "ms_with_batch_norm": ms["with batch norm"],
        "ms_folded": ms["folded"],
        "speedup": speedup,
        "max_abs_output_difference": diff,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
