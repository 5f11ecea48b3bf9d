"""A 2-seed micro study (a few steps per method) produces the CSV with every method present."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_micro_study_has_every_method(tmp_path):
    from atesd_mc.study import METHODS

    out = tmp_path / "study"
    tiny = ["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64", "--kv-channels", "8",
            "--train-iters", "2", "--warm-start-iters", "2", "--synthetic-train-size", "300",
            "--synthetic-eval-size", "4", "--probe-size", "4", "--global-batch-size", "8",
            "--micro-batch-size", "8", "--max-new-tokens", "6", "--eval-samples", "1", "--hold-steps", "1",
            "--lookahead-steps", "1", "--decisions-per-update", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_study.py"), "--config",
                           os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--seeds", "2", "--out", str(out),
                           "--jobs", "2", "--", *tiny], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {(m, str(s)) for m in METHODS for s in (0, 1)}
    for r in rows:
        assert 0.0 <= float(r["after"]) <= 1.0
    text = (out / "RESULTS.md").read_text()
    assert "Mismatch vs alpha" in text and "| opsd |" in text
    for png in ("accuracy.png", "mismatch_vs_alpha.png", "alpha_trajectories.png"):
        assert (out / png).stat().st_size > 1000
    # resumable: a second call reruns nothing
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_study.py"), "--config",
                            os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--seeds", "2", "--out", str(out),
                            "--", *tiny], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "started" not in again.stdout
