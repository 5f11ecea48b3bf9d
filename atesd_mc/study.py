"""The study: every method from the same warm start, data and budget per seed; what each run says.

Methods (docs/METHOD.md, Baselines): fixed alpha in {0, .25, .5, .75, 1 (= OPSD)}, uniform-random
alpha, a fixed linear ramp 0.5 -> 0.8 (the schedule the learned policy is said to drift along),
learned alpha (ATESD): the paper's reward (full), its G_lp-only and one-step ablations, each with the
paper's batch advantage, and the full and G_lp-only rewards with a detrended advantage; SFT on the
references and GRPO at three learning rates. Each (method, seed) is one run directory with metrics.jsonl and
eval.json. Choices (the best fixed alpha, GRPO's learning rate, the ATESD variant) are made on the
validation split only (`select`); the test split gives the reported numbers (atesd_mc.study_report)."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics

FIXED = (0.0, 0.25, 0.5, 0.75)
GRPO_LRS = ("1e-4", "3e-4", "1e-3")
METHODS: dict[str, list[str]] = {
    **{f"fixed_{a:g}": ["--atesd-algorithm", "atesd", "--atesd-exposure", "fixed", "--reveal-ratio", str(a)]
       for a in FIXED},
    "opsd": ["--atesd-algorithm", "opsd"],
    "random": ["--atesd-algorithm", "atesd", "--atesd-exposure", "random"],
    "ramp": ["--atesd-algorithm", "atesd", "--atesd-exposure", "ramp", "--ramp-start", "0.5", "--ramp-end", "0.8"],
    "atesd": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "full",
              "--advantage-baseline", "batch"],
    "atesd_detrended": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "full",
                        "--advantage-baseline", "detrended"],
    "atesd_lp_only": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "lp_only",
                      "--advantage-baseline", "batch"],
    "atesd_lp_only_detrended": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant",
                                "lp_only", "--advantage-baseline", "detrended"],
    "atesd_one_step": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "one_step",
                       "--advantage-baseline", "batch"],
    "sft": ["--atesd-algorithm", "sft"],
    **{f"grpo_lr{lr}": ["--atesd-algorithm", "grpo", "--rollouts-per-prompt", "4", "--lr", lr, "--min-lr", lr]
       for lr in GRPO_LRS},
}
DEFAULT_METHODS = list(METHODS)
FIXED_ALPHA = {**{f"fixed_{a:g}": a for a in FIXED}, "opsd": 1.0}
FAMILIES = {"fixed alpha": list(FIXED_ALPHA), "GRPO": [f"grpo_lr{lr}" for lr in GRPO_LRS],
            "ATESD": ["atesd", "atesd_detrended", "atesd_lp_only", "atesd_lp_only_detrended", "atesd_one_step"]}
"""Each family is represented by its member with the best mean validation accuracy (`select`)."""


def parse_seeds(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "11,12" -> [11, 12]; "0-2,7" -> [0, 1, 2, 7]. Raises ValueError."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"range {part!r} runs backwards")
        seeds += [s for s in range(first, last + 1) if s not in seeds]
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def _finite(vals) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(vals) -> float:
    vals = _finite(vals)
    return statistics.fmean(vals) if vals else math.nan


def pearson(xs, ys) -> float:
    """Pearson correlation over the finite pairs; nan with fewer than 3 of them or a constant side."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    try:
        return statistics.correlation([p[0] for p in pairs], [p[1] for p in pairs])
    except statistics.StatisticsError:  # a constant side
        return math.nan


def beta_std(a: float, b: float) -> float:
    """Standard deviation of Beta(a, b): the policy's spread."""
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


def alpha_reward_corr(steps: list, rewards: list, alpha_at: dict) -> float:
    """corr(alpha of a decision, its reward minus the run's linear trend in time): does the reward
    say anything about the alpha that was chosen, once *when* is taken out? Near 0: the controller
    has nothing to learn from (its signal is noise at this scale)."""
    from atesd_mc.exposure.reward import detrend

    pairs = [(t, r, alpha_at.get(int(t))) for t, r in zip(steps, rewards)
             if isinstance(t, (int, float)) and math.isfinite(t) and isinstance(alpha_at.get(int(t)), (int, float))]
    if len(pairs) < 3:
        return math.nan
    ts, rs, alphas = zip(*pairs)
    return pearson(alphas, detrend(ts, rs, ts, rs))


def _controller_summary(recs: list[dict]) -> dict:
    """Decisions, updates, how much the advantage says *when* a decision was made, and the policy's
    mean and spread at start and end. corr(advantage, t) is taken inside each update and averaged
    (pooled over a run it is ~0 by construction: every update's advantages are centred);
    corr(reward, t) is pooled over the run: the trend the batch z-score turns into advantage."""
    steps, rewards, within, updates = [], [], [], 0
    for r in recs:
        if r.get("advantages"):
            updates += 1
            t = r.get("decision_steps") or [math.nan] * len(r["advantages"])
            steps += t
            rewards += r.get("rewards") or [math.nan] * len(r["advantages"])
            within.append(pearson(t, r["advantages"]))
    pol = [r for r in recs if isinstance(r.get("beta_a"), (int, float))]
    # a record's "step" counts from 1; a decision's t0 is the 0-based step its alpha was chosen for
    alpha_at = {r["step"] - 1: r.get("alpha") for r in recs if isinstance(r.get("step"), int)}
    out = {"updates": updates, "scored_decisions": len(steps), "adv_time_corr": _mean(within),
           "alpha_reward_corr": alpha_reward_corr(steps, rewards, alpha_at),
           "reward_time_corr": pearson(steps, rewards), "reward_mean": _mean(rewards),
           "reward_std": statistics.pstdev(_finite(rewards)) if len(_finite(rewards)) > 1 else math.nan}
    for when, r in (("start", pol[0] if pol else None), ("end", pol[-1] if pol else None)):
        out[f"policy_mean_{when}"] = r["beta_a"] / (r["beta_a"] + r["beta_b"]) if r else math.nan
        out[f"policy_std_{when}"] = beta_std(r["beta_a"], r["beta_b"]) if r else math.nan
    return out


def read_run(run_dir: str) -> dict | None:
    """Summary of one finished run (None when eval.json is missing)."""
    from atesd_mc.plotting import read_metrics

    ev_path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(ev_path):
        return None
    with open(ev_path) as f:
        ev = json.load(f)
    recs = read_metrics(run_dir)
    alphas = [r["alpha"] for r in recs if r.get("alpha") is not None]
    fifth = max(1, len(alphas) // 5)

    def split(when, name):
        return ev.get(f"{when}_splits", {}).get(name, {}).get("accuracy", math.nan)

    return {"before": ev["before"]["accuracy"], "after": ev["after"]["accuracy"], "n_test": ev["after"]["n"],
            "val_before": split("before", "val"), "val_after": split("after", "val"),
            "prior_before": split("before", "prior"), "retention": split("after", "prior"),
            "steps": len(recs), "mismatch": _mean(r.get("mismatch") for r in recs),
            "top1": _mean(r.get("top1_disagree") for r in recs),
            "alpha_first": statistics.fmean(alphas[:fifth]) if alphas else math.nan,
            "alpha_last": statistics.fmean(alphas[-fifth:]) if alphas else math.nan,
            **_controller_summary(recs), "seconds": ev.get("train_seconds", math.nan), "alphas": alphas}


def bootstrap_ci(values: list[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (resampling the values, e.g. one per seed)."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(vals, k=len(vals))) for _ in range(n_boot))
    lo = means[int(math.floor((1 - level) / 2 * n_boot))]
    hi = means[min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)]
    return lo, hi


def select(rows: list[dict]) -> dict[str, str]:
    """Per family, the member with the highest mean validation accuracy over seeds (ties: the
    first listed). Families without a finished member are left out. Never reads the test split."""
    chosen = {}
    for family, members in FAMILIES.items():
        scored = [(_mean(r["val_after"] for r in rows if r["method"] == m), -i, m) for i, m in enumerate(members)
                  if any(r["method"] == m for r in rows)]
        scored = [s for s in scored if math.isfinite(s[0])]
        if scored:
            chosen[family] = max(scored)[2]
    return chosen


def paired(rows: list[dict], a: str, b: str, key: str = "after") -> dict:
    """Per-seed differences a - b on `key` (seeds where both finished), their mean and bootstrap CI."""
    by = {(r["method"], r["seed"]): r[key] for r in rows}
    seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    lo, hi = bootstrap_ci(diffs)
    return {"a": a, "b": b, "key": key, "seeds": seeds, "diffs": diffs, "mean": _mean(diffs), "lo": lo, "hi": hi}


def comparisons(rows: list[dict], chosen: dict[str, str]) -> list[dict]:
    """The study's paired differences on the test split: the chosen ATESD variant against the chosen
    fixed alpha, OPSD, the ramp schedule, random alpha, the chosen GRPO and SFT (accuracy and
    retention), and random against the chosen fixed alpha."""
    best_atesd, best_fixed = chosen.get("ATESD"), chosen.get("fixed alpha")
    if not best_atesd:
        return []
    diffs = [paired(rows, best_atesd, b) for b in (best_fixed, "opsd", "ramp", "random") if b]
    if best_fixed:
        diffs.append(paired(rows, "random", best_fixed))
    if chosen.get("GRPO"):
        diffs.append(paired(rows, best_atesd, chosen["GRPO"]))
    return diffs + [paired(rows, best_atesd, "sft"), paired(rows, best_atesd, "sft", key="retention")]


def write_differences(diffs: list[dict], path: str) -> None:
    """One row per comparison and seed, then its mean and CI (seed "mean"), as fractions of accuracy (0.01 = 1 point)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["comparison", "metric", "seed", "difference", "ci_low", "ci_high"])
        for d in diffs:
            name = f"{d['a']} - {d['b']}"
            w.writerows([name, d["key"], s, x, "", ""] for s, x in zip(d["seeds"], d["diffs"]))
            w.writerow([name, d["key"], "mean", d["mean"], d["lo"], d["hi"]])
    os.replace(tmp, path)


CSV_KEYS = ("method", "seed", "before", "after", "retention", "prior_before", "val_before", "val_after",
            "n_test", "steps", "mismatch", "top1", "alpha_first", "alpha_last", "updates", "scored_decisions",
            "adv_time_corr", "reward_time_corr", "alpha_reward_corr", "reward_mean", "reward_std", "policy_mean_start",
            "policy_std_start", "policy_mean_end", "policy_std_end", "seconds")


def write_csv(rows: list[dict], path: str) -> None:
    """One row per method x seed (written whole, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
