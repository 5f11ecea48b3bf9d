"""Per-stage time of training steps, from run directories' metrics.jsonl, as a markdown table.

    python tools/stage_times.py RUN_DIR [RUN_DIR ...]

One column per run: mean ms per step of each stage (rollout, teacher, student, optimizer, stats),
the step total, the training-loop and warm-start seconds from eval.json, and greedy accuracy."""
import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STAGES = ("rollout", "teacher", "student", "optimizer", "stats")


def summary(run_dir: str) -> dict:
    from atesd_mc.plotting import read_metrics

    recs = [r for r in read_metrics(run_dir) if isinstance(r.get("time"), dict)]
    if not recs:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl: no records with a 'time' field")
    out = {s: 1000 * statistics.fmean(r["time"].get(s, 0.0) for r in recs) for s in STAGES}
    out["step"] = sum(out[s] for s in STAGES)
    ev_path = os.path.join(run_dir, "eval.json")
    ev = json.load(open(ev_path)) if os.path.exists(ev_path) else {}
    out["train_s"] = ev.get("train_seconds", float("nan"))
    out["warm_s"] = ev.get("warm_start", {}).get("seconds", float("nan"))
    out["acc"] = (ev.get("before", {}).get("accuracy"), ev.get("after", {}).get("accuracy"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    cols = [summary(r) for r in args.runs]
    print("| | " + " | ".join(os.path.basename(os.path.normpath(r)) for r in args.runs) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for s in STAGES + ("step",):
        print(f"| {s} ms/step | " + " | ".join(f"{c[s]:.0f}" for c in cols) + " |")
    print("| training loop s | " + " | ".join(f"{c['train_s']:.0f}" for c in cols) + " |")
    print("| warm start s | " + " | ".join(f"{c['warm_s']:.0f}" for c in cols) + " |")
    print("| greedy accuracy before -> after | "
          + " | ".join(f"{c['acc'][0]} -> {c['acc'][1]}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
