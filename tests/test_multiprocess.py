"""Synchronized batch norm across real ``jax.distributed`` processes on one machine.

One launch of ``tests/multiprocess_worker.py`` as 2 processes x 4 host CPU
devices (8 global devices, gloo collectives over localhost) runs every case;
each process writes its results, and this file compares them with a float64
NumPy reference of the whole global batch computed in one process:

- outputs, new running statistics and gradients of ``jaxnorm.batch_norm``
  under ``shard_map`` with ``axis_name`` and under sharded ``jit`` without it,
  unmasked and with a mask leaving 15 valid rows on process 0 and 3 on
  process 1 (NaN in the padding);
- one SGD step of a Dense + ``jaxnorm.linen.BatchNorm`` model and of its
  ``jaxnorm.nnx`` twin (new parameters, gradients, statistics);
- a NaN in process 1's batch leaves every process's statistics unchanged;
- the statistics checkpointed from process 0 and restored everywhere;
- every replicated result is bit-identical on every device of every process.

Run as a script (``python tests/test_multiprocess.py``) it prints the measured
agreement with the reference.
"""

from __future__ import annotations

import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(TESTS))

import _multiprocess  # noqa: E402
import multiprocess_worker as worker  # noqa: E402

PROCESSES, LOCAL_DEVICES = 2, 4
EPS = 1e-5
WORKER = TESTS / "multiprocess_worker.py"
GUIDE = ROOT / "docs" / "guides" / "multi_process.md"


# ---------------------------------------------------------------- float64 reference


def bn_reference(x, dy, scale, bias, valid):
    """Algorithm 1 over the valid rows of (N, F) x and its backward for the upstream gradient dy.

    Returns y (0 on invalid rows), dx (0 there), dscale, dbias and the running
    mean and unbiased variance after one step from (0, 1).
    """
    x, dy, scale, bias = (np.asarray(a, np.float64) for a in (x, dy, scale, bias))
    v = np.asarray(valid, bool).reshape(-1)
    n = v.sum()
    mean, var = x[v].mean(0), x[v].var(0)
    inv = 1 / np.sqrt(var + EPS)
    x_hat = np.where(v[:, None], (x - mean) * inv, 0.0)
    dy = np.where(v[:, None], dy, 0.0)
    g = dy * scale
    dx = np.where(v[:, None], inv * (g - (g.sum(0) + x_hat * (g * x_hat).sum(0)) / n), 0.0)
    return dict(y=np.where(v[:, None], x_hat * scale + bias, 0.0), dx=dx, dscale=(dy * x_hat).sum(0),
                dbias=dy.sum(0), mean=(1 - worker.MOMENTUM) * mean,
                var=worker.MOMENTUM + (1 - worker.MOMENTUM) * var * n / (n - 1))


def model_reference(d, valid):
    """The Dense(no bias) + BatchNorm model's step in float64: grads, new params, new statistics."""
    x = np.where(valid, np.asarray(d["x_big_padded"], np.float64), 0.0)  # padded rows reach nothing
    h = x @ d["kernel"].astype(np.float64)
    r = bn_reference(h, d["w_model"], d["model_scale"], d["model_bias"], valid)
    grads = {"dense/kernel": x.T @ r["dx"], "bn/scale": r["dscale"], "bn/bias": r["dbias"]}
    params = {"dense/kernel": d["kernel"], "bn/scale": d["model_scale"], "bn/bias": d["model_bias"]}
    new = {k: params[k] - worker.LR * grads[k] for k in params}
    return grads, new, {"mean": r["mean"], "var": r["var"]}


# ---------------------------------------------------------------- the launch


def launch(out: Path) -> tuple[list[dict], float]:
    seconds = _multiprocess.launch(WORKER, [str(out)], num_processes=PROCESSES, local_devices=LOCAL_DEVICES,
                                   log_dir=out, timeout=300)
    results = []
    for i in range(PROCESSES):
        with np.load(out / f"process_{i}.npz") as f:
            results.append(dict(f))
    return results, seconds


def comparisons(results: list[dict]) -> list[tuple[str, np.ndarray, np.ndarray, float, float]]:
    """(name, got, want, atol, rtol) of every checked quantity, from process 0's results."""
    r = results[0]
    d = worker.problem()
    ones = np.ones((worker.N, 1), bool)
    out = []
    for mode in ("shard_map", "sharded_jit"):
        for suffix, x, valid in (("", d["x"], ones), ("_masked", d["x_nan_padded"], d["valid"])):
            name = mode + suffix
            want = bn_reference(np.where(valid, x, 0.0), d["w"], d["scale"], d["bias"], valid)
            got_y = np.where(valid, r[f"{name}/y"], 0.0)
            out += [(f"{name}: y", got_y, want["y"], 2e-5, 1e-4),
                    (f"{name}: dx", r[f"{name}/dx"], want["dx"], 2e-5, 1e-4),
                    (f"{name}: dscale", r[f"{name}/dscale"], want["dscale"], 2e-5, 1e-4),
                    (f"{name}: dbias", r[f"{name}/dbias"], want["dbias"], 2e-5, 1e-4),
                    (f"{name}: running mean", r[f"{name}/stats/mean"], want["mean"], 1e-6, 1e-5),
                    (f"{name}: running var", r[f"{name}/stats/var"], want["var"], 1e-5, 1e-5)]
    grads, params, stats = model_reference(d, d["valid"])
    for lib, p, g, s in (("linen", "linen/params/{}", "linen/grads/{}", "linen/batch_stats/bn/{}"),
                         ("nnx", "nnx/params/{}/value", "nnx/grads/{}/value", "nnx/stats/bn/{}/value")):
        for k in grads:
            out.append((f"{lib}: grad {k}", r[g.format(k)], grads[k], 2e-5, 1e-4))
            out.append((f"{lib}: new {k}", r[p.format(k)], params[k], 2e-6, 1e-5))
        for k in stats:
            out.append((f"{lib}: running {k}", r[s.format(k)], stats[k], 1e-5, 1e-5))
    return out


def max_errors(got, want):
    err = np.abs(np.asarray(got, np.float64) - want)
    return float(err.max()), float((err / np.maximum(np.abs(want), 1e-3)).max())


def check_results(results: list[dict]) -> None:
    """Every assertion of the test, on the results of every process."""
    for r in results:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (PROCESSES, 8, LOCAL_DEVICES)
    first = results[0]
    for i, r in enumerate(results):
        assert set(r) == set(first), i
        for k, v in r.items():
            if k.startswith("timing/"):
                continue
            # every process gathered the same global values, bit for bit
            np.testing.assert_array_equal(v, first[k], err_msg=f"process {i}: {k}")
            if k.endswith("@replicas"):  # replicated: every device holds the same copy
                np.testing.assert_array_equal(v, np.broadcast_to(v[0], v.shape), err_msg=f"process {i}: {k}")
                np.testing.assert_array_equal(v[0], r[k[: -len("@replicas")]], err_msg=k)
    for name, got, want, atol, rtol in comparisons(results):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=rtol, err_msg=name)
    stats_keys = [k for k in first if re.search(r"/(mean|var|count)(/value)?$", k)]
    assert len(stats_keys) == 3 * 15, stats_keys
    for k in stats_keys:  # statistics are replicated in every mode, sharded jit included
        assert k + "@replicas" in first, k
        if k.endswith(("/count", "/count/value")):
            assert first[k] == 1, (k, first[k])
    # a NaN in one process's batch: no statistic moves on any device of any process
    nan_keys = [k for k in first if k.startswith("nan_") and "/after/" in k and not k.endswith("@replicas")]
    assert len(nan_keys) == 4 * 3, nan_keys
    for k in nan_keys:
        np.testing.assert_array_equal(first[k], first[k.replace("/after/", "/before/")], err_msg=k)
        assert np.all(np.isfinite(first[k])), k
    # the checkpoint written by process 0 holds the statistics, restored on every device
    for k in ("mean", "var", "count"):
        np.testing.assert_array_equal(first[f"checkpoint/bn/{k}"], first[f"linen/batch_stats/bn/{k}"])


def test_two_processes_match_the_float64_reference(tmp_path):
    results, seconds = launch(tmp_path)
    check_results(results)
    assert (tmp_path / "batch_stats.msgpack").stat().st_size > 0
    print(f"\n2 processes x 4 devices: {seconds:.1f} s")


# ---------------------------------------------------------------- the guide's code is the code that ran


def guide_blocks(text: str) -> list[str]:
    return [textwrap.dedent(b).strip() for b in re.findall(r"```\{code-block\} python\n(.*?)```", text, re.S)]


def source_blocks(path: Path) -> list[str]:
    found = re.findall(r"^[ \t]*# \[guide\]\n(.*?)^[ \t]*# \[/guide\]\n", path.read_text(), re.S | re.M)
    return [textwrap.dedent(b).strip() for b in found]


def test_the_guide_quotes_exactly_the_code_the_processes_run():
    quoted = guide_blocks(GUIDE.read_text())
    ran = source_blocks(WORKER) + source_blocks(ROOT / "examples" / "_multiprocess.py")
    assert len(ran) == 7, len(ran)
    assert sorted(quoted) == sorted(ran), "docs/guides/multi_process.md must quote every # [guide] block verbatim"


# ---------------------------------------------------------------- the launcher never hangs


def _script(tmp_path, body):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_launcher_kills_every_process_when_one_fails(tmp_path):
    script = _script(tmp_path, """
        import os, time
        if os.environ["JAXNORM_PROCESS_ID"] == "1":
            raise SystemExit("process 1 fails")
        time.sleep(120)
    """)
    start = time.monotonic()
    with pytest.raises(_multiprocess.LaunchError, match=r"process 1 exited with code 1(.|\n)*process 1 fails"):
        _multiprocess.launch(script, num_processes=2, local_devices=1, log_dir=tmp_path, timeout=60)
    assert time.monotonic() - start < 30


def test_launcher_kills_every_process_at_its_deadline(tmp_path):
    script = _script(tmp_path, """
        import time
        print("waiting", flush=True)
        time.sleep(120)
    """)
    start = time.monotonic()
    with pytest.raises(_multiprocess.LaunchError, match=r"passed its 3 s deadline(.|\n)*waiting"):
        _multiprocess.launch(script, num_processes=2, local_devices=1, log_dir=tmp_path, timeout=3)
    assert time.monotonic() - start < 20


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        results, seconds = launch(Path(tmp))
    print(f"{PROCESSES} processes x {LOCAL_DEVICES} devices, {seconds:.1f} s; max |got - float64 reference|:")
    for name, got, want, _, _ in comparisons(results):
        print(f"  {name:<34s} abs {max_errors(got, want)[0]:.1e}  rel {max_errors(got, want)[1]:.1e}")
    check_results(results)
    print("all checks passed")
