"""Speed and accuracy of jaxnorm's Flax layers next to flax.linen's, in one process.

For batch norm (NHWC and NCHW), layer norm on transformer activations, group
norm and RMS norm, in float32 and bfloat16, times three jit-compiled steps of
``jaxnorm.linen``, ``flax.linen`` (default fields) and a naive ``jax.numpy``
version written from the textbook formulas:

- ``fwd``: the training forward (batch norm also updates its running statistics);
- ``fwd+bwd``: the loss ``sum(y * w)`` for a fixed random ``w`` and its gradients
  for ``x``, ``scale`` and ``bias`` (plus the new statistics for batch norm);
- ``eval``: batch norm with its running statistics.

The three implementations of a step run interleaved (one call each, round
robin) and each gets the median of its repeats, so load from other processes
hits all of them alike. For every step it prints the median time, the ratio to
flax, the effective bandwidth (bytes the step must at least read and write:
x and y forward, x, w and dx backward) next to a streaming bandwidth measured in
the same process (a jitted reduction of a 256 MiB array), the compile time (the
better of two fresh compilations), the
temporary memory XLA allocates for the compiled step
(``compiled.memory_analysis()``), and the largest difference of jaxnorm's and
flax's results to a float64 NumPy reference (forward) and to each other
(gradients, relative to their largest value). Results go to
``benchmarks/results.json``.

Run::

    python benchmarks/bench.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench.py --quick    # small shapes, 3 repeats: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout's jaxnorm, not whichever one the environment has installed.
sys.path.insert(0, os.path.dirname(HERE))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxnorm.linen as jnl  # noqa: E402

# --- the cases ---------------------------------------------------------------

def _bn(axis):
    return dict(flax=lambda: nn.BatchNorm(axis=axis), ours=lambda: jnl.BatchNorm(axis=axis), axis=axis, kind="bn")


CASES = {
    # name: (full shape, quick shape, layers)
    "BN NHWC": ((64, 32, 32, 128), (8, 8, 8, 32), _bn(-1)),
    "BN NCHW": ((64, 128, 32, 32), (8, 32, 8, 8), _bn(1)),
    "LN": ((8192, 1024), (256, 128), dict(
        flax=lambda: nn.LayerNorm(), ours=lambda: jnl.LayerNorm(), kind="ln")),
    "GN G=32": ((32, 32, 32, 256), (4, 8, 8, 64), dict(
        flax=lambda: nn.GroupNorm(num_groups=32), ours=lambda: jnl.GroupNorm(num_groups=32), kind="gn", groups=32)),
    "RMSNorm": ((8192, 1024), (256, 128), dict(
        flax=lambda: nn.RMSNorm(), ours=lambda: jnl.RMSNorm(), kind="rms")),
}
EPS = {"bn": 1e-5, "ln": 1e-6, "gn": 1e-6, "rms": 1e-6}


def _reduced_axes(kind: str, shape: tuple[int, ...], axis: int | None = None) -> tuple[int, ...]:
    if kind == "bn":
        keep = axis % len(shape)
        return tuple(a for a in range(len(shape)) if a != keep)
    return (len(shape) - 1,)


def naive(kind: str, shape: tuple[int, ...], axis: int | None, groups: int | None) -> Callable:
    """The textbook formulas in plain jax.numpy (autodiff backward), float32 statistics."""
    eps = EPS[kind]

    def f(x, scale, bias):
        xf = x.astype(jnp.float32)
        if kind == "gn":
            n, c = x.shape[0], x.shape[-1]
            xg = xf.reshape(n, -1, groups, c // groups)
            mean = xg.mean((1, 3), keepdims=True)
            var = ((xg - mean) ** 2).mean((1, 3), keepdims=True)
            y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
        else:
            axes = _reduced_axes(kind, x.shape, axis)
            if kind == "rms":
                y = xf / jnp.sqrt((xf * xf).mean(axes, keepdims=True) + eps)
            else:
                mean = xf.mean(axes, keepdims=True)
                var = ((xf - mean) ** 2).mean(axes, keepdims=True)
                y = (xf - mean) / jnp.sqrt(var + eps)
        pshape = [1] * x.ndim
        pshape[axis if kind == "bn" else -1] = scale.shape[0]
        y = y * scale.reshape(pshape)
        if bias is not None:
            y = y + bias.reshape(pshape)
        return y.astype(x.dtype)

    return f


def reference(kind: str, x: np.ndarray, axis: int | None, groups: int | None) -> np.ndarray:
    """float64 NumPy forward with unit scale and zero bias (what init gives)."""
    x = x.astype(np.float64)
    eps = EPS[kind]
    if kind == "gn":
        n, c = x.shape[0], x.shape[-1]
        xg = x.reshape(n, -1, groups, c // groups)
        mean = xg.mean((1, 3), keepdims=True)
        return ((xg - mean) / np.sqrt(xg.var((1, 3), keepdims=True) + eps)).reshape(x.shape)
    axes = _reduced_axes(kind, x.shape, axis)
    if kind == "rms":
        return x / np.sqrt((x * x).mean(axes, keepdims=True) + eps)
    mean = x.mean(axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axes, keepdims=True) + eps)


# --- steps ---------------------------------------------------------------------

def make_steps(kind: str, module: Any, variables: dict, bn: bool) -> dict[str, Callable]:
    """fwd / fwd+bwd / eval of a linen module (or of the naive function, module=None)."""
    stats = variables.get("batch_stats")

    def apply(p, x):
        if bn:
            y, upd = module.apply({"params": p, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])  # noqa: E501
            return y, upd["batch_stats"]
        return module.apply({"params": p}, x), None

    def loss(p, x, w):
        y, new = apply(p, x)
        return jnp.sum(y.astype(jnp.float32) * w), new

    steps = {
        "fwd": lambda p, x, w: apply(p, x),
        "fwd+bwd": lambda p, x, w: jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x, w),
    }
    if bn:
        steps["eval"] = lambda p, x, w: module.apply({"params": p, "batch_stats": stats}, x, use_running_average=True)
    return steps


def make_naive_steps(f: Callable, bn: bool) -> dict[str, Callable]:
    def loss(p, x, w):
        return jnp.sum(f(x, p["scale"], p.get("bias")).astype(jnp.float32) * w)

    steps = {
        "fwd": lambda p, x, w: f(x, p["scale"], p.get("bias")),
        "fwd+bwd": lambda p, x, w: jax.grad(loss, argnums=(0, 1))(p, x, w),
    }
    if bn:
        steps["eval"] = None
    return steps


def compile_step(fn: Callable, *args, tries: int = 2) -> tuple[Callable, float, int]:
    """Trace, lower and compile ``fn``; the fastest of ``tries`` fresh compilations (no cache hits)."""
    seconds = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
        seconds = min(seconds, time.perf_counter() - start)
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    return compiled, seconds, temp


def interleaved_median(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per call; one call of each per round, the order rotating from round to round."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        # Rotating the order: no implementation always runs right after the
        # same neighbour (whose freed output it may be handed) or first.
        for k in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(fns[k](*args))
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def streaming_bandwidth(quick: bool) -> float:
    """Bytes per second of a jitted full reduction of a large float32 array (reads only)."""
    n = (1 << 22) if quick else (1 << 26)  # 16 MiB or 256 MiB
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(x))
    t = interleaved_median({"sum": f}, (x,), 3 if quick else 10)["sum"]
    return n * 4 / t


def max_rel(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over every leaf of two pytrees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    worst = 0.0
    for u, v in zip(la, lb):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        worst = max(worst, float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30)))
    return worst


# --- the run -------------------------------------------------------------------


def run(quick: bool, repeats: int, only: list[str] | None, dtypes: list[str]) -> dict:
    bw = streaming_bandwidth(quick)  # also warms up tracing and compilation
    rows = []
    for name, (full, small, spec) in CASES.items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        shape = small if quick else full
        kind = spec["kind"]
        axis = spec.get("axis")
        groups = spec.get("groups")
        bn = kind == "bn"
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            key = jax.random.key(0)
            x = (jax.random.normal(key, shape, jnp.float32) * 2 + 1).astype(dtype)
            w = jax.random.normal(jax.random.key(1), shape, jnp.float32)
            impls: dict[str, dict[str, Callable]] = {}
            params = None
            for label in ("ours", "flax"):
                module = spec[label]()
                variables = module.init(jax.random.key(2), x, **({"use_running_average": False} if bn else {}))
                params = variables["params"]
                impls[label] = make_steps(kind, module, variables, bn)
            impls["naive"] = make_naive_steps(naive(kind, shape, axis, groups), bn)
            x_ref = reference(kind, np.asarray(x.astype(jnp.float32)), axis, groups)
            for mode in impls["ours"]:
                compiled, compile_s, temp = {}, {}, {}
                for label, steps in impls.items():
                    if steps.get(mode) is None:
                        continue
                    compiled[label], compile_s[label], temp[label] = compile_step(
                        steps[mode], params, x, w, tries=1 if quick else 2
                    )
                times = interleaved_median(compiled, (params, x, w), repeats)
                outs = {k: f(params, x, w) for k, f in compiled.items()}
                itemsize = dtype.itemsize
                nbytes = x.size * itemsize * 2 if mode != "fwd+bwd" else x.size * (itemsize * 2 + 4)
                row = dict(
                    case=name,
                    shape=list(shape),
                    dtype=dtype_name,
                    mode=mode,
                    ms={k: v * 1e3 for k, v in times.items()},
                    ratio_to_flax={k: times[k] / times["flax"] for k in times},
                    gb_s={k: nbytes / v / 1e9 for k, v in times.items()},
                    fraction_of_streaming={k: nbytes / v / bw for k, v in times.items()},
                    compile_s=compile_s,
                    temp_bytes=temp,
                )
                if mode == "fwd+bwd":
                    row["grad_rel_diff_ours_vs_flax"] = max_rel(outs["ours"][0], outs["flax"][0])
                else:
                    y = {k: (o[0] if isinstance(o, tuple) else o) for k, o in outs.items()}
                    if mode == "fwd":
                        row["max_abs_diff_to_f64"] = {
                            k: float(np.max(np.abs(np.asarray(v, np.float64) - x_ref))) for k, v in y.items()
                        }
                    row["max_abs_diff_ours_vs_flax"] = float(
                        np.max(np.abs(np.asarray(y["ours"], np.float64) - np.asarray(y["flax"], np.float64)))
                    )
                rows.append(row)
                print_row(row)
    return dict(
        machine=machine(),
        streaming_gb_s=bw / 1e9,
        quick=quick,
        repeats=repeats,
        malloc_env=malloc_env(),
        versions={"jax": jax.__version__, "flax": _flax_version(), "backend": jax.default_backend()},
        rows=rows,
    )


def _flax_version() -> str:
    import flax

    return flax.__version__


def malloc_env() -> dict[str, str]:
    """glibc malloc settings from the environment (they decide whether large outputs are fresh pages)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {os.cpu_count()} cores, {jax.default_backend()}"


HEADER = (
    f"| {'case':<8} | {'dtype':<8} | {'step':<7} | {'jaxnorm ms':>10} | {'flax ms':>8} | {'naive ms':>8} "
    f"| {'ratio':>5} | {'GB/s':>5} | {'stream %':>8} | {'compile s (ours/flax)':>21} "
    f"| {'temp MiB (ours/flax)':>20} | {'diff':>8} |"
)


def print_row(row: dict) -> None:
    ms, c, t = row["ms"], row["compile_s"], row["temp_bytes"]
    diff = row.get("grad_rel_diff_ours_vs_flax", row.get("max_abs_diff_ours_vs_flax"))
    naive_ms = f"{ms['naive']:8.2f}" if "naive" in ms else f"{'-':>8}"
    print(
        f"| {row['case']:<8} | {row['dtype']:<8} | {row['mode']:<7} | {ms['ours']:10.2f} | {ms['flax']:8.2f} "
        f"| {naive_ms} | {row['ratio_to_flax']['ours']:5.2f} | {row['gb_s']['ours']:5.1f} "
        f"| {100 * row['fraction_of_streaming']['ours']:7.0f}% | {c['ours']:9.2f} / {c['flax']:9.2f} "
        f"| {t['ours'] / 2**20:8.1f} / {t['flax'] / 2**20:9.1f} | {diff:8.1e} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per step (default 15, quick 3)")
    parser.add_argument("--only", nargs="*", help="case names to run (substring match), e.g. LN 'BN NHWC'")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    print(f"jax {jax.__version__}, jaxnorm from {os.path.dirname(jnl.__file__)}, on {machine()}")
    print(f"glibc malloc settings: {malloc_env() or 'defaults'}")
    print(HEADER)
    print("|" + "|".join("-" * (len(cell)) for cell in HEADER.split("|")[1:-1]) + "|")
    result = run(args.quick, repeats, args.only, args.dtypes)
    print(f"streaming read bandwidth (jitted sum of 256 MiB): {result['streaming_gb_s']:.1f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
