"""Run the study: per seed a teacher check (which trains the seed's warm start), then every method
from that warm start; then results.csv, RESULTS.md and plots. Resumable.

    python tools/run_study.py --config examples/study_arith.yaml --seeds 0-4 --out study
    python tools/run_study.py --config examples/study_arith.yaml --seeds 11,12 --methods fixed_0.5,atesd --out /tmp/s

A finished run (eval.json) or teacher check (OUT/teacher/seedS.json) is not redone; an interrupted
run resumes from its last checkpoint (Ctrl-C reaches every run of the process group and each saves one;
a killed run starts over). Rerunning with nothing left to do only rewrites the report, so
the study can be run in chunks (--seeds 0-1, then 2-4): the report covers every finished run in
OUT for the seeds and methods asked, and names the commit(s) that ran them (OUT/invocations.jsonl).
OUT/NOTES.md, if present, is quoted under the header; runs named OUT/runs/pilot-* (settings chosen
before the study) are listed with their validation numbers only.
Each run is one process (world 1, gloo, 1 thread); --jobs at a time. Flags after `--` go to every
run and teacher check (e.g. `-- --train-iters 2`)."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    from atesd_mc.study import DEFAULT_METHODS, METHODS, parse_seeds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", default="0-4", help="a list and/or ranges: 0-4, 11,12, 0-2,7 (default 0-4)")
    p.add_argument("--methods", default="", help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--out", default="study", help="output directory (runs/, cache/, logs/, teacher/, the report)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes at a time")
    p.add_argument("--teacher-n", type=int, default=200, help="validation problems for each seed's teacher check")
    p.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    args = p.parse_args(argv)
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(f"--seeds {args.seeds!r}: {e}")
    args.method_list = [m for m in args.methods.split(",") if m] if args.methods else list(DEFAULT_METHODS)
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return args


def teacher_json(args, seed: int) -> str:
    return os.path.join(args.out, "teacher", f"seed{seed}.json")


def teacher_command(args, seed: int) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", "check_teacher.py"), "--config", args.config,
            "--n", str(args.teacher_n), "--split", "val", "--json", teacher_json(args, seed), "--",
            "--seed", str(seed), "--cache-dir", os.path.join(args.out, "cache"), *args.extra]


def run_command(args, method: str, seed: int) -> list[str]:
    from atesd_mc.study import METHODS

    return [sys.executable, os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config", args.config,
            "--seed", str(seed), "--save", os.path.join(args.out, "runs", f"{method}-s{seed}"),
            "--cache-dir", os.path.join(args.out, "cache"), "--no-tensorboard", "--no-progress-bar",
            *METHODS[method], *args.extra]


def commit(out: str) -> str:
    """HEAD, marked +uncommitted when tracked files outside the study's own output differ from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    rel = os.path.relpath(os.path.abspath(out), ROOT)
    outside = ["."] + ([f":(exclude){rel}"] if not rel.startswith("..") else [])
    return head + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no", "--", *outside) else "")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run_jobs(args, jobs: list[tuple], ready, start: float) -> list[str]:
    """jobs: (name, command); ready(name) says whether a job may start. Returns the failed names."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    todo, running, failed = list(jobs), [], []
    while todo or running:
        startable = [j for j in todo if ready(j[0], failed)]
        while startable and len(running) < args.jobs:
            job = startable.pop(0)
            todo.remove(job)
            log = open(os.path.join(args.out, "logs", f"{job[0]}.log"), "w")
            running.append((job[0], subprocess.Popen(job[1], stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"[{time.time() - start:6.0f}s] started {job[0]}", flush=True)
        if not running and todo and not startable:  # what is left waits on something that failed
            failed += [j[0] for j in todo]
            break
        time.sleep(1)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                if proc.returncode:
                    failed.append(name)
                print(f"[{time.time() - start:6.0f}s] " + ("done" if not proc.returncode else
                      f"FAILED ({proc.returncode}, see {args.out}/logs/{name}.log)") + f": {name}", flush=True)
    return failed


def main(argv=None) -> int:
    from atesd_mc.study import comparisons, read_run, select, write_csv, write_differences
    from atesd_mc.study_report import plots, results_markdown

    args = parse(argv)
    code = commit(args.out)  # the code this invocation runs with (HEAD may move while it runs)
    for sub in ("logs", "teacher", "runs"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    start = time.time()
    jobs = [(f"teacher-s{s}", teacher_command(args, s)) for s in args.seed_list
            if not os.path.exists(teacher_json(args, s))]
    # Seed-major: a seed's runs start once its teacher check has trained (and cached) its warm start.
    jobs += [(f"{m}-s{s}", run_command(args, m, s)) for s in args.seed_list for m in args.method_list
             if read_run(os.path.join(args.out, "runs", f"{m}-s{s}")) is None]

    def ready(name: str, failed: list[str]) -> bool:
        seed = name.rsplit("-s", 1)[1]
        return name.startswith("teacher-") or (os.path.exists(teacher_json(args, int(seed)))
                                               and f"teacher-s{seed}" not in failed)

    failed = run_jobs(args, jobs, ready, start) if jobs else []
    elapsed = time.time() - start
    with open(os.path.join(args.out, "invocations.jsonl"), "a") as f:
        f.write(json.dumps({"commit": code, "argv": sys.argv[1:], "jobs": len(jobs), "failed": failed,
                            "seconds": elapsed, "started": _utc(start), "finished": _utc(time.time())}) + "\n")
    rows = [{"method": m, "seed": s, **r} for s in args.seed_list for m in args.method_list
            if (r := read_run(os.path.join(args.out, "runs", f"{m}-s{s}"))) is not None]
    if not rows:
        print("error: no finished runs", file=sys.stderr)
        return 1
    checks = {}
    for s in args.seed_list:
        if os.path.exists(teacher_json(args, s)):
            with open(teacher_json(args, s)) as f:
                checks[s] = json.load(f)
    with open(os.path.join(args.out, "invocations.jsonl")) as f:
        calls = [json.loads(line) for line in f if line.strip()]
    seeds = ",".join(map(str, args.seed_list))
    meta = {"command": " ".join(["python tools/run_study.py --config", args.config, "--seeds", seeds, "--out", args.out]
                                + (["--methods", args.methods] if args.methods else []) + (["--", *args.extra] if args.extra else [])),
            "commit": ", ".join(dict.fromkeys(c["commit"] for c in calls if c["jobs"])) or code,
            "report_commit": code,
            "elapsed_s": sum(c["seconds"] for c in calls if c["jobs"]),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.jobs} processes at a time"}
    pilots = {d: r for d in sorted(os.listdir(os.path.join(args.out, "runs"))) if d.startswith("pilot-")
              and (r := read_run(os.path.join(args.out, "runs", d))) is not None}
    notes = os.path.join(args.out, "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as f:
            meta["notes"] = f.read().strip()
    write_csv(rows, os.path.join(args.out, "results.csv"))
    chosen = select(rows)
    diffs = comparisons(rows, chosen)
    write_differences(diffs, os.path.join(args.out, "differences.csv"))
    with open(os.path.join(args.out, "RESULTS.md.tmp"), "w") as f:
        f.write(results_markdown(rows, checks, meta, chosen, diffs, pilots))
    os.replace(os.path.join(args.out, "RESULTS.md.tmp"), os.path.join(args.out, "RESULTS.md"))
    for p in plots(rows, args.out):
        print(f"wrote {p}")
    print(f"wrote {args.out}/results.csv, differences.csv and RESULTS.md ({len(rows)} runs, {len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
