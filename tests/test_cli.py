"""Real torchrun smoke test of the CLI: 2 ranks on gloo, a few ATESD steps, the run directory."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_two_ranks_writes_metrics_and_eval(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config",
           os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--train-iters", "3",
           "--warm-start-iters", "2", "--synthetic-train-size", "600", "--synthetic-eval-size", "8",
           "--probe-size", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
           "--max-new-tokens", "12", "--save", str(run), "--cache-dir", str(tmp_path / "cache"),
           "--no-tensorboard"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        for key in ("alpha", "loss", "mismatch", "probe_nll", "confidence", "beta_a", "beta_b"):
            assert key in r, key
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["before"]["accuracy"] <= 1.0 and 0.0 <= result["after"]["accuracy"] <= 1.0
    assert "iteration        3/       3 |" in out.stdout and "lm loss:" in out.stdout
    assert "world 2 (tp 1, pp 1, dp 2) | backend gloo" in out.stdout
    ours = [l for l in out.stderr.splitlines() if "atesd" in l.lower() and "warn" in l.lower()]
    assert len(ours) <= 1
