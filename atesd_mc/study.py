"""The study: every method from the same warm start, data and budget; then tables and plots.

Methods (docs/METHOD.md, Baselines): fixed alpha in {0, .25, .5, .75, 1 (= OPSD)}, uniform-random
alpha, learned alpha (ATESD) with the paper's reward ablations (one-step, G_lp only, full), SFT on
the references and GRPO. Each (method, seed) is one run directory with metrics.jsonl and eval.json."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics

FIXED = (0.0, 0.25, 0.5, 0.75)
METHODS: dict[str, list[str]] = {
    **{f"fixed_{a:g}": ["--atesd-algorithm", "atesd", "--atesd-exposure", "fixed", "--reveal-ratio", str(a)]
       for a in FIXED},
    "opsd": ["--atesd-algorithm", "opsd"],
    "random": ["--atesd-algorithm", "atesd", "--atesd-exposure", "random"],
    "atesd": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "full"],
    "atesd_lp_only": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "lp_only"],
    "atesd_one_step": ["--atesd-algorithm", "atesd", "--atesd-exposure", "adaptive", "--reward-variant", "one_step"],
    "sft": ["--atesd-algorithm", "sft"],
    "grpo": ["--atesd-algorithm", "grpo", "--rollouts-per-prompt", "4"],
}
FIXED_ALPHA = {**{f"fixed_{a:g}": a for a in FIXED}, "opsd": 1.0}


def read_run(run_dir: str) -> dict | None:
    """Summary of one finished run (None when eval.json is missing)."""
    from atesd_mc.plotting import read_metrics

    ev_path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(ev_path):
        return None
    ev = json.load(open(ev_path))
    recs = read_metrics(run_dir)

    def mean_of(key, rs=recs):
        vals = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return statistics.fmean(vals) if vals else float("nan")

    rewards = [r["reward"] for r in recs if isinstance(r.get("reward"), (int, float))]
    alphas = [r["alpha"] for r in recs if r.get("alpha") is not None]
    tail = recs[-max(1, len(recs) // 5):]
    return {"before": ev["before"]["accuracy"], "after": ev["after"]["accuracy"],
            "before_avgk": ev.get("before_sampled", {}).get("accuracy", float("nan")),
            "after_avgk": ev.get("after_sampled", {}).get("accuracy", float("nan")),
            "k": ev.get("after_sampled", {}).get("k", 1), "steps": len(recs),
            "mismatch": mean_of("mismatch"), "top1": mean_of("top1_disagree"),
            "alpha_first": statistics.fmean(alphas[: max(1, len(alphas) // 5)]) if alphas else float("nan"),
            "alpha_last": statistics.fmean(alphas[-max(1, len(alphas) // 5):]) if alphas else float("nan"),
            "policy_mean_last": mean_of("policy_mean", tail),
            "reward_mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else float("nan"),
            "updates": len(rewards), "seconds": ev.get("train_seconds", float("nan")),
            "alphas": alphas}


def write_csv(rows: list[dict], path: str) -> None:
    keys = [k for k in rows[0] if k != "alphas"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.fmean(vals):.1f} ± {100 * sd:.1f}"


def results_markdown(rows: list[dict], command: str, elapsed_s: float, notes: str = "") -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    out = ["# Study results", "", f"Command: `{command}`", "",
           f"Seeds: {seeds}; wall time {elapsed_s / 60:.1f} min on this machine. Accuracy in % (mean ± std "
           "over seeds) on the held-out split; 'before' is the shared warm start.", "",
           "| method | greedy after | Avg@k after | greedy before | mean mismatch (KL) | top-1 disagree |",
           "|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        out.append(f"| {m} | {_ms([r['after'] for r in rs])} | {_ms([r['after_avgk'] for r in rs])} | "
                   f"{_ms([r['before'] for r in rs])} | {statistics.fmean([r['mismatch'] for r in rs]):.4f} | "
                   f"{statistics.fmean([r['top1'] for r in rs]):.4f} |")
    out += ["", "## Mismatch vs alpha (fixed-alpha runs, mean over all steps and seeds)", "",
            "| alpha | mean per-token KL | top-1 disagreement |", "|---|---|---|"]
    for m, a in sorted(FIXED_ALPHA.items(), key=lambda x: x[1]):
        rs = [r for r in rows if r["method"] == m]
        if rs:
            out.append(f"| {a:g} | {statistics.fmean([r['mismatch'] for r in rs]):.4f} | "
                       f"{statistics.fmean([r['top1'] for r in rs]):.4f} |")
    out += ["", "## Learned alpha (ATESD runs)", "",
            "| run | alpha first 20% | alpha last 20% | policy mean (end) | REINFORCE updates | update reward mean | update reward std |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"].startswith("atesd"):
            out.append(f"| {r['method']} s{r['seed']} | {r['alpha_first']:.3f} | {r['alpha_last']:.3f} | "
                       f"{r['policy_mean_last']:.3f} | {r['updates']} | {r['reward_mean']:.4g} | {r['reward_std']:.4g} |")
    if notes:
        out += ["", notes]
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4))
    means = [statistics.fmean([r["after"] for r in rows if r["method"] == m]) for m in methods]
    sds = [statistics.stdev(v) if len(v := [r["after"] for r in rows if r["method"] == m]) > 1 else 0 for m in methods]
    ax.bar(methods, means, yerr=sds, capsize=3)
    base = statistics.fmean([r["before"] for r in rows])
    ax.axhline(base, color="gray", ls="--", label="warm start")
    ax.set(ylabel="held-out accuracy (greedy)", title="accuracy per method (mean ± std over seeds)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=100)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    pts = sorted((FIXED_ALPHA[r["method"]], r["mismatch"], r["top1"]) for r in rows if r["method"] in FIXED_ALPHA)
    if pts:
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o")
    axes[0].set(xlabel="alpha", ylabel="mean per-token KL", title="mismatch vs alpha")
    axes[1].set(xlabel="alpha", ylabel="top-1 disagreement", title="top-1 disagreement vs alpha")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "mismatch_vs_alpha.png"))
    fig.savefig(paths[-1], dpi=100)
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        if r["method"] == "atesd":
            ax.plot(range(1, len(r["alphas"]) + 1), r["alphas"], label=f"seed {r['seed']}")
    ax.set(xlabel="step", ylabel="alpha", ylim=(0, 1), title="ATESD alpha trajectories")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "alpha_trajectories.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close("all")
    return paths
