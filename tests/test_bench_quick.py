"""benchmarks/bench.py --quick runs and writes its results (no timing assertions)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_mode_runs_and_writes_results(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "benchmarks", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    bench.main(["--quick", "--only", "LN", "--dtypes", "float32", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["case"], r["mode"]) for r in rows} == {("LN", "fwd"), ("LN", "fwd+bwd")}
    for r in rows:
        assert set(r["ms"]) >= {"ours", "flax"} and r["ms"]["ours"] > 0
        assert r["temp_bytes"]["ours"] >= 0 and r["compile_s"]["flax"] > 0
        if r["mode"] == "fwd":
            assert r["max_abs_diff_to_f64"]["ours"] < 1e-4
        if r["mode"] == "fwd+bwd":
            assert r["grad_rel_diff_ours_vs_flax"] < 1e-4
    assert result["streaming_gb_s"] > 0
    assert "| LN" in capsys.readouterr().out
