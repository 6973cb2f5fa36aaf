"""examples/figure1.py in --quick mode: the claims of Ioffe & Szegedy's Figure 1 hold.

With fixed seeds, after 1000 SGD steps the sigmoid MLP with batch norm is well
ahead of the plain one on the test set (evaluated with population statistics),
and the inputs to its last hidden layer's sigmoids have drifted less. A
regression in batch_norm's training or evaluation path shows up here.
"""

import json

import pytest
from examples_loader import load_example

figure1 = load_example("figure1")

pytestmark = pytest.mark.slow


# One test runs the example once and checks everything: a module fixture would run once per
# pytest-xdist worker, and the example's compilation is most of its cost.
def test_quick_run(tmp_path):
    result = figure1.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    check_files(tmp_path)
    check_bn_ahead_at_last_step(result)
    check_bn_sigmoid_inputs_drift_less(result)
    check_deterministic_under_seed()


def check_files(out):
    data = json.loads((out / "figure1.json").read_text())
    assert (out / "figure1.png").stat().st_size > 10_000
    assert data["steps"] == list(range(100, 1001, 100))
    for key in ("with_bn", "without_bn"):
        assert len(data[key]["test_accuracy"]) == len(data["steps"])
        series = data[key]["sigmoid_input_percentiles"]
        assert sorted(series) == ["p15", "p50", "p85"]
        for values in series.values():
            assert len(values) == len(data["steps"])
        # percentiles are ordered at every evaluation
        assert all(a <= b <= c for a, b, c in zip(series["p15"], series["p50"], series["p85"]))
    assert set(data["summary"]) >= {"best_without_bn", "steps_with_bn_to_best_without_bn"}


def check_bn_ahead_at_last_step(result):
    with_bn = result["with_bn"]["test_accuracy"][-1]
    without_bn = result["without_bn"]["test_accuracy"][-1]
    assert with_bn > without_bn + 0.08, (with_bn, without_bn)
    assert with_bn > 0.35  # well above chance (0.1): BN's eval mode uses sensible population statistics
    steps = result["summary"]["steps_with_bn_to_best_without_bn"]
    assert steps is not None and steps < result["steps"][-1]


def check_bn_sigmoid_inputs_drift_less(result):
    with_bn = result["with_bn"]["median_drift_mean_over_units"]
    without_bn = result["without_bn"]["median_drift_mean_over_units"]
    assert with_bn < 0.6 * without_bn, (with_bn, without_bn)


def check_deterministic_under_seed():
    # same (lr, momentum, eval_every) as --quick: reuses its compiled program
    a = figure1.run(steps=200, eval_every=100, lr=0.5, momentum=0.99, seed=3, progress=False)
    b = figure1.run(steps=200, eval_every=100, lr=0.5, momentum=0.99, seed=3, progress=False)
    assert a["with_bn"]["test_accuracy"] == b["with_bn"]["test_accuracy"]
    assert a["without_bn"]["sigmoid_input_percentiles"] == b["without_bn"]["sigmoid_input_percentiles"]
