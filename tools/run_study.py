"""Run the study: every method x seed from the same warm start, in parallel, resumable.

    python tools/run_study.py --config examples/study_arith.yaml --seeds 3 [--jobs 2] [--out study]

Finished runs (eval.json present) are not rerun; interrupted ones resume from their checkpoint.
Writes OUT/results.csv, OUT/RESULTS.md and plots (accuracy, mismatch vs alpha, alpha trajectories).
Extra arguments after `--` go to every run (e.g. `-- --train-iters 2`)."""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time")
    p.add_argument("--out", default="study")
    p.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    p.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    return p.parse_args(argv)


def run_command(args, method: str, seed: int, flags: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config", args.config,
            "--seed", str(seed), "--save", os.path.join(args.out, "runs", f"{method}-s{seed}"),
            "--cache-dir", os.path.join(args.out, "cache"), "--no-tensorboard", "--no-progress-bar",
            *flags, *args.extra]


def main(argv=None) -> int:
    from atesd_mc.study import METHODS, plots, read_run, results_markdown, write_csv

    args = parse(argv)
    methods = [m for m in (args.methods.split(",") if args.methods else METHODS) if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    # Method-major order: the first job of each seed trains that seed's shared warm start (later
    # jobs of the seed wait on its lock), so the warm starts of different seeds run side by side.
    todo = [(m, s) for m in methods for s in range(args.seeds)
            if read_run(os.path.join(args.out, "runs", f"{m}-s{s}")) is None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start, running, failed = time.time(), [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, s = todo.pop(0)
            log = open(os.path.join(args.out, "logs", f"{m}-s{s}.log"), "w")
            running.append((m, s, subprocess.Popen(run_command(args, m, s, METHODS[m]), stdout=log,
                                                   stderr=subprocess.STDOUT, env=env), log))
            print(f"[{time.time() - start:6.0f}s] started {m} seed {s}", flush=True)
        time.sleep(1)
        for item in list(running):
            m, s, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see logs/{m}-s{s}.log)"
                if proc.returncode:
                    failed.append(f"{m}-s{s}")
                print(f"[{time.time() - start:6.0f}s] {status}: {m} seed {s}", flush=True)
    rows = []
    for s in range(args.seeds):
        for m in methods:
            r = read_run(os.path.join(args.out, "runs", f"{m}-s{s}"))
            if r is not None:
                rows.append({"method": m, "seed": s, **r})
    if not rows:
        print("error: no finished runs", file=sys.stderr)
        return 1
    write_csv(rows, os.path.join(args.out, "results.csv"))
    command = " ".join(["python", "tools/run_study.py", "--config", args.config, "--seeds", str(args.seeds)]
                       + (["--", *args.extra] if args.extra else []))
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(results_markdown(rows, command, time.time() - start))
    for p in plots(rows, args.out):
        print(f"wrote {p}")
    print(f"wrote {args.out}/results.csv and {args.out}/RESULTS.md ({len(rows)} runs, {len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
