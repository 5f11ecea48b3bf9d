"""tools/evaluate.py end to end: a tiny trained checkpoint against AIME24, k=2."""
import json
import os
import subprocess
import sys

import pytest

from test_reliability import _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIME24 = os.path.join(os.environ.get("ATESD_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                      "math_eval", "aime24.jsonl")


@pytest.mark.skipif(not os.path.exists(AIME24), reason="shared data not present")
def test_evaluate_tiny_checkpoint_on_aime24(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    train = subprocess.run(_cli(tmp_path, iters=2), capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "results.json"
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load",
                         str(tmp_path / "run"), "--data", AIME24, "-k", "2", "--max-new-tokens", "8",
                         "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(out.read_text())["benchmarks"]["aime24"]
    assert res["aggregate"]["n_problems"] == 30 and len(res["problems"]) == 30
    assert all(len(p["responses"]) == 2 for p in res["problems"])
    assert 0.0 <= res["aggregate"]["avg@2"] <= 1.0
    assert "| aime24 | 30 |" in ev.stdout
