"""Small helpers shared by examples/batch_size.py and examples/flax_cnn.py.

The data is scikit-learn's bundled 8x8 digits (1797 images, no download):
pixels scaled to [0, 1] as NHWC float32, split once into train and test with a
fixed generator so that every run and every seed sees the same split.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Running an example as a script puts examples/ on sys.path, not the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

N_TEST = 497  # 1797 digits: 1300 for training, 497 for testing


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): x (N, 8, 8, 1) float32 in [0, 1], y (N,) int32."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:N_TEST], order[N_TEST:]
    return x[train], y[train], x[test], y[test]


def results_dir(path: str | os.PathLike[str] | None) -> Path:
    """The output folder (default ``results/`` at the repository root), created if missing."""
    out = Path(path) if path is not None else _ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
