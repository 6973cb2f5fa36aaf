"""examples/flax_cnn.py in --quick mode: trains, evaluates, restores identically, folds exactly."""

import json

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_quick_run(tmp_path):
    flax_cnn = load_example("flax_cnn")
    payload = flax_cnn.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    on_disk = json.loads((tmp_path / "flax_cnn.json").read_text())
    assert set(on_disk) >= {"linen", "nnx", "restore", "fold", "epochs", "runtime_s"}
    assert (tmp_path / "flax_cnn.png").stat().st_size > 10_000
    assert (tmp_path / "flax_cnn.msgpack").stat().st_size > 1_000
    assert on_disk["linen"]["test_accuracy"] > 0.9
    assert on_disk["nnx"]["test_accuracy"] > 0.9
    assert len(on_disk["linen"]["curve_test_accuracy"]) == payload["epochs"]
    assert on_disk["restore"]["identical"] and on_disk["restore"]["max_abs_diff"] == 0.0
    assert on_disk["fold"]["max_abs_diff"] < 1e-4 * max(1.0, on_disk["fold"]["max_abs_logit"])
