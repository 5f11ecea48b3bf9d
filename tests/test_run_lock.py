"""Issue 17, item 6: a run directory belongs to one run.

* rank 0 holds an exclusive lock on --save for its lifetime; a second launch exits 2 with one line
  naming the holder (host, pid) and writes nothing; a lock left by a dead process never blocks;
* torchrun workers end within 30 s of a SIGKILL of their launcher, and a relaunch on the same
  --save ends with the metrics of an uninterrupted run;
* a finished run relaunched says so, exits 0 and leaves its directory (eval.json) as it was."""
import importlib.util
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil

from harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("chaos_resume", os.path.join(ROOT, "tools", "chaos_resume.py"))
chaos = sys.modules.setdefault("chaos_resume", importlib.util.module_from_spec(_spec))
if not hasattr(chaos, "chaos"):
    _spec.loader.exec_module(chaos)

ITERS = 10  # the run is stopped after step 2: steps to spare before it could end on its own
HOST = socket.gethostname()


def _command(run, cache, world):
    """tools/chaos_resume.py's tiny config, a checkpoint every step."""
    return chaos.trainer_command(str(run), str(cache), iters=ITERS, world=world, save_interval=1,
                                 warm_start_iters=0, seed=1234)


def _snapshot(root) -> dict:
    """Every entry under root: (inode, size, mtime_ns); the lock file's text as well."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(base, name))
            out[os.path.relpath(os.path.join(base, name), root)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    out["run.lock text"] = open(os.path.join(root, "run.lock"), "rb").read()
    return out


def _in_use_line(run, pid) -> re.Pattern:
    return re.compile(rf"{re.escape(str(run))} is in use by the run on host {re.escape(HOST)}, "
                      rf"pid {pid} \(started [^)]+\)")


# ------------------------------------------------------------------------------------------------
# the lock itself


def test_held_lock_is_reported_and_a_dead_holders_lock_never_blocks(tmp_path):
    from atesd_mc import run_lock

    run = tmp_path / "not_yet_created" / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from atesd_mc import run_lock; "
         "assert run_lock.acquire(sys.argv[2]) is None; print('held', flush=True); sys.stdin.read()",
         ROOT, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = _snapshot(run)
        kind, line = run_lock.verdict(str(run), ITERS)
        assert kind == "error" and _in_use_line(run, holder.pid).fullmatch(line), line
        assert _snapshot(run) == before  # the refused launch wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking (SIGKILL): its stale text is still there, yet the kernel
    # dropped its lock, so the next launch gets the directory and records itself.
    try:
        assert run_lock.verdict(str(run), ITERS) is None
        assert f'"pid": {os.getpid()}' in (run / "run.lock").read_text()
    finally:
        run_lock.release(str(run))


def test_what_a_launch_finds_in_the_directory(tmp_path):
    """A checkpoint at --train-iters with eval.json: finished; without eval.json (killed in the
    final evaluation): go on; below --train-iters: go on (resume or extend); past it: refused."""
    from atesd_mc import run_lock
    from atesd_mc.checkpoint import iter_dir, write_tracker

    run = tmp_path / "run"
    os.makedirs(iter_dir(str(run), 4))
    write_tracker(str(run), 4)
    try:
        assert run_lock.verdict(str(run), 4) is None
        (run / "eval.json").write_text("{}")
        before = _snapshot(run)
        assert run_lock.verdict(str(run), 4) == ("finished", (
            f"{run} already finished 4 iterations (eval.json); to train further pass a larger --train-iters, "
            f"to start over use another --save or delete the directory"))
        assert run_lock.verdict(str(run), 6) is None
        kind, line = run_lock.verdict(str(run), 3)
        assert kind == "error" and "checkpoint at iteration 4, past --train-iters 3" in line
        assert _snapshot(run) == before
    finally:
        run_lock.release(str(run))


def _train_and_save(cfg, steps):
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    for _ in range(steps):
        trainer.train_step()
    trainer.save_checkpoint()


def _resumed_lr(cfg):
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    return trainer.step, trainer.rt.optimizer.param_groups[0]["lr"]


def test_a_larger_train_iters_extends_the_run_on_the_new_schedule(tmp_path):
    """2 of 2 iterations done (cosine to min_lr 0: lr 0 at the end), relaunched with 4: the run
    goes on from iteration 2 at the 4-iteration cosine's lr (it used to keep the checkpoint's
    schedule, lr 0, silently)."""
    from atesd_mc.config_io import parse_config

    def cfg(iters):
        argv = chaos.trainer_command(str(tmp_path / "run"), str(tmp_path / "cache"), iters=iters, world=1,
                                     save_interval=1, warm_start_iters=0, seed=1234)[2:]
        return parse_config(argv + ["--min-lr", "0", "--lr", "1e-3", "--lr-warmup-iters", "0"])

    run_distributed(_train_and_save, world=1, args=(cfg(2), 2))
    step, lr = run_distributed(_resumed_lr, world=1, args=(cfg(4),))[0]
    assert step == 2 and lr == 1e-3 * 0.5 * (math.cos(math.pi * 2 / 4) + 1.0)


# ------------------------------------------------------------------------------------------------
# SIGKILL of torchrun, the second launch, the relaunch, the finished run


def _reference(argv):
    """The uninterrupted run, on forked gloo ranks (start-up in ~0.1 s instead of a torchrun)."""
    from atesd_mc.config_io import parse_config
    from atesd_mc.trainer import build_trainer

    build_trainer(parse_config(argv)).run()


def _workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """rank -> worker process, once torchrun has started both."""
    while True:
        ranks = {}
        for p in psutil.Process(launcher.pid).children():
            try:  # a child between fork and exec still has torchrun's own command line and environment
                if any("pretrain_atesd.py" in a for a in p.cmdline()) and "RANK" in p.environ():
                    ranks[int(p.environ()["RANK"])] = p
            except psutil.NoSuchProcess:
                pass
        if len(ranks) == 2:
            return ranks
        assert launcher.poll() is None, "torchrun ended before starting its workers"
        time.sleep(0.05)


def _logged_steps(run) -> int:
    path = run / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # an orphan's new parent may be slow to reap it
    except psutil.NoSuchProcess:
        return True


def _start_and_stop_after_two_steps(cmd, run, log):
    """Launch torchrun; once two steps are logged, SIGSTOP it and its workers (a stopped process
    keeps its lock and writes nothing) and return them."""
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=chaos.child_env(threads=1),
                                start_new_session=True)
    workers = _workers(launcher)
    while _logged_steps(run) < 2:
        assert launcher.poll() is None, open(log.name).read()[-3000:]
        time.sleep(0.02)
    procs = [psutil.Process(launcher.pid), *workers.values()]
    for p in procs:
        p.suspend()
    while any(p.status() != psutil.STATUS_STOPPED for p in procs):
        time.sleep(0.01)
    assert _logged_steps(run) < ITERS, "the run ended before it could be stopped"
    return launcher, workers


def _second_launches(cache, run, ref, rank0_pid):
    """While the run in `run` is stopped (holding its lock): (a) a second launch on `run` and (c) a
    relaunch of the finished run `ref`, side by side. Each prints one line and writes nothing."""
    before = {d: _snapshot(d) for d in (run, ref)}
    eval_bytes = (ref / "eval.json").read_bytes()
    procs = [subprocess.Popen(_command(d, cache, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=chaos.child_env(threads=1)) for d in (run, ref)]
    (busy_out, busy_err), (done_out, done_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 2, busy_err[-3000:]
    line = busy_err.strip()
    assert busy_out == "" and line.startswith("error: "), busy_err[-3000:]
    assert _in_use_line(run, rank0_pid).fullmatch(line.removeprefix("error: ")), line
    assert procs[1].returncode == 0, done_err[-3000:]
    assert done_out.splitlines() == [
        f"{ref} already finished {ITERS} iterations (eval.json); to train further pass a larger --train-iters, "
        f"to start over use another --save or delete the directory"], done_out
    assert (ref / "eval.json").read_bytes() == eval_bytes
    assert {d: _snapshot(d) for d in (run, ref)} == before


def _kill_launcher(launcher, workers) -> None:
    """SIGKILL torchrun alone; its workers (stopped, then continued) must be gone within 30 s."""
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    for p in workers.values():
        p.resume()
    deadline = time.monotonic() + 30
    while not all(_gone(p) for p in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in workers.values()), "a worker outlived its launcher by 30 s"


def test_launcher_sigkill_ends_workers_and_the_relaunch_matches_an_uninterrupted_run(tmp_path):
    cache, ref, run = tmp_path / "cache", tmp_path / "reference", tmp_path / "run"
    run_distributed(_reference, world=2, args=(_command(ref, cache, 1)[2:],), timeout=300)
    assert _logged_steps(ref) == ITERS and (ref / "eval.json").exists()

    with open(tmp_path / "killed.log", "w") as log:
        launcher, workers = _start_and_stop_after_two_steps(_command(run, cache, 2), run, log)
        try:
            _second_launches(cache, run, ref, workers[0].pid)
            _kill_launcher(launcher, workers)
        finally:
            if launcher.poll() is None:
                launcher.kill()
            for p in workers.values():
                if not _gone(p):
                    p.kill()
    assert f"launcher (pid {launcher.pid}) is gone" in (tmp_path / "killed.log").read_text()

    # the relaunch resumes from the run's last checkpoint and ends where the reference ended
    resumed = subprocess.run(_command(run, cache, 2), capture_output=True, text=True,
                             env=chaos.child_env(threads=1), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed from {re.escape(str(run))} at iteration [1-9]", resumed.stdout), resumed.stdout
    metrics = chaos.compare_metrics(str(ref / "metrics.jsonl"), str(run / "metrics.jsonl"), ITERS)
    assert metrics["problems"] == [] and metrics["steps_compared"] == ITERS, metrics
    assert chaos.compare_eval(str(ref), str(run)) == []


_ORPHAN = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from atesd_mc import signals
signals.LAUNCHER_GRACE_S = 0.5
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a main thread stuck in a collective: never stops
signals.watch_launcher(os.getppid())
print("watching", flush=True)
while True:
    time.sleep(1)
"""

_LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stderr=subprocess.STDOUT)
print(child.pid, flush=True)
child.wait()
"""


def test_orphan_whose_main_thread_never_stops_still_exits(tmp_path):
    """The hard exit after the grace period (shortened here), for a worker that ignores SIGTERM."""
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _ORPHAN, ROOT], stdout=subprocess.PIPE,
                                text=True, env={**chaos.child_env(threads=1), "TORCHELASTIC_RUN_ID": "test"},
                                start_new_session=True)
    orphan = psutil.Process(int(launcher.stdout.readline()))
    try:
        assert launcher.stdout.readline() == "watching\n"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while not _gone(orphan) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(orphan), "the orphan outlived its launcher by 30 s"
    finally:
        if not _gone(orphan):
            orphan.kill()
    assert f"launcher (pid {launcher.pid}) is gone" in launcher.stdout.read()
