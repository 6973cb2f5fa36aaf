"""examples/conditional.py in --quick mode: the class, given only to the norms, steers the generated digits."""

import json

import pytest
from examples_loader import load_example

pytestmark = pytest.mark.slow


def test_quick_run(tmp_path):
    example = load_example("conditional")
    payload = example.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    on_disk = json.loads((tmp_path / "conditional.json").read_text())
    assert set(on_disk) >= {"requested_class_accuracy", "zero_condition_accuracy", "real_test_accuracy", "history"}
    assert (tmp_path / "conditional.png").stat().st_size > 10_000
    assert on_disk["real_test_accuracy"] > 0.9
    # the condition steers: the requested digit is recognized far above chance,
    # and far more often than with the condition switched off
    assert on_disk["requested_class_accuracy"] > 0.6
    assert on_disk["requested_class_accuracy"] > on_disk["zero_condition_accuracy"] + 0.3
    assert on_disk["history"][-1]["loss"] < on_disk["history"][0]["loss"]
    assert payload["steps"] == on_disk["steps"]
