"""Run plots: alpha with the Beta policy's mean and 10-90% band, loss, mismatch, probe NLL,
controller reward and held-out accuracy, in one PNG (tools/plot_run.py; written after each run)."""
import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl, keeping the last record of each step (a resumed run re-appends steps)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (not a run directory?)")
    by_step = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not JSON") from None
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def policy_band(records: list[dict]):
    from atesd_mc.exposure.beta_policy import beta_icdf

    steps, mean, lo, hi = [], [], [], []
    for r in records:
        a, b = r.get("beta_a"), r.get("beta_b")
        if a is None or b is None:
            continue
        steps.append(r["step"])
        mean.append(a / (a + b))
        lo.append(beta_icdf(0.1, a, b))
        hi.append(beta_icdf(0.9, a, b))
    return steps, mean, lo, hi


def plot(run_dir: str, output: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    alphas = [r.get("alpha") for r in records]
    if any(a is not None for a in alphas):
        ax.plot(steps, alphas, ".", ms=3, label="alpha (sampled)")
    ps, mean, lo, hi = policy_band(records)
    if ps:
        ax.plot(ps, mean, label="policy mean")
        ax.fill_between(ps, lo, hi, alpha=0.25, label="policy 10-90%")
    ax.set(title="reveal ratio alpha", xlabel="step", ylim=(0, 1))
    ax.legend(fontsize=8)
    for ax, key, title in ((axes[0, 1], "loss", "distillation loss"), (axes[0, 2], "mismatch", "mismatch (KL)"),
                           (axes[1, 0], "probe_nll", "probe NLL"), (axes[1, 1], "reward", "controller reward")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), ".-" if key == "reward" else "-", ms=3)
        ax.set(title=title, xlabel="step")
    ax = axes[1, 2]
    ev_path = os.path.join(run_dir, "eval.json")
    if os.path.exists(ev_path):
        ev = json.load(open(ev_path))
        names = [k for k in ("before", "after") if "accuracy" in ev.get(k, {})]
        ax.bar(names, [ev[k]["accuracy"] for k in names], color=["gray", "tab:blue"][: len(names)])
        for i, k in enumerate(names):
            ax.text(i, ev[k]["accuracy"], f"{ev[k]['accuracy']:.3f}", ha="center", va="bottom")
    ax.set(title="held-out accuracy (greedy)", ylim=(0, 1))
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    return output
