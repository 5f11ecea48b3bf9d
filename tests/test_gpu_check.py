"""tools/gpu_check.sh without a GPU: its plan fits the device tool's 8 minutes with the important steps
first; `--cpu-dry-run` runs every step on CPU (a bundle prepared by tools/prepare_gpu_bundle.sh
--no-wheels, as CI has no registry) and the summary it writes says what each trainer run did; a step
that fails, runs out of memory or finds no GPU makes the result FAIL with exit status 1."""
import json
import math
import os
import re
import stat
import subprocess
import sys

import pytest

from test_data_fixtures import DATA, GSM8K_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
# The device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'.
MAX_OUT_FILES = 8


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "OUT")}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "ATESD_SHARED_DATA": DATA, **extra})
    return env


def _plan():
    proc = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if re.match(r"^\S+\s+\d+\s+\S+$", line)]
    return [(name, int(cap), kind) for name, cap, kind in rows]


def test_plan_fits_eight_minutes_most_important_first():
    plan = _plan()
    names = [p[0] for p in plan]
    assert sum(cap for _, cap, _ in plan) <= 480
    assert names[:2] == ["install_bundle", "environment"]
    trainer = [n for n in names if n.startswith(("tiny_", "qwen3_"))]
    assert trainer == names[2:2 + len(trainer)] and len(trainer) == 6  # trainer runs right after
    assert names.index("aot_native") < names.index("kernel_tests")
    kinds = [kind for _, _, kind in plan]
    first_timing = kinds.index("timing")
    assert set(kinds[:first_timing]) == {"required"} and set(kinds[first_timing:]) == {"timing"}
    assert names[first_timing:] == ["bench_kernels", "throughput_qwen3_1p7b", "throughput_qwen3_1p7b_swapped_engines"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not os.path.exists(GSM8K_TRAIN):
        pytest.skip("shared data not present (the dry run prepares its bundle from GSM8K and AIME24)")
    out = tmp_path_factory.mktemp("gpu_check_out")
    bundle = tmp_path_factory.mktemp("empty_bundle")  # as in CI: nothing prepared, no registry
    proc = subprocess.run(["bash", SCRIPT, "--cpu-dry-run", "--out", str(out), "--bundle", str(bundle)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
    summary = json.load(open(out / "summary.json")) if (out / "summary.json").exists() else None
    return proc, out, summary


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run):
    proc, out, summary = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert summary["pass"] and summary["result"] == "PASS" and summary["mode"] == "dry"
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [(n, "ok") for n, _, _ in _plan()]
    assert "RESULT: PASS" in proc.stdout
    files = sorted(os.listdir(out))
    assert len(files) <= MAX_OUT_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {"gpu_check.log", "summary.md", "summary.json", "aot_native.json"} <= set(files)


@pytest.mark.slow
def test_dry_run_records_versions_and_layer_spec(dry_run):
    env = dry_run[2]["env"]
    assert env["layer_spec_auto"] in ("local", "transformer_engine")
    assert ("transformer_engine_error" in env) == (env["transformer_engine"] is None)
    assert env["megatron_core"] and env["torch"] and env["triton"] and env["zarr"] and env["math_verify"]
    assert env["atesd_mc.kernels"] == os.path.join(os.path.realpath(REPO), "kernels")


@pytest.mark.slow
def test_trainer_runs_save_load_and_stay_finite(dry_run):
    runs = {r["name"]: r for r in dry_run[2]["runs"]}
    expected = {"tiny_train_save": [1, 2, 3], "tiny_resume_load": [4, 5], "tiny_cpu_checkpoint_resume": [3],
                "tiny_cpu_checkpoint_finetune_lora": [1, 2], "qwen3_1p7b_lora_save": [1, 2, 3],
                "qwen3_1p7b_lora_load": [4]}
    assert {n: [s["step"] for s in r["steps"]] for n, r in runs.items()} == expected
    for r in runs.values():
        assert r["problems"] == [] and r["checkpoint"] == str(expected[r["name"]][-1])
        assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) and not s["skipped"]
                   for s in r["steps"])
        assert r["layer_spec"] == dry_run[2]["env"]["layer_spec_auto"] and r["engine"].startswith("decode ")
    assert runs["tiny_resume_load"]["resumed"].endswith("runs/tiny at iteration 3")
    assert runs["tiny_cpu_checkpoint_resume"]["resumed"].endswith("ckpt_tiny_cpu at iteration 2")
    assert runs["tiny_cpu_checkpoint_finetune_lora"]["finetuned"].endswith("ckpt_tiny_cpu")
    assert runs["qwen3_1p7b_lora_load"]["resumed"].endswith("runs/qwen3_1p7b at iteration 3")
    assert runs["qwen3_1p7b_lora_load"]["engine"].startswith("decode megatron")


@pytest.mark.slow
def test_aot_table_has_compile_times(dry_run):
    _, out, summary = dry_run
    aot = json.load(open(out / "aot_native.json"))
    assert summary["aot_native"]["archs"] == aot["archs"] == [90]
    kernels = {r["kernel"] for r in aot["rows"]}
    assert {"_loss_kernel", "_grad_kernel", "_pack_kernel", "_stats_kernel"} <= kernels
    assert all(r["compile_s"] > 0 and not r["violations"] for r in aot["rows"])
    md = open(out / "summary.md").read()
    for k in kernels:
        assert re.search(rf"^\| {k} \| sm_90 \| \d+ \| \d+\.\d\d \|", md, re.M), k


def _fake_python(tmp_path, message: str) -> str:
    """A PYTHON whose every step prints `message` and fails; the summary still runs on the real one."""
    path = tmp_path / "python"
    path.write_text(f'#!/bin/sh\ncase "$1" in *summary.py) exec "{sys.executable}" "$@";; esac\n'
                    f'echo "{message}"\nexit 1\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("message,status", [("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", "oom"),
                                            ("ImportError: no megatron", "failed(rc=1)")])
def test_a_failing_or_oom_step_fails_the_check(tmp_path, message, status):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, "--cpu-dry-run", "--only", "environment", "--out", str(out)], cwd=REPO,
                          env=_env(PYTHON=_fake_python(tmp_path, message)), capture_output=True, text=True,
                          timeout=120)
    summary = json.load(open(out / "summary.json"))
    assert proc.returncode == 1 and not summary["pass"], proc.stdout[-3000:]
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert steps["environment"] == status
    assert set(steps.values()) == {status, "deselected"}
    assert summary["result"].startswith("FAIL (failed: environment)") and "partial" in summary["result"]


def test_without_a_gpu_the_real_check_fails(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT, "--only", "environment", "--out", str(out)], cwd=REPO,
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=180)
    summary = json.load(open(out / "summary.json"))
    assert proc.returncode == 1 and summary["result"].startswith("FAIL (failed: environment)"), proc.stdout[-3000:]
    assert "torch sees no CUDA device" in proc.stdout
