#!/usr/bin/env python
"""The bad-input table: run the training CLI once per kind of bad input (config, data, checkpoint,
flags) and print a markdown table of its exit status and first/last stderr lines, the work
directory shown as WORK (the table in docs/RELIABILITY.md).

    python tools/bad_inputs.py --workdir /tmp/badin [--json rows.json]

WORKDIR is wiped first."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos_resume import ROOT, child_env, trainer_command  # noqa: E402  (same launch as the chaos runs)
from atesd_mc.checkpoint import TRACKER  # noqa: E402  (chaos_resume put the repository on sys.path)


def _first_last(text: str) -> tuple[str, str]:
    lines = [x.rstrip() for x in text.splitlines() if x.strip()]
    return (lines[0], lines[-1]) if lines else ("", "")


def bad_inputs(workdir: str, threads: int = 1) -> list[dict]:
    """Run the CLI once per bad input; returns [{group, case, rc, first, last, tracebacks}], stderr
    lines with the work directory shown as WORK."""
    import yaml

    workdir = os.path.abspath(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    env = child_env(threads)
    cache = os.path.join(workdir, "cache")

    def cmd(run, *extra, iters=2):
        return trainer_command(os.path.join(workdir, run), cache, iters=iters, world=1, save_interval=0,
                               warm_start_iters=0, seed=1234, extra=list(extra))

    # a good checkpoint (iteration 1) and the synthetic store with its tokenizer
    good = subprocess.run(cmd("good", iters=1), capture_output=True, text=True, env=env, cwd=workdir)
    if good.returncode != 0:
        raise RuntimeError(f"the good run failed: {good.stderr[-2000:]}")
    synth = next(os.path.join(cache, d) for d in sorted(os.listdir(cache)) if d.startswith("synthetic-")
                 and os.path.isdir(os.path.join(cache, d)))
    other_cache = os.path.join(workdir, "cache_other")
    build = ("import sys; sys.path.insert(0, {root!r}); from atesd_mc.config_io import parse_config; "
             "from atesd_mc.tasks import build_synthetic; print(build_synthetic(parse_config("
             "['--synthetic-vocab-size', '400', '--synthetic-train-size', '600', '--cache-dir', {cache!r}])))")
    other = subprocess.run([sys.executable, "-c", build.format(root=ROOT, cache=other_cache)], capture_output=True,
                           text=True, env=env, cwd=workdir)
    if other.returncode != 0:
        raise RuntimeError(f"building the second tokenizer failed: {other.stderr[-2000:]}")
    other_tok = os.path.join(other.stdout.strip().splitlines()[-1], "tokenizer.model")

    base_yaml = yaml.safe_load(open(os.path.join(ROOT, "examples", "tiny_arith.yaml")))

    def yaml_with(name, section, key, value):
        data = json.loads(json.dumps(base_yaml))
        data.setdefault(section, {})[key] = value
        path = os.path.join(workdir, name + ".yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        return path

    def with_config(c, path):
        c = list(c)
        c[c.index("--config") + 1] = path
        return c

    def damaged(run, damage):
        shutil.copytree(os.path.join(workdir, "good"), os.path.join(workdir, run))
        damage(os.path.join(workdir, run, "iter_0000001"))
        return cmd(run)

    def truncate(path, size):
        with open(path, "r+b") as f:
            f.truncate(size)

    def overwrite(path, offset, data):
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def tracker_garbage(it):
        with open(os.path.join(os.path.dirname(it), TRACKER), "w") as f:
            f.write("abc!\n")

    shard = lambda it: os.path.join(it, "__0_0.distcp")
    cases = [
        ("config", "unknown key (model.hidden_sise)",
         lambda: with_config(cmd("c1"), yaml_with("unknown_key", "model", "hidden_sise", 64))),
        ("config", "wrong type (model.num_attention_heads: four)",
         lambda: with_config(cmd("c2"), yaml_with("wrong_type", "model", "num_attention_heads", "four"))),
        ("config", "impossible TP (--tensor-model-parallel-size 3, world 1)",
         lambda: cmd("c3", "--tensor-model-parallel-size", "3")),
        ("data", "missing --data-path store", lambda: cmd("d1", "--data-path", os.path.join(workdir, "no_store"),
                                                          "--tokenizer", os.path.join(synth, "tokenizer.model"))),
        ("data", "store from another tokenizer", lambda: cmd("d2", "--data-path", os.path.join(synth, "train"),
                                                             "--tokenizer", other_tok)),
        ("checkpoint", "truncated trainer_state.pt",
         lambda: damaged("k1", lambda it: truncate(os.path.join(it, "trainer_state.pt"), 1000))),
        ("checkpoint", "truncated .distcp shard", lambda: damaged("k2", lambda it: truncate(shard(it), 4096))),
        ("checkpoint", "tampered .distcp header (24 bytes at offset 10)",
         lambda: damaged("k3", lambda it: overwrite(shard(it), 10, b"X" * 24))),
        ("checkpoint", "tampered .distcp payload (4 KiB mid-file, same size)",
         lambda: damaged("k4", lambda it: overwrite(shard(it), os.path.getsize(shard(it)) // 2,
                                                    bytes(range(256)) * 16))),
        ("checkpoint", "tracker garbage (abc!)", lambda: damaged("k5", tracker_garbage)),
        ("checkpoint", "tracker names a missing iter dir", lambda: damaged("k6", shutil.rmtree)),
        ("flags", "unknown flag (--no-such-flag 1)", lambda: cmd("f1", "--no-such-flag", "1")),
        ("flags", "bad value (--lr abc)", lambda: cmd("f2", "--lr", "abc")),
        ("flags", "out-of-range value (--micro-batch-size 0)", lambda: cmd("f3", "--micro-batch-size", "0")),
    ]
    rows = []
    for group, case, make in cases:
        out = subprocess.run(make(), capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
        first, last = _first_last(out.stderr)
        short = lambda x: x.replace(workdir, "WORK").replace(ROOT, "ROOT")
        rows.append({"group": group, "case": case, "rc": out.returncode, "first": short(first),
                     "last": short(last), "tracebacks": out.stderr.count("Traceback"),
                     "stderr_lines": len([x for x in out.stderr.splitlines() if x.strip()])})
    return rows


def bad_inputs_markdown(rows: list[dict], width: int = 240) -> str:
    def cell(x):
        x = x if len(x) <= width else x[:width] + " ..."
        return "`" + x.replace("|", "\\|").replace("`", "'") + "`" if x else ""

    out = ["| input | bad input | exit | stderr lines (tracebacks) | first stderr line | last stderr line |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['group']} | {r['case']} | {r['rc']} | {r['stderr_lines']} ({r['tracebacks']}) | "
                   f"{cell(r['first'])} | {cell(r['last']) if r['last'] != r['first'] else '(same)'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="scratch directory (wiped)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainer (default 1)")
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = bad_inputs(args.workdir, args.threads)
    print(bad_inputs_markdown(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
