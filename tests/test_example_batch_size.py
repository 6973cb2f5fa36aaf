"""examples/batch_size.py in --quick mode: batch norm degrades at batch 2, group and layer norm do not."""

import json

import pytest
from examples_loader import load_example


@pytest.mark.slow
def test_quick_run(tmp_path):
    # One test, not several sharing a fixture: under pytest-xdist each worker would rerun it.
    batch_size = load_example("batch_size")
    payload = batch_size.main(["--quick", "--methods", "bn,gn,ln", "--seeds", "2", "--seed", "0",
                               "--out", str(tmp_path), "--no-progress"])

    assert (tmp_path / "batch_size.png").stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "batch_size.json").read_text())
    assert on_disk["batch_sizes"] == [32, 2] == payload["batch_sizes"]
    assert set(on_disk) >= {"batch_sizes", "methods", "paper", "config", "runtime_s"}
    assert set(on_disk["methods"]) == {"bn", "bn_precise", "gn", "ln"}
    for result in on_disk["methods"].values():
        assert set(result) >= {"label", "test_error", "test_error_mean", "test_error_std"}
        assert len(result["test_error"]) == 2 and all(len(seeds) == 2 for seeds in result["test_error"])
    assert on_disk["paper"]["bn"] == [23.6, 23.7, 24.8, 27.3, 34.7]
    assert on_disk["paper"]["gn"] == [24.1, 24.2, 24.0, 24.2, 24.1]

    methods = on_disk["methods"]
    bn_32, bn_2 = methods["bn"]["test_error_mean"]
    # batch norm trains well at 32 and collapses at 2 (two values per feature)
    assert bn_32 < 10 and bn_2 > bn_32 + 15
    for per_example in ("gn", "ln"):
        err_32, err_2 = methods[per_example]["test_error_mean"]
        assert err_2 < bn_2 - 15, per_example  # far below batch norm at batch 2
        assert err_2 < err_32 + 3, per_example  # and about flat in the batch size
