"""Reliability: NaN steps are skipped and counted, SIGTERM saves and exits 0, a failing rank
brings the whole job down quickly."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness import run_distributed
from test_trainer import _cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nan_run(cfg, n):
    from atesd_mc.model.qwen3 import unwrap
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    before = {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items() if torch.is_tensor(v)}
    records, weights_after = [], []
    for _ in range(n):
        records.append(trainer.train_step())
        weights_after.append({k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()
                              if torch.is_tensor(v)})
    trainer.save_checkpoint()
    state = torch.load(os.path.join(cfg.run_dir, "iter_%07d" % n, "trainer_state.pt"), weights_only=True)
    return records, before, weights_after, state


def test_nan_step_is_skipped_counted_and_training_continues(tmp_path):
    cfg = _cfg(tmp_path, inject_nan_steps=[2])
    records, before, after, state = run_distributed(_nan_run, world=1, args=(cfg, 4))[0]
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert records[1]["skipped_total"] == 1 and records[3]["skipped_total"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped"])
    for k in after[0]:  # the skipped step changed no weight
        assert torch.equal(after[0][k], after[1][k])
    assert any(not torch.equal(after[1][k], after[2][k]) for k in after[1])  # the next one did
    flat = [v for v in after[-1].values()]
    assert all(torch.isfinite(v).all() for v in flat)
    assert state["step"] == 4


def _too_many(cfg, n):
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    try:
        for _ in range(n):
            trainer.train_step()
    except RuntimeError as e:
        return str(e), trainer.step
    return None, trainer.step


def test_too_many_nan_steps_in_a_row_stop_the_run(tmp_path):
    cfg = _cfg(tmp_path, inject_nan_steps=[2, 3, 4], max_skipped_steps=3)
    msg, step = run_distributed(_too_many, world=1, args=(cfg, 6))[0]
    assert msg is not None and "3 consecutive iterations" in msg and "max_skipped_steps=3" in msg
    assert step == 3  # stopped at the third bad step


def _cli(tmp_path, *extra, iters=40):
    return [sys.executable, os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config",
            os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--num-layers", "2", "--hidden-size", "64",
            "--ffn-hidden-size", "128", "--kv-channels", "16", "--train-iters", str(iters),
            "--warm-start-iters", "0", "--synthetic-train-size", "600", "--synthetic-eval-size", "8",
            "--probe-size", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
            "--max-new-tokens", "12", "--save", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--no-tensorboard", *extra]


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_cli(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    step = int((tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= step < 40 and f"exiting at iteration {step}: received SIGTERM" in out
    assert len(metrics.read_text().splitlines()) == step
    done = subprocess.run(_cli(tmp_path), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run'} at iteration {step}" in done.stdout
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_failing_rank_stops_every_rank_quickly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + \
        _cli(tmp_path, "--inject-fault-at", "1:3", "--distributed-timeout-minutes", "0.5")[1:]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    took = time.time() - start
    assert out.returncode != 0
    assert "error on rank 1: RuntimeError: injected fault on rank 1 at iteration 3" in out.stderr
    assert took < 60 + 15  # < 60 s after start-up (imports take ~10 s)
