#!/usr/bin/env python
"""Chaos resume (issue 7): SIGKILL a training run at seeded-random moments, some of them inside
a checkpoint save, auto-resume after every kill, and check that the run ends exactly where an
uninterrupted run of the same command ends.

    python tools/chaos_resume.py --kills 20 --seed 0 --workdir /tmp/chaos --world 1 --iters 30

1. Reference: the tiny config runs uninterrupted into WORKDIR/A.
2. Chaos: the same command runs into WORKDIR/B; the process tree is SIGKILLed (stopped first,
   so every rank dies at the same moment) K times and the unchanged command is started again
   after each kill: the trainer resumes from the tracker file (auto-resume) until the run ends.
   Kill moments come from --seed; there are three kinds:
   * ``save``: armed near a chosen save, fired a random fraction of a measured save duration
     after a fresh ``iter_*.tmp`` directory appears under the run directory;
   * ``step``: a random moment inside the step after a chosen step has been logged;
   * ``startup``: a random moment within one reference start-up time of the launch (imports,
     checkpoint load, held-out eval; or the first steps when this start-up was quicker).
   A kill planned while the last checkpoint already exists becomes a ``startup`` kill; when
   too few kills have landed inside a save for --min-save-kills, the remaining ones become
   ``save`` kills.
   After each kill the run directory is inspected: a kill landed *inside a save* when the save it
   interrupted is not the one the tracker names (its ``.tmp`` is still there, or it was renamed
   but the tracker was not yet updated). The tracker must always name a complete checkpoint.
3. Comparison, bitwise (tools/compare_runs.py, also a command of its own): metrics.jsonl (final
   pass: the last record of each step, since a killed launch may have logged steps after its last
   checkpoint that the resumed launch re-ran; superseded records must equal the final ones), every
   byte of the final checkpoint (model, teacher, optimizer, trainer state, RNG files) and eval.json.

Prints a summary and exits 1 on any mismatch, a failed launch (a resume that does not start is a
finding) or fewer kills inside a save than --min-save-kills; exits 2 on bad arguments.
Extra trainer flags go after ``--`` (they are passed to both runs). The bad-input table of
docs/RELIABILITY.md comes from tools/bad_inputs.py."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from atesd_mc.checkpoint import iter_dir, read_tracker  # noqa: E402  (CheckpointError is a RuntimeError)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_runs import compare_checkpoints, compare_eval, compare_metrics, read_metrics  # noqa: E402,F401 (tests use read_metrics here)

_ITER = re.compile(r"^iter_(\d{7})(\.tmp)?$")


# ------------------------------------------------------------------------------------------------
# The command


def trainer_command(run_dir: str, cache_dir: str, *, iters: int, world: int, save_interval: int,
                    warm_start_iters: int, seed: int, extra: list[str] = ()) -> list[str]:
    """The tiny config, small enough for CPU: the same command for both runs and every resume."""
    cli = [os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config",
           os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--num-layers", "2", "--hidden-size",
           "64", "--ffn-hidden-size", "128", "--kv-channels", "16", "--seq-length", "160",
           "--train-iters", str(iters), "--warm-start-iters", str(warm_start_iters),
           "--synthetic-train-size", "600", "--synthetic-eval-size", "8", "--probe-size", "4",
           "--global-batch-size", "8", "--micro-batch-size", "4", "--max-new-tokens", "12",
           "--seed", str(seed), "--save-interval", str(save_interval), "--log-interval", "1",
           "--save", run_dir, "--cache-dir", cache_dir, "--no-tensorboard", "--no-progress-bar",
           *extra]
    if world == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", *cli]


def child_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launched process, its process group and every descendant (torchrun starts its
    workers in sessions of their own, so the group alone would miss them). Everything is stopped
    first so that all ranks die at the same moment."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.suspend()
        except psutil.Error:
            pass
    try:
        procs += [p for p in psutil.Process(proc.pid).children(recursive=True) if p not in procs]
    except psutil.Error:
        pass
    groups = {proc.pid}  # start_new_session=True: the launch's group id is its pid
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    for g in groups:
        if g == proc.pid or g in {p.pid for p in procs}:  # only groups of processes we started
            try:
                os.killpg(g, signal.SIGKILL)
            except OSError:
                pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


# ------------------------------------------------------------------------------------------------
# Watching a run directory


def _scan(run_dir: str) -> dict[str, tuple[int, int]]:
    """name -> (inode, ctime_ns) of the iter_* / iter_*.tmp directories."""
    out = {}
    try:
        with os.scandir(run_dir) as it:
            for e in it:
                if _ITER.match(e.name):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    out[e.name] = (st.st_ino, st.st_ctime_ns)
    except FileNotFoundError:
        pass
    return out


def _tracker_or_none(run_dir: str) -> int | None:
    """The tracker's step; None when absent or unreadable (checkpoint_problems reports the latter)."""
    try:
        return read_tracker(run_dir)
    except (RuntimeError, OSError):
        return None


def checkpoint_problems(run_dir: str, world: int) -> list[str]:
    """What is wrong with the checkpoint the tracker names (empty: complete)."""
    try:
        step = read_tracker(run_dir)
    except RuntimeError as e:
        return [str(e)]
    if step is None:
        return []
    path = iter_dir(run_dir, step)
    if not os.path.isdir(path):
        return [f"tracker names iteration {step} but {path} is missing"]
    need = ["metadata.json", ".metadata", "common.pt", "trainer_state.pt"] + \
        [f"rng_rank{r}.pt" for r in range(world)]
    bad = [f"{path}/{n} missing" for n in need if not os.path.exists(os.path.join(path, n))]
    if not any(n.endswith(".distcp") for n in os.listdir(path)):
        bad.append(f"{path}: no .distcp shard")
    return bad


class MetricsTail:
    """Steps logged to metrics.jsonl since a launch started (the file is appended on resume and
    truncated by a fresh start)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.buf = b""
        self.steps: list[tuple[float, int]] = []  # (time seen, step)

    def poll(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return
        if size < self.offset:  # a fresh start truncated the file
            self.offset, self.buf = 0, b""
        if size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        now = time.monotonic()
        for line in lines:
            try:
                self.steps.append((now, int(json.loads(line)["step"])))
            except (ValueError, KeyError, TypeError):
                pass

    @property
    def last_step(self) -> int:
        return self.steps[-1][1] if self.steps else 0


# ------------------------------------------------------------------------------------------------
# One launch


@dataclass
class Kill:
    kind: str  # save | step | startup
    target: int  # save: the iteration whose save is aimed at; step: kill after this step; startup: 0
    frac: float  # where inside the save / step / start-up window
    # filled in after the kill
    launch: int = -1
    at: str = ""
    inside_save: bool = False
    interrupted: str = ""
    tracker_after: int | None = None


@dataclass
class Launch:
    index: int
    rc: int | None = None
    killed: bool = False
    checkpoint_at_start: int | None = None  # the tracker when the launch started
    resumed_from: int | None = None  # what the launch printed ("resumed from ... at iteration N")
    seconds: float = 0.0
    first_step_s: float | None = None
    step_times: list = field(default_factory=list)
    save_times: list = field(default_factory=list)
    log: str = ""


def _save_target_reached(kill: Kill, last_step: int, interval: int) -> bool:
    """Armed once the save before the target is behind (a save of t follows the log of step t)."""
    return last_step > kill.target - max(interval, 1)


def run_launch(cmd: list[str], run_dir: str, log_path: str, env: dict, index: int, world: int, *,
               kill: Kill | None, est: dict, timeout: float, save_interval: int, iters: int) -> Launch:
    """Start the command; watch metrics and saves; fire `kill` when its moment comes."""
    launch = Launch(index=index, log=log_path)
    os.makedirs(run_dir, exist_ok=True)
    launch.checkpoint_at_start = _tracker_or_none(run_dir)
    stale = _scan(run_dir)
    tail = MetricsTail(os.path.join(run_dir, "metrics.jsonl"))
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(run_dir),
                                start_new_session=True)
    saving: dict[str, float] = {}  # fresh .tmp name -> when first seen
    fire_at: float | None = None
    fired_in: str | None = None
    if kill is not None and kill.kind == "startup":
        fire_at = start + kill.frac * est["startup"]
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                launch.rc = rc
                break
            now = time.monotonic()
            if now - start > timeout:
                kill_tree(proc)
                launch.rc = -9
                launch.log += " (timed out)"
                break
            tail.poll()
            dirs = _scan(run_dir)
            fresh = {n for n, s in dirs.items() if n.endswith(".tmp") and stale.get(n) != s}
            for n in fresh:
                saving.setdefault(n, now)
            for n in list(saving):
                if n not in fresh:
                    launch.save_times.append(now - saving.pop(n))
            if kill is not None and fire_at is None:
                if kill.kind == "step" and tail.last_step >= kill.target:
                    fire_at = now + kill.frac * est["step"]
                elif kill.kind == "save" and saving and _save_target_reached(kill, tail.last_step, save_interval):
                    fired_in = max(saving)
                    fire_at = saving[fired_in] + kill.frac * est["save"]
                elif kill.kind == "save" and tail.last_step >= iters and _tracker_or_none(run_dir) == iters:
                    # the last save is over: no save is left to aim at, kill where we are
                    fire_at = now
            if kill is not None and kill.kind == "save" and fire_at is not None and fired_in is not None \
                    and fired_in not in saving and now < fire_at:
                # that save finished before its moment came: aim at the next one, earlier inside it
                fire_at, fired_in = None, None
                kill.frac *= 0.5
            if fire_at is not None and now >= fire_at:
                kill_tree(proc)
                launch.killed, launch.rc = True, -9
                break
            armed = kill is not None and (kill.kind == "save" and _save_target_reached(
                kill, tail.last_step, save_interval) or fire_at is not None)
            time.sleep(0.002 if armed else 0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    launch.seconds = time.monotonic() - start
    tail.poll()
    if tail.steps:
        launch.first_step_s = tail.steps[0][0] - start
        launch.step_times = [b[0] - a[0] for a, b in zip(tail.steps, tail.steps[1:])]
    text = open(log_path, errors="replace").read()
    m = re.search(r"resumed from .* at iteration (\d+)", text)
    launch.resumed_from = int(m.group(1)) if m else None
    if kill is not None and launch.killed:
        kill.launch = index
        kill.at = f"after step {tail.last_step} of this launch" if tail.steps else "before the first step"
        _classify(kill, run_dir, stale)
    return launch


def _classify(kill: Kill, run_dir: str, stale: dict) -> None:
    """Did the kill interrupt a save? A .tmp written by this launch is still there (killed before
    the rename), or an iter dir of this launch is newer than the tracker (killed before the
    tracker was updated)."""
    tracker = _tracker_or_none(run_dir)
    kill.tracker_after = tracker
    for name, stat in sorted(_scan(run_dir).items()):
        if stale.get(name) == stat:
            continue  # there before this launch started, untouched
        step = int(_ITER.match(name).group(1))
        if name.endswith(".tmp"):
            kill.inside_save, kill.interrupted = True, f"save of iteration {step} (before the rename)"
        elif tracker is None or step > tracker:
            kill.inside_save, kill.interrupted = True, f"save of iteration {step} (before the tracker update)"


# ------------------------------------------------------------------------------------------------
# The experiment


def plan_kills(k: int, rng: random.Random, iters: int, save_interval: int, min_save: int) -> list[Kill]:
    """K kills spread over the run (targets sorted); a share of them aimed at saves."""
    saves = sorted({s for s in range(save_interval, iters + 1, save_interval)} | {iters}) if save_interval \
        else [iters]
    n_save = min(k, max(min_save + 1 if k > min_save else min_save, round(0.4 * k)))
    n_startup = min(k - n_save, round(0.1 * k))
    kinds = ["save"] * n_save + ["startup"] * n_startup + ["step"] * (k - n_save - n_startup)
    rng.shuffle(kinds)
    # progress targets: one draw in each of K equal strata of steps 1..N-1 (so the run moves on
    # between kills), mapped to the next save for save kills
    span = max(iters - 1, 1)
    points = []
    for i in range(k):
        lo = 1 + (i * span) // k
        points.append(rng.randint(lo, max(lo, ((i + 1) * span) // k)))
    plan = []
    for kind, p in zip(kinds, points):
        if kind == "save":
            target = next(s for s in saves if s >= p)
            frac = rng.uniform(0.0, 0.9)
        elif kind == "step":
            target, frac = p, rng.uniform(0.0, 1.0)
        else:
            target, frac = 0, rng.uniform(0.3, 1.0)
        plan.append(Kill(kind=kind, target=target, frac=frac))
    return plan


def source_digest() -> str:
    """sha256 of the trainer's Python sources: A and B must run the same code."""
    import hashlib

    h = hashlib.sha256()
    paths = [os.path.join(ROOT, "tools", "pretrain_atesd.py")]
    for sub in ("atesd_mc", "kernels"):
        for d, _, files in sorted(os.walk(os.path.join(ROOT, sub))):
            paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    for path in paths:
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _median(xs: list[float], default: float) -> float:
    return statistics.median(xs) if xs else default


def chaos(args) -> dict:
    workdir = os.path.abspath(args.workdir)
    a_dir, b_dir = os.path.join(workdir, "A"), os.path.join(workdir, "B")
    cache = os.path.join(workdir, "cache")
    for d in (a_dir, b_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = child_env(args.threads)
    common = dict(iters=args.iters, world=args.world, save_interval=args.save_interval,
                  warm_start_iters=args.warm_start_iters, seed=args.train_seed, extra=args.extra)
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    t0 = time.monotonic()
    summary: dict = {"kills_requested": args.kills, "seed": args.seed, "world": args.world,
                     "iters": args.iters, "save_interval": args.save_interval, "problems": []}

    digest = source_digest()
    # 1. the reference
    say(f"[chaos] reference run into {a_dir}")
    ref = run_launch(trainer_command(a_dir, cache, **common), a_dir, os.path.join(workdir, "logs", "A.log"),
                     env, 0, args.world, kill=None, est={}, timeout=args.launch_timeout,
                     save_interval=args.save_interval, iters=args.iters)
    summary["reference_seconds"] = round(ref.seconds, 1)
    if ref.rc != 0:
        summary["problems"].append(f"reference run failed (rc {ref.rc}); see {ref.log}")
        summary["ok"] = False
        return summary
    est = {"startup": ref.first_step_s or 10.0, "step": _median(ref.step_times, 1.0),
           "save": _median(ref.save_times, 0.0)}
    summary["estimates_s"] = {k: round(v, 3) for k, v in est.items()}
    say(f"[chaos] reference: {ref.seconds:.1f} s; start-up {est['startup']:.1f} s, step {est['step']:.2f} s, "
        f"save {est['save'] * 1000:.0f} ms ({len(ref.save_times)} saves seen)")

    # 2. the chaos run
    rng = random.Random(args.seed)
    min_save = args.min_save_kills if args.min_save_kills is not None else min(3, args.kills)
    plan = plan_kills(args.kills, rng, args.iters, args.save_interval, min_save)
    cmd = trainer_command(b_dir, cache, **common)
    launches: list[Launch] = []
    done: list[Kill] = []
    while True:
        kill = plan[len(done)] if len(done) < len(plan) else None
        if kill is not None:
            landed = sum(k.inside_save for k in done)
            left = len(plan) - len(done)
            if kill.kind != "save" and min_save - landed >= left:
                kill.kind, kill.frac = "save", rng.uniform(0.0, 0.5)  # make sure enough land in saves
                kill.target = max(kill.target, 1)
            if _tracker_or_none(b_dir) == args.iters and kill.kind != "startup":
                kill.kind, kill.target = "startup", 0  # the last checkpoint exists: no save is left
        idx = len(launches) + 1
        launch = run_launch(cmd, b_dir, os.path.join(workdir, "logs", f"B{idx:02d}.log"), env, idx,
                            args.world, kill=kill, est=est, timeout=args.launch_timeout,
                            save_interval=args.save_interval, iters=args.iters)
        launches.append(launch)
        if launch.killed:
            done.append(kill)
            bad = checkpoint_problems(b_dir, args.world)
            where = f"inside the {kill.interrupted}" if kill.inside_save else kill.at
            say(f"[chaos] kill {len(done)}/{len(plan)} ({kill.kind}): launch {idx} "
                f"(resumed from {launch.resumed_from}) killed {where}; tracker -> {kill.tracker_after}")
            if bad:
                summary["problems"].append(f"after kill {len(done)}: " + "; ".join(bad))
            continue
        if launch.rc != 0:
            tail = open(launch.log, errors="replace").read().strip().splitlines()[-3:]
            summary["problems"].append(f"launch {idx} exited {launch.rc} (resume failed?): {' | '.join(tail)} "
                                       f"(log {launch.log})")
            break
        say(f"[chaos] launch {idx} (resumed from {launch.resumed_from}) finished the run")
        break
    kills_inside = sum(k.inside_save for k in done)
    summary.update(kills=len(done), kills_inside_save=kills_inside,
                   kills_by_kind={kind: sum(k.kind == kind for k in done) for kind in ("save", "step", "startup")},
                   launches=len(launches),
                   resumes=sum(x.checkpoint_at_start is not None for x in launches),
                   resumes_confirmed=sum(x.resumed_from is not None for x in launches),
                   fresh_starts=sum(x.checkpoint_at_start is None for x in launches),
                   chaos_seconds=round(sum(x.seconds for x in launches), 1),
                   kill_log=[{"launch": k.launch, "kind": k.kind, "target": k.target, "at": k.at,
                              "inside_save": k.inside_save, "interrupted": k.interrupted,
                              "tracker_after": k.tracker_after} for k in done])
    if len(done) < args.kills:
        summary["problems"].append(f"only {len(done)} of {args.kills} kills fired (the run ended first)")
    if kills_inside < min_save:
        summary["problems"].append(f"only {kills_inside} kills landed inside a save (need {min_save})")
    if launches and launches[-1].rc == 0:
        # 3. the comparison
        m = compare_metrics(os.path.join(a_dir, "metrics.jsonl"), os.path.join(b_dir, "metrics.jsonl"),
                            args.iters)
        summary["metrics"] = {k: v for k, v in m.items() if k != "problems"}
        summary["problems"] += m["problems"]
        c = compare_checkpoints(a_dir, b_dir, os.path.join(workdir, "scratch"))
        summary["checkpoint"] = c
        if not c["all_equal"]:
            summary["problems"].append(f"final checkpoints differ: steps {c['a_step']}/{c['b_step']}, "
                                       f"entries {c['differ'][:5]}, one side only {c['only_one_side'][:5]}")
        summary["problems"] += compare_eval(a_dir, b_dir)
    if source_digest() != digest:
        summary["problems"].append("the trainer's sources changed during the experiment: A and B ran "
                                   "different code (rerun on a quiet checkout)")
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    summary["ok"] = not summary["problems"]
    return summary


def format_summary(s: dict) -> str:
    m, c = s.get("metrics", {}), s.get("checkpoint", {})
    lines = [
        "chaos resume summary",
        f"  world {s['world']}, {s['iters']} iterations, save interval {s['save_interval']}, seed {s['seed']}",
        f"  kills                : {s.get('kills', 0)} of {s['kills_requested']} "
        f"(by kind: {s.get('kills_by_kind', {})})",
        f"  kills inside a save  : {s.get('kills_inside_save', 0)}",
        f"  launches             : {s.get('launches', 0)} ({s.get('resumes', 0)} resumes from a checkpoint, "
        f"{s.get('resumes_confirmed', 0)} of them got as far as 'resumed from'; "
        f"{s.get('fresh_starts', 0)} fresh starts)",
        f"  steps compared       : {m.get('steps_compared', 0)} (B: {m.get('b_lines', 0)} metric lines, "
        f"{m.get('b_rerun_steps', 0)} steps re-run after a kill, {m.get('b_torn_lines', 0)} torn lines)",
        f"  max |dloss|          : {m.get('max_abs_dloss', float('nan'))!r}; steps differing "
        f"{len(m.get('steps_differ', []))}, alphas differing {len(m.get('alpha_differ', []))}",
        f"  weights bitwise equal: {'yes' if c.get('weights_equal') else 'no'} "
        f"({c.get('weight_tensors', 0)} model/teacher tensors at iteration {c.get('b_step')})",
        f"  checkpoint equal     : {'yes' if c.get('all_equal') else 'no'} ({c.get('entries', 0)} entries: "
        f"weights, optimizer, schedule, sampler, controller, RNG)",
        f"  time                 : reference {s.get('reference_seconds')} s, chaos {s.get('chaos_seconds')} s, "
        f"total {s.get('total_seconds')} s",
    ]
    lines += [f"  PROBLEM: {p}" for p in s["problems"]]
    lines.append("  result: " + ("OK (bitwise identical)" if s["ok"] else "MISMATCH / FAILURE"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5, help="K: SIGKILLs of the chaos run (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--workdir", required=True, help="where A/, B/, cache/ and logs/ go (A and B are wiped)")
    p.add_argument("--world", type=int, default=1, choices=(1, 2),
                   help="1 = one process; 2 = torchrun --standalone --nproc_per_node=2")
    p.add_argument("--iters", type=int, default=30, help="--train-iters of both runs (default 30)")
    p.add_argument("--save-interval", type=int, default=2, help="--save-interval (default 2)")
    p.add_argument("--warm-start-iters", type=int, default=0, help="--warm-start-iters (default 0)")
    p.add_argument("--train-seed", type=int, default=1234, help="--seed of the trainer (default 1234)")
    p.add_argument("--min-save-kills", type=int, default=None,
                   help="fail unless this many kills land inside a save (default min(3, K))")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainer (default 1)")
    p.add_argument("--launch-timeout", type=float, default=900, help="seconds one launch may take")
    p.add_argument("--json", default="", help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("extra", nargs="*", help="after --: more trainer flags, passed to both runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kills < 0 or args.iters < 2 or args.save_interval < 0:
        print("error: need --kills >= 0, --iters >= 2, --save-interval >= 0", file=sys.stderr)
        return 2
    summary = chaos(args)
    print(format_summary(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
