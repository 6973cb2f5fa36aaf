"""examples/learning_rates.py in --quick mode: batch norm trains at learning rates that break the plain net.

With a fixed seed, a 6-layer ReLU MLP without BN diverges at the largest rate
of the quick sweep, while the same network with ``jn.batch_norm`` (evaluated
with population statistics) stays stable there and still learns. A regression
in batch_norm's training or evaluation path shows up here.
"""

import json
import math

import numpy as np
import pytest
from examples_loader import load_example

learning_rates = load_example("learning_rates")

# One test runs the example once and checks everything: a module fixture would run once per
# pytest-xdist worker, and the example's compilation is most of its cost.
@pytest.mark.slow
def test_quick_run(tmp_path):
    result = learning_rates.main(["--quick", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    check_files(tmp_path)
    check_bn_stable_at_a_higher_learning_rate(result)
    check_bn_learns_where_the_plain_net_diverges(result)


def check_files(out):
    data = json.loads((out / "learning_rates.json").read_text())
    assert (out / "learning_rates.png").stat().st_size > 10_000
    lrs = data["learning_rates"]
    assert lrs == list(learning_rates.QUICK_LEARNING_RATES)
    for key in ("with_bn", "without_bn"):
        r = data[key]
        assert len(r["stable"]) == len(r["final_test_accuracy"]) == len(r["steps_to_best_without_bn"]) == len(lrs)
        assert all(len(curve) == len(data["steps"]) for curve in r["test_accuracy"])
        assert set(data["summary"][key]) >= {"largest_stable_lr", "steps_to_best_without_bn"}
    assert set(data["summary"]) >= {"best_without_bn_accuracy", "stable_lr_ratio", "speedup"}


def check_bn_stable_at_a_higher_learning_rate(result):
    s = result["summary"]
    assert s["with_bn"]["largest_stable_lr"] is not None
    assert s["without_bn"]["largest_stable_lr"] is not None
    assert s["with_bn"]["largest_stable_lr"] > s["without_bn"]["largest_stable_lr"]


def check_bn_learns_where_the_plain_net_diverges(result):
    top = len(result["learning_rates"]) - 1
    assert not result["without_bn"]["stable"][top]
    assert result["without_bn"]["final_test_accuracy"][top] < 0.2  # chance is 0.1
    assert result["with_bn"]["stable"][top]
    assert result["with_bn"]["final_test_accuracy"][top] > 0.3
    loss = np.asarray(result["with_bn"]["train_loss"])[top]
    assert np.all(np.isfinite(loss)) and loss[-1] < math.log(10)


def test_stable_rule():
    loss = np.array([
        [[2.0, 1.0], [2.1, 1.5]],          # both seeds end below ln 10
        [[2.0, 1.0], [2.0, np.nan]],       # one seed diverged
        [[2.0, 2.4], [2.0, 1.0]],          # one seed ends above ln 10
    ])
    assert learning_rates.stable(loss, 10).tolist() == [True, False, False]
