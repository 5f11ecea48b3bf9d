"""The study's tooling: seed lists, statistics, choices on validation only, and a 2-seed micro study
(a few steps per method) that writes the CSV, the report and the plots and resumes without rerunning."""
import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest

from atesd_mc.study import FAMILIES, bootstrap_ci, paired, parse_seeds, pearson, select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("11,12") == [11, 12]
    assert parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("", "3-1", "a"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_bootstrap_ci_matches_exact_resampling_distribution():
    # With 3 values the bootstrap distribution of the mean is the 27 equally likely ordered resamples:
    # the 2.5% / 97.5% percentiles sit between the smallest two and the largest two of them.
    vals = [0.1, 0.4, 0.25]
    exact = sorted((a + b + c) / 3 for a in vals for b in vals for c in vals)
    lo, hi = bootstrap_ci(vals, n_boot=20000, seed=1)
    assert exact[0] - 1e-12 <= lo <= exact[1] + 1e-12 and exact[-2] - 1e-12 <= hi <= exact[-1] + 1e-12
    # A normal sample: the CI holds the mean and is close to +-1.96 sd/sqrt(n).
    rng = random.Random(0)
    xs = [rng.gauss(2.0, 1.0) for _ in range(400)]
    lo, hi = bootstrap_ci(xs, n_boot=4000)
    m = sum(xs) / len(xs)
    assert lo < m < hi and abs((hi - lo) - 2 * 1.96 / 20) < 0.04


def test_pearson_against_closed_form():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    ys = [2.0, 1.0, 4.0, 3.0, 5.0]
    assert math.isclose(pearson(xs, ys), 0.8, rel_tol=1e-12)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def _row(method, seed, val, test):
    return {"method": method, "seed": seed, "val_after": val, "after": test, "retention": 0.9}


def test_select_reads_validation_only_and_paired_differences():
    rows = [_row("fixed_0.5", s, 0.6, 0.1) for s in range(3)] + [_row("fixed_0.75", s, 0.5, 0.9) for s in range(3)]
    rows += [_row("atesd", s, 0.7, 0.2 + 0.1 * s) for s in range(3)]
    chosen = select(rows)
    assert chosen["fixed alpha"] == "fixed_0.5"  # the test split would have picked fixed_0.75
    assert chosen["ATESD"] == "atesd" and "GRPO" not in chosen
    d = paired(rows, "atesd", "fixed_0.5")
    assert d["seeds"] == [0, 1, 2] and [round(x, 12) for x in d["diffs"]] == [0.1, 0.2, 0.3]
    assert math.isclose(d["mean"], 0.2) and d["lo"] <= 0.2 <= d["hi"]
    assert set(FAMILIES) == {"fixed alpha", "GRPO", "ATESD"}


TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64", "--kv-channels", "8",
        "--train-iters", "4", "--warm-start-iters", "2", "--synthetic-train-size", "300",
        "--synthetic-eval-size", "6", "--synthetic-val-size", "4", "--synthetic-prior-size", "4",
        "--probe-size", "4", "--global-batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "6",
        "--eval-samples", "0", "--hold-steps", "1", "--lookahead-steps", "1", "--decisions-per-update", "1"]
METHODS = "fixed_0.5,opsd,ramp,atesd_detrended,sft,grpo_lr1e-3"


def _study(out, *extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_study.py"), "--config",
                           os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--seeds", "0-1", "--out", str(out),
                           "--methods", METHODS, "--teacher-n", "4", "--jobs", "2", *extra, "--", *TINY],
                          capture_output=True, text=True, timeout=900)


def test_micro_study(tmp_path):
    out = tmp_path / "study"
    proc = _study(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {(m, str(s)) for m in METHODS.split(",") for s in (0, 1)}
    for r in rows:
        assert 0.0 <= float(r["after"]) <= 1.0 and 0.0 <= float(r["retention"]) <= 1.0
        assert 0.0 <= float(r["val_after"]) <= 1.0
    ramp = next(r for r in rows if r["method"] == "ramp")
    assert math.isclose(float(ramp["alpha_first"]), 0.5) and math.isclose(float(ramp["alpha_last"]), 0.8)
    atesd = next(r for r in rows if r["method"] == "atesd_detrended")
    assert int(atesd["updates"]) >= 1 and int(atesd["scored_decisions"]) >= 1
    text = (out / "RESULTS.md").read_text()
    for part in ("Choices made on the validation split", "Paired differences", "p(true novel)",
                 "The paper's findings", "| ramp |", "Controller"):
        assert part in text, part
    for seed in (0, 1):
        check = json.load(open(out / "teacher" / f"seed{seed}.json"))
        assert check["split"] == "val" and any(r["who"] == "teacher alpha=0.5" for r in check["rows"])
    # every method of a seed starts from the same warm start: the evaluation before training is
    # computed once (or twice, by runs that start together) and reused by the others
    logs = [(out / "logs" / f"{m}-s0.log").read_text() for m in METHODS.split(",")]
    assert any("held-out accuracy before: reusing" in t for t in logs)
    befores = {json.dumps({k: v for k, v in json.load(open(out / "runs" / f"{m}-s0" / "eval.json")).items()
                           if k.startswith("before")}, sort_keys=True) for m in METHODS.split(",")}
    assert len(befores) == 1
    for png in ("accuracy.png", "mismatch_vs_alpha.png", "alpha_trajectories.png"):
        assert (out / png).stat().st_size > 1000
    again = _study(out)  # resumable: nothing is rerun, the report is rewritten
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout + again.stderr


def test_bad_seeds_and_methods_are_refused_in_one_line(tmp_path):
    for flag, value in (("--seeds", "4-2"), ("--methods", "fixed_0.5,nope")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_study.py"), "--config",
                               os.path.join(ROOT, "examples", "tiny_arith.yaml"), flag, value, "--out",
                               str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
        assert not (tmp_path / "s").exists()


def test_alpha_reward_corr_removes_the_time_trend():
    from atesd_mc.study import alpha_reward_corr

    rng = random.Random(3)
    steps = list(range(100))
    alphas = {t: rng.random() for t in steps}
    # a strong trend in time plus a small alpha effect: pooled, time dominates; detrended, alpha shows
    rewards = [1.0 - 0.01 * t + 0.05 * alphas[t] for t in steps]
    assert abs(pearson([alphas[t] for t in steps], rewards)) < 0.5
    assert alpha_reward_corr(steps, rewards, alphas) > 0.999
    noise = [1.0 - 0.01 * t + 0.05 * rng.random() for t in steps]
    assert abs(alpha_reward_corr(steps, noise, alphas)) < 0.3
    assert math.isnan(alpha_reward_corr([1, 2], [0.1, 0.2], alphas))


def test_differences_csv(tmp_path):
    from atesd_mc.study import comparisons, write_differences

    rows = [dict(_row(m, s, 0.5, 0.1 * s + (0.05 if m == "atesd" else 0)), retention=0.9)
            for m in ("atesd", "fixed_0.5", "opsd", "ramp", "random", "sft") for s in range(3)]
    diffs = comparisons(rows, select(rows))
    assert [(d["a"], d["b"], d["key"]) for d in diffs][:2] == [("atesd", "fixed_0.5", "after"), ("atesd", "opsd", "after")]
    write_differences(diffs, str(tmp_path / "d.csv"))
    out = list(csv.DictReader(open(tmp_path / "d.csv")))
    first = [r for r in out if r["comparison"] == "atesd - fixed_0.5"]
    assert [r["seed"] for r in first] == ["0", "1", "2", "mean"]
    assert all(math.isclose(float(r["difference"]), 0.05) for r in first)
