"""examples/recurrent.py in --quick mode: files, schema, and what holds after a few steps.

Per-step and shared batch-norm statistics train identically (training
normalizes each step with its batch statistics either way), so their training
losses and batch-statistics accuracies agree; every cell learns something.
"""

import json

import numpy as np
import pytest
from examples_loader import load_example

recurrent = load_example("recurrent")

pytestmark = pytest.mark.slow

VARIANTS = ("lstm", "ln_lstm", "bn_lstm", "bn_lstm_shared")


def test_quick_run(tmp_path):
    result = recurrent.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "recurrent.json").read_text())
    assert (tmp_path / "recurrent.png").stat().st_size > 10_000
    table = (tmp_path / "recurrent.md").read_text()
    assert data["steps"] == [50, 100, 150, 200]
    for v in VARIANTS:
        assert len(data[v]["test_accuracy"]) == len(data["steps"])
        assert len(data[v]["train_loss"]) == len(data["steps"])
        assert f"`{v}`" in table
        assert data[v]["final_test_accuracy"] > 0.15, (v, data[v]["final_test_accuracy"])  # chance is 0.1
        assert data[v]["train_loss"][-1] < data[v]["train_loss"][0]
    for v in ("bn_lstm", "bn_lstm_shared"):
        assert len(data[v]["test_accuracy_batch_stats"]) == len(data["steps"])
    # the same computation in training: only the stored statistics differ
    np.testing.assert_allclose(data["bn_lstm"]["train_loss"], data["bn_lstm_shared"]["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(data["bn_lstm"]["test_accuracy_batch_stats"],
                               data["bn_lstm_shared"]["test_accuracy_batch_stats"], atol=2e-3)
    assert set(result["summary"]["steps_to_target"]) == set(VARIANTS)
