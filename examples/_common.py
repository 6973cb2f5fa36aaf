"""Helpers shared by the example scripts: data, command line, progress, results.

Every example is a script (``python examples/<name>.py``) with a ``main(argv)``
that tests can call in ``--quick`` mode. The pieces they share live here:

- :func:`make_parser`: an ``argparse`` parser with ``--quick``, ``--seed`` and
  ``--out`` (the results folder, ``results/`` by default).
- :func:`load_mnist1d` and :func:`load_digits`: data that is generated or ships
  inside a package, so nothing is downloaded at run time. Both return a
  :class:`Dataset` of float32 features standardized with the training set's
  per-feature mean and standard deviation, and int32 labels.
- :func:`progress`: a tqdm bar on stderr.
- :func:`write_json`, :func:`save_figure`: ``<out>/<name>.json`` and
  ``<out>/<name>.png`` (matplotlib's Agg backend, no display needed).
- :func:`format_table`: a plain-text table for the terminal.
- :func:`first_step_reaching`: the first evaluated step at which a curve
  reaches a target.

Importing this module puts the checkout's root first on ``sys.path``, so an
example always runs against the ``jaxnorm`` next to it, even when another copy
is installed in the environment.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


class Dataset(NamedTuple):
    """A train/test split: ``x_*`` are (N, D) float32, ``y_*`` are (N,) int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _standardized(name, x_train, y_train, x_test, y_test) -> Dataset:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6  # constant pixels in the digits would divide by 0
    def scale(x):
        return ((x - mean) / std).astype(np.float32)
    return Dataset(scale(x_train), y_train.astype(np.int32), scale(x_test), y_test.astype(np.int32), name)


@functools.lru_cache(maxsize=4)
def load_mnist1d(num_samples: int = 5000, *, seed: int = 42) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated on the spot: 40 features, 10 classes.

    Uses ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads).
    With the defaults this is the package's standard data set: 4000 training and
    1000 test examples, generated with seed 42 in about 2 s. The result is
    cached, so several runs in one process generate it once.

    Args:
      num_samples: training plus test examples (80% / 20%).
      seed: the generator's seed; 42 gives the standard data set.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)
    return _standardized("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"])


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 64 features, 10 classes).

    Args:
      test_fraction: share of the examples held out for testing.
      seed: seed of the shuffle that splits train from test.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    return _standardized("digits", x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def make_parser(description: str, *, seed: int = 0) -> argparse.ArgumentParser:
    """An argument parser with the options every example has.

    ``--quick`` (a few seconds, for tests), ``--seed`` (initialization and
    batch order; a run is deterministic given it) and ``--out`` (the folder for
    ``<name>.json`` and ``<name>.png``). Examples add their own options to it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few seconds' run, for tests")
    parser.add_argument("--seed", type=int, default=seed, help="seed of initialization and batches")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder for the .json and .png")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def progress(total: int, desc: str, *, disable: bool = False, unit: str = "step") -> tqdm:
    """A tqdm progress bar on stderr; call ``.update(n)`` after each compiled chunk."""
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False)


def _plain(value: Any) -> Any:
    """NumPy/JAX scalars and arrays to JSON-ready Python values (NaN/inf to None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(out_dir: Path, name: str, payload: dict) -> Path:
    """Writes ``payload`` to ``<out_dir>/<name>.json`` (arrays become lists) and returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_plain(payload), indent=1) + "\n")
    return path


def save_figure(fig, out_dir: Path, name: str, *, dpi: int = 120) -> Path:
    """Saves a matplotlib figure to ``<out_dir>/<name>.png``, closes it, returns the path."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned plain-text table; floats are shown with 3 decimals, None as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def first_step_reaching(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first of ``steps`` whose value is at least ``target``; None if none is."""
    for step, value in zip(steps, values):
        if value is not None and value >= target:
            return int(step)
    return None
