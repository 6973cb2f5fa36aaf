"""examples/data_parallel.py in --quick mode: synchronized batch norm trains like one device."""

import json

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_synced_matches_single_device_and_per_device_does_not(tmp_path):
    example = load_example("data_parallel")
    result = example.main(["--quick", "--seed", "0", "--out", str(tmp_path)])
    final = result["final"]
    synced = final["synced"]["max_loss_diff_vs_single"]
    per_device = final["per-device"]["max_loss_diff_vs_single"]
    assert synced < 1e-4, synced
    assert per_device > 1e-2 and per_device > 100 * synced, (synced, per_device)
    assert abs(final["synced"]["test_loss"] - final["single"]["test_loss"]) < 1e-3
    saved = json.loads((tmp_path / "data_parallel.json").read_text())
    assert saved["final"] == final and len(saved["curves"]["synced"]) == saved["config"]["steps"]
    assert (tmp_path / "data_parallel.png").stat().st_size > 10_000
