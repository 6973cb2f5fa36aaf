"""examples/weight_norms.py in --quick mode: the run completes and its claims hold.

Spectral norm keeps every layer's largest singular value near 1 (the plain
MLP's are larger), and the micro-batch CNNs learn; the script writes its JSON,
figure and Markdown table.
"""

import json

import pytest
from examples_loader import load_example

weight_norms = load_example("weight_norms")

pytestmark = pytest.mark.slow


def test_quick_run(tmp_path):
    table = tmp_path / "table.md"
    result = weight_norms.main(["--quick", "--out", str(tmp_path), "--no-progress", "--table", str(table)])
    data = json.loads((tmp_path / "weight_norms.json").read_text())
    assert (tmp_path / "weight_norms.png").stat().st_size > 10_000
    assert table.read_text() == (tmp_path / "weight_norms.md").read_text()
    assert "| group norm + weight standardization |" in table.read_text()
    assert sorted(data["cnn"]) == sorted(weight_norms.CNN_METHODS)
    for accs in result["cnn"].values():
        assert all(0.0 <= a <= 1.0 for a in accs)
    assert max(a for accs in result["cnn"].values() for a in accs) > 0.2  # above chance (0.1)
    plain, spectral = result["mlp"]["plain"], result["mlp"]["spectral"]
    assert all(s < 1.5 for s in spectral["layer_sigmas"]), spectral["layer_sigmas"]
    assert spectral["lipschitz_bound"] < plain["lipschitz_bound"] / 2
    assert spectral["test_accuracy"] > 0.5 and plain["test_accuracy"] > 0.5
    # the stored sigma tracks the raw kernel's largest singular value
    for stored, raw in zip(spectral["stored_sigmas"], spectral["raw_kernel_sigmas"], strict=True):
        assert abs(stored - raw) / raw < 0.2
