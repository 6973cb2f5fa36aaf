"""examples/data_parallel.py in --quick mode: synchronized batch norm trains like one device.

The quick run also trains ``synced`` as 2 local processes of 4 devices each
(``--processes 2``, jax.distributed over localhost) and checks that it trains
like one device too.
"""

import json

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_synced_matches_single_device_and_per_device_does_not(tmp_path):
    example = load_example("data_parallel")
    result = example.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--processes", "2", "--no-progress"])
    final = result["final"]
    processes = final["synced, 2 processes"]
    assert processes["max_loss_diff_vs_single"] < 1e-4, processes
    assert abs(processes["test_loss"] - final["single"]["test_loss"]) < 1e-3
    assert result["config"]["processes"] == 2
    synced = final["synced"]["max_loss_diff_vs_single"]
    per_device = final["per-device"]["max_loss_diff_vs_single"]
    assert synced < 1e-4, synced
    assert per_device > 1e-2 and per_device > 100 * synced, (synced, per_device)
    assert abs(final["synced"]["test_loss"] - final["single"]["test_loss"]) < 1e-3
    saved = json.loads((tmp_path / "data_parallel.json").read_text())
    assert saved["final"] == final and len(saved["curves"]["synced"]) == saved["config"]["steps"]
    assert (tmp_path / "data_parallel.png").stat().st_size > 10_000


def test_processes_must_divide_the_devices(capsys):
    example = load_example("data_parallel")
    with pytest.raises(SystemExit):
        example.main(["--quick", "--processes", "3"])
    assert "`--processes`=3 must divide the 8 devices" in capsys.readouterr().err
