"""What the small-batch remedies cost per training step, next to plain batch norm.

Times a jit-compiled forward + backward (gradient w.r.t. x, scale and bias,
plus the new running statistics) of ``jn.batch_norm``, ``jn.batch_renorm``
(traced limits from ``jn.renorm_schedule``) and ``jn.batch_norm`` with ghost
batches, on an NHWC activation, and one ``jn.recalibrate`` pass. Prints the
median time of each and its ratio to batch norm.

Run::

    python benchmarks/small_batches.py                  # (64, 16, 16, 64), 50 repeats
    python benchmarks/small_batches.py --shape 256 32 32 64 --repeats 20
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn


def median_seconds(fns: dict, *args, repeats: int) -> dict:
    """Median wall time of each function; round-robin so that load changes hit all alike."""
    for f in fns.values():
        jax.block_until_ready(f(*args))  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(64, 16, 16, 64), metavar=("N", "H", "W", "C"))
    parser.add_argument("--ghost", type=int, default=8, help="ghost batch size")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    shape = tuple(args.shape)
    c = shape[-1]
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 1
    w = jax.random.normal(jax.random.key(1), shape)
    scale, bias = jnp.ones(c), jnp.zeros(c)
    stats = jn.BatchStats(jnp.full(c, 0.5), jnp.full(c, 4.0), jnp.asarray(10, jnp.int32))

    def step(norm):
        def loss(x, scale, bias, stats, t):
            y, new = norm(x, stats, scale, bias, t)
            return jnp.sum(w * y), new

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def renorm(x, stats, scale, bias, t):
        r_max, d_max = jn.renorm_schedule(t)
        return jn.batch_renorm(x, stats, scale, bias, training=True, r_max=r_max, d_max=d_max)

    variants = {
        "batch_norm": lambda x, s, g, b, t: jn.batch_norm(x, s, g, b, training=True),
        "batch_renorm": renorm,
        f"batch_norm ghost_batch_size={args.ghost}": lambda x, s, g, b, t: jn.batch_norm(
            x, s, g, b, training=True, ghost_batch_size=args.ghost
        ),
    }
    t = jnp.asarray(30_000)
    rows = median_seconds(
        {name: step(f) for name, f in variants.items()}, x, scale, bias, stats, t, repeats=args.repeats
    )

    batches = [x + i for i in range(10)]
    update = lambda s, b: jn.batch_norm(b, s, scale, bias, training=True)[1]  # noqa: E731
    start = time.perf_counter()
    jax.block_until_ready(jn.recalibrate(update, stats, batches))
    recal = time.perf_counter() - start

    base = rows["batch_norm"]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, x of shape {shape}, forward + backward, median of {args.repeats}"  # noqa: E501
    )
    for name, seconds in rows.items():
        print(f"  {name:32s} {seconds * 1e3:8.3f} ms   x{seconds / base:.2f}")
    print(f"  recalibrate, 10 batches (compile included) {recal * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
