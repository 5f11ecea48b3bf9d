"""tools/plot_run.py draws a PNG from a run directory (resumed steps deduplicated)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plot_run_writes_png(tmp_path):
    recs = [{"step": s, "alpha": 0.5 + 0.01 * s, "loss": 1.0 / s, "mismatch": 0.1, "probe_nll": 2.0,
             "beta_a": 2.0 + 0.1 * s, "beta_b": 2.0, "reward": 0.1 if s % 5 == 0 else None} for s in range(1, 21)]
    recs.append({**recs[4], "loss": 9.0})  # step 5 re-run after a resume: the last record wins
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "eval.json").write_text(json.dumps({"before": {"accuracy": 0.2}, "after": {"accuracy": 0.3}}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    from atesd_mc.plotting import read_metrics

    got = read_metrics(str(tmp_path))
    assert [r["step"] for r in got] == list(range(1, 21)) and got[4]["loss"] == 9.0
