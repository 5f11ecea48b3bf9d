"""tools/bench_throughput.py end to end: the tiny preset on CPU, world 1, in a subprocess (as a user
runs it), writes one CSV row per stage with positive numbers and FLOPs equal to atesd_mc.flops."""
import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(batch=2, prompt_len=8, reference_len=6, new_tokens=4)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK",
                                                          "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_throughput.py"), "--model", "tiny",
           "--steps", "2", "--warmup", "1", "--threads", "1", "--batch", str(SHAPE["batch"]), "--micro-batch", "1",
           "--prompt-len", str(SHAPE["prompt_len"]), "--reference-len", str(SHAPE["reference_len"]),
           "--new-tokens", str(SHAPE["new_tokens"]), "--csv", str(out / "t.csv"), "--json", str(out / "t.json")]
    env["OMP_NUM_THREADS"] = "1"  # CI boxes are small and shared: no OpenMP spinning
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "t.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "t.json") as f:
        meta = json.load(f)
    return proc.stdout, rows, meta


def test_every_stage_has_positive_numbers(bench_run):
    stdout, rows, _ = bench_run
    by_stage = {r["stage"]: r for r in rows}
    assert list(by_stage) == ["rollout", "teacher", "student", "optimizer", "total"]
    for stage, r in by_stage.items():
        assert r["status"] == "ok" and int(r["steps"]) == 2, r
        assert float(r["ms_per_step"]) > 0 and float(r["peak_mem_mib"]) > 0, r
        assert r["mfu"] == "" and r["device"].startswith("CPU"), r  # no peak on CPU: TFLOP/s only
        if stage != "optimizer":  # the optimizer step moves no tokens and does no matmuls
            assert float(r["tokens_per_s_per_gpu"]) > 0 and float(r["tflops_per_gpu"]) > 0, r
    assert "| rollout |" in stdout and "TFLOP/s/GPU" in stdout


def test_tokens_and_flops_match_the_accounting(bench_run):
    from atesd_mc import flops
    from atesd_mc.config_io import parse_config

    _, rows, meta = bench_run
    by_stage = {r["stage"]: r for r in rows}
    b, p, ref, n = SHAPE["batch"], SHAPE["prompt_len"], SHAPE["reference_len"], SHAPE["new_tokens"]
    assert int(by_stage["rollout"]["tokens_per_step"]) == b * n
    assert int(by_stage["teacher"]["tokens_per_step"]) == b * (p + ref + n)
    assert int(by_stage["student"]["tokens_per_step"]) == b * (p + n)
    cfg = parse_config(["--config", os.path.join(REPO, "examples", "tiny_arith.yaml")]).model
    s = meta["settings"]
    want = flops.step_flops(cfg, s["vocab"], [p] * b, [n] * b, [p + ref] * b, padded_vocab=s["padded_vocab"])
    for stage in ("rollout", "teacher", "student"):
        assert float(by_stage[stage]["tflop_per_step"]) == pytest.approx(want[stage] / 1e12, rel=1e-4)
    assert float(by_stage["total"]["tflop_per_step"]) == pytest.approx(sum(want.values()) / 1e12, rel=1e-4)
