"""RESULTS.md and the plots of a study, from the runs' summaries (atesd_mc.study.read_run) and the
per-seed teacher checks (tools/check_teacher.py --json). Every number in the text comes from them."""
from __future__ import annotations

import math
import os
import statistics

from atesd_mc.study import FAMILIES, FIXED_ALPHA, METHODS, _mean, bootstrap_ci, paired


def _pct(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "n/a"


def _ms(vals) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.fmean(vals):.1f} ± {100 * sd:.1f}"


def _ci(vals) -> str:
    lo, hi = bootstrap_ci(vals)
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _f(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def teacher_section(checks: dict[int, dict]) -> list[str]:
    out = ["## Test bed: does the exposed teacher know what the student does not?", "",
           "`tools/check_teacher.py --split val` on each seed's warm start (before any distillation): greedy "
           "accuracy from the student prompt and from the teacher prompt at alpha 0 / .5 / 1, and on the "
           "student's own sampled rollouts the probability of the true value where a rollout writes a novel "
           "fact (target: teacher >= 0.8 at alpha .5 on every seed).", "",
           "| seed | n | student acc | teacher acc a=0 / .5 / 1 | p(true novel): teacher a=.5 | student | "
           "KL(T‖S) a=0 / .25 / .5 / .75 / 1 |", "|---|---|---|---|---|---|---|"]
    for seed, c in sorted(checks.items()):
        rows = {r["who"]: r for r in c["rows"]}
        t = [rows.get(f"teacher alpha={a:g}", {}) for a in (0, 0.25, 0.5, 0.75, 1)]
        out.append(f"| {seed} | {c['n']} | {_f(rows['student']['accuracy'], 2)} | "
                   f"{' / '.join(_f(t[i].get('accuracy', math.nan), 2) for i in (0, 2, 4))} | "
                   f"{_f(t[2].get('p_novel_teacher', math.nan))} | {_f(t[2].get('p_novel_student', math.nan))} | "
                   f"{' / '.join(_f(x.get('kl', math.nan)) for x in t)} |")
    return out


def pilot_section(pilots: dict[str, dict]) -> list[str]:
    """Runs named pilot-* in OUT/runs: the test bed's own settings, chosen before the study on the
    validation split (their test numbers are not shown)."""
    out = ["## Pilot runs: the test bed's settings, chosen on the validation split", "",
           "| run | val before | val after | prior-skill before | prior-skill after | seconds |", "|---|---|---|---|---|---|"]
    for name, r in sorted(pilots.items()):
        out.append(f"| {name} | {_pct(r['val_before'])} | {_pct(r['val_after'])} | {_pct(r['prior_before'])} | "
                   f"{_pct(r['retention'])} | {r['seconds']:.0f} |")
    return out


def main_table(rows: list[dict], methods: list[str]) -> list[str]:
    out = ["## Accuracy per method (test split, greedy, %)", "",
           "Mean ± std over seeds and the bootstrap 95% CI of the mean (resampling seeds). Retention: "
           "accuracy on the prior-skill split (known facts only) after training; before it: the warm start.",
           "", "| method | test after | 95% CI | val after | retention (prior after) | prior before | "
           "test before | mean KL | top-1 disagree |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        out.append(f"| {m} | {_ms([r['after'] for r in rs])} | {_ci([r['after'] for r in rs])} | "
                   f"{_ms([r['val_after'] for r in rs])} | {_ms([r['retention'] for r in rs])} | "
                   f"{_ms([r['prior_before'] for r in rs])} | {_ms([r['before'] for r in rs])} | "
                   f"{_f(_mean(r['mismatch'] for r in rs), 4)} | {_f(_mean(r['top1'] for r in rs), 4)} |")
    return out


def per_seed_table(rows: list[dict], methods: list[str], seeds: list[int], key: str, title: str) -> list[str]:
    out = [f"## Per seed: {title} (%)", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|" + "---|" * len(seeds)]
    by = {(r["method"], r["seed"]): r for r in rows}
    first = {s: next((r for r in rows if r["seed"] == s), None) for s in seeds}
    if key in ("after", "val_after", "retention"):
        before = {"after": "before", "val_after": "val_before", "retention": "prior_before"}[key]
        out.append("| warm start (before) | " + " | ".join(_pct(first[s][before]) if first[s] else "" for s in seeds)
                   + " |")
    for m in methods:
        out.append(f"| {m} | " + " | ".join(_pct(by[(m, s)][key]) if (m, s) in by else "" for s in seeds) + " |")
    return out


def controller_section(rows: list[dict]) -> list[str]:
    out = ["## Controller: what it saw and what it learned", "",
           "Per ATESD run: REINFORCE updates and the decisions they scored; corr(adv, t): the correlation of "
           "the advantage with the decision's step inside each update, averaged over updates (near -1: the "
           "advantage mostly says *when* a decision was made; near 0: it does not); corr(reward, t): the raw "
           "reward against the decision's step over the whole run (the trend); the Beta policy's mean and standard deviation at the first and the last "
           "step; alpha over the first and the last 20% of steps; corr(alpha, detrended reward): the chosen alpha "
           "against its reward minus the run's linear trend (near 0: the reward holds no information about alpha "
           "for the policy to learn from).", "",
           "| run | updates | scored decisions | corr(adv, t) | corr(reward, t) | corr(alpha, detrended reward) | "
           "policy mean start -> end | policy std start -> end | alpha first 20% -> last 20% |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"].startswith("atesd"):
            out.append(f"| {r['method']} s{r['seed']} | {r['updates']} | {r['scored_decisions']} | "
                       f"{_f(r['adv_time_corr'], 2)} | {_f(r['reward_time_corr'], 2)} | "
                       f"{_f(r['alpha_reward_corr'], 2)} | {_f(r['policy_mean_start'])} -> {_f(r['policy_mean_end'])} | "
                       f"{_f(r['policy_std_start'])} -> {_f(r['policy_std_end'])} | "
                       f"{_f(r['alpha_first'])} -> {_f(r['alpha_last'])} |")
    out += ["", "| variant | mean corr(adv, t) | mean corr(reward, t) | mean corr(alpha, detrended reward) | "
            "policy mean end (mean over seeds) | policy std end |", "|---|---|---|---|---|---|"]
    for m in FAMILIES["ATESD"]:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            out.append(f"| {m} | {_f(_mean(r['adv_time_corr'] for r in rs), 2)} | "
                       f"{_f(_mean(r['reward_time_corr'] for r in rs), 2)} | "
                       f"{_f(_mean(r['alpha_reward_corr'] for r in rs), 2)} | "
                       f"{_f(_mean(r['policy_mean_end'] for r in rs))} | {_f(_mean(r['policy_std_end'] for r in rs))} |")
    return out


def _diff_line(d: dict) -> str:
    what = f"{d['a']} - {d['b']}" + (" (retention)" if d["key"] == "retention" else "")
    return (f"| {what} | {' / '.join(f'{100 * x:+.1f}' for x in d['diffs'])} | "
            f"{100 * d['mean']:+.1f} | [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] |"
            if d["diffs"] else f"| {what} | (no common seeds) | | |")


def findings(rows: list[dict], chosen: dict[str, str], diffs: list[dict]) -> list[str]:
    """The choices made on validation and the paired differences on test."""
    out = ["## Choices made on the validation split", ""]
    for family, members in FAMILIES.items():
        vals = ", ".join(f"{m} {_pct(_mean(r['val_after'] for r in rows if r['method'] == m))}" for m in members
                         if any(r["method"] == m for r in rows))
        out.append(f"- {family}: **{chosen.get(family, 'n/a')}** (mean validation accuracy: {vals})")
    out += ["", "## Paired differences on the test split (percentage points)", "",
            "Per seed (same warm start, data and budget), mean, and bootstrap 95% CI over seeds (10,000 resamples; "
            "with 5 seeds the percentile interval is narrow-biased, so read it with the per-seed values).", "",
            "| difference | per seed | mean | 95% CI |", "|---|---|---|---|"]
    return out + [_diff_line(d) for d in diffs]


def paper_findings(rows, checks, chosen, diffs) -> list[str]:
    best_fixed, best_atesd = chosen.get("fixed alpha"), chosen.get("ATESD")
    by_pair = {(d["a"], d["b"]): d for d in diffs}
    kl = [_mean(next((r.get("kl", math.nan) for r in c["rows"] if r["who"] == f"teacher alpha={a:g}"), math.nan)
                for c in checks.values()) for a in (0, 0.25, 0.5, 0.75, 1)]
    run_kl = [(a, _mean(r["mismatch"] for r in rows if r["method"] == m)) for m, a in sorted(FIXED_ALPHA.items(),
                                                                                            key=lambda x: x[1])]
    rises = all(b >= a for a, b in zip(kl, kl[1:])) if all(map(math.isfinite, kl)) else None
    out = ["## The paper's findings on this test bed", ""]
    verdict = ("reproduced" if rises else "n/a" if rises is None else
               "partly reproduced (higher at alpha 1 than at 0, not rising at every step)" if kl[-1] > kl[0]
               else "not reproduced")
    out.append(f"1. Mismatch rises with alpha: **{verdict}**"
               f" on the warm starts' rollouts (mean KL over seeds at alpha 0 / .25 / .5 / .75 / 1: "
               f"{' / '.join(_f(x) for x in kl)}); during training (fixed-alpha runs, mean over steps and seeds): "
               f"{' / '.join(_f(v) for _, v in run_kl)}.")
    if best_fixed:
        a = FIXED_ALPHA[best_fixed]
        d = paired(rows, best_fixed, "opsd")
        out.append(f"2. Best fixed alpha < 1: **{'reproduced' if a < 1 else 'not reproduced'}**: chosen on validation: "
                   f"alpha {a:g} ({best_fixed}); on test it is {100 * d['mean']:+.1f} points vs alpha 1 "
                   f"(CI [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]).")
    r1, r2 = by_pair.get(("random", best_fixed)), by_pair.get((best_atesd, "random"))
    if r1 and r2:
        ok = r1["mean"] < 0 and r2["mean"] > 0
        sig = r1["hi"] < 0 and r2["lo"] > 0
        out.append(f"3. Random alpha below both: **{'reproduced' if ok and sig else 'direction only (CI includes 0)' if ok else 'not reproduced'}**:"
                   f" random - best fixed {100 * r1['mean']:+.1f} [{100 * r1['lo']:+.1f}, {100 * r1['hi']:+.1f}], "
                   f"ATESD - random {100 * r2['mean']:+.1f} [{100 * r2['lo']:+.1f}, {100 * r2['hi']:+.1f}].")
    d = by_pair.get((best_atesd, best_fixed))
    if d:
        verdict = ("reproduced (target met: >= +1 point, CI above 0)" if d["mean"] >= 0.01 and d["lo"] > 0 else
                   "not reproduced: null result (the CI includes 0)" if d["lo"] <= 0 <= d["hi"] else
                   "not reproduced: ATESD is below the best fixed alpha" if d["hi"] < 0 else
                   "direction reproduced, below the +1 point target")
        out.append(f"4. The learned policy beats the best fixed alpha: **{verdict}**: {best_atesd} - {best_fixed} "
                   f"{100 * d['mean']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] on test.")
    rs = [r for r in rows if r["method"] == best_atesd]
    if rs:
        mean_end, std_end = _mean(r["policy_mean_end"] for r in rs), _mean(r["policy_std_end"] for r in rs)
        start = _mean(r["policy_mean_start"] for r in rs)
        drift = 0.7 <= mean_end <= 0.8
        out.append(f"5. The policy drifts toward 0.7-0.8 without collapsing: **{'reproduced' if drift and std_end > 0.05 else 'not reproduced'}**:"
                   f" policy mean {_f(start)} -> {_f(mean_end)} (mean over seeds), Beta std at the end {_f(std_end)}"
                   f" (collapse would be std -> 0).")
    variants = [m for m in FAMILIES["ATESD"] if any(r["method"] == m for r in rows)]
    if variants:
        def avg(m, key):
            return _f(_mean(r[key] for r in rows if r["method"] == m), 2)
        out += ["", "What the controllers had to learn from (mean over seeds; the controller table below has each run): "
                "corr(alpha, reward minus its linear trend in time) per variant: "
                + ", ".join(f"{m} {avg(m, 'alpha_reward_corr')}" for m in variants)
                + "; Beta std of the policy at the end: " + ", ".join(f"{m} {avg(m, 'policy_std_end')}" for m in variants)
                + " (0.219 at the start). A reward that carries information about alpha has a correlation away from 0; "
                "the full reward's includes the teacher-grounded term G_gt, the exposed teacher's log-probability of "
                "the reference, which rises with alpha whether or not the student learns more."]
    return out


def results_markdown(rows: list[dict], checks: dict[int, dict], meta: dict, chosen: dict[str, str],
                     diffs: list[dict], pilots: dict | None = None) -> str:
    """The whole report; `chosen` and `diffs` are study.select's and study.comparisons' (the same ones
    differences.csv is written from)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    head = ["# Study results", "", f"Command: `{meta['command']}`", "",
            f"Runs made by commit {meta['commit']}; this report by commit {meta.get('report_commit', meta['commit'])}. "
            f"Seeds: {seeds}. {len(rows)} runs; wall time of the runs "
            f"(sum over this study's invocations): {meta['elapsed_s'] / 60:.1f} min on {meta['machine']}. "
            "Plots: accuracy.png, mismatch_vs_alpha.png, alpha_trajectories.png. Per-run numbers: results.csv.", ""]
    if meta.get("notes"):
        head += [meta["notes"], ""]
    sel = findings(rows, chosen, diffs)
    body = (head + paper_findings(rows, checks, chosen, diffs) + [""] + teacher_section(checks) + [""]
            + (pilot_section(pilots) + [""] if pilots else [])
            + main_table(rows, methods) + [""] + sel + [""] + controller_section(rows) + [""]
            + per_seed_table(rows, methods, seeds, "after", "test accuracy after") + [""]
            + per_seed_table(rows, methods, seeds, "val_after", "validation accuracy after") + [""]
            + per_seed_table(rows, methods, seeds, "retention", "prior-skill accuracy after (retention)"))
    return "\n".join(body) + "\n"


def plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(12, 4))
    for i, key in enumerate(("after", "retention")):
        vals = [[100 * r[key] for r in rows if r["method"] == m] for m in methods]
        ax.bar([j + 0.4 * i for j in range(len(methods))], [_mean(v) for v in vals], width=0.4,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=2,
               label="test after" if key == "after" else "retention (prior-skill split)")
    ax.axhline(100 * _mean(r["before"] for r in rows), color="gray", ls="--", label="warm start (test)")
    ax.set_xticks([j + 0.2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set(ylabel="accuracy (%)", title="accuracy per method (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=100)
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = sorted((FIXED_ALPHA[r["method"]], r["mismatch"]) for r in rows if r["method"] in FIXED_ALPHA)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    ax.set(xlabel="alpha", ylabel="mean per-token KL during training", title="mismatch vs alpha (fixed alpha)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "mismatch_vs_alpha.png"))
    fig.savefig(paths[-1], dpi=100)
    variants = [m for m in FAMILIES["ATESD"] if any(r["method"] == m for r in rows)] or ["atesd"]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.5 * len(variants), 4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], variants):
        for r in rows:
            if r["method"] == m:
                ax.plot(range(1, len(r["alphas"]) + 1), r["alphas"], lw=0.8, label=f"seed {r['seed']}")
        ax.set(xlabel="step", ylabel="alpha", ylim=(0, 1), title=f"{m}: alpha per step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "alpha_trajectories.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close("all")
    return paths
