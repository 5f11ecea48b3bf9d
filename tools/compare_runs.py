#!/usr/bin/env python
"""Do two runs end in the same place, bit for bit? The comparison behind tools/chaos_resume.py.

    python tools/compare_runs.py RUN_A RUN_B --iters N [--scratch DIR]

* metrics.jsonl: the *final pass* of each file (the last record of each step in file order: a
  killed launch may have logged steps after its last checkpoint that the resumed launch re-ran).
  Every step 1..N must be present, every superseded record must equal the final one, and the two
  runs' records must be equal field by field as JSON (all fields but the wall-clock ``time``). A
  line torn by a kill (no newline) is skipped and counted.
* the final checkpoint (the one the tracker names): every tensor of the torch_dist part (model,
  teacher, optimizer; read whole with torch.distributed.checkpoint, no process group), common.pt,
  the trainer state (config paths aside) and every rank's RNG file, byte for byte.
* eval.json: held-out accuracies before and after.

Prints the result as JSON; exits 1 when anything differs."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from atesd_mc.checkpoint import TRACKER, iter_dir, read_tracker  # noqa: E402


def read_metrics(path: str) -> tuple[dict[int, dict], dict]:
    """Final pass of metrics.jsonl (last record per step) and what was found on the way."""
    final: dict[int, dict] = {}
    earlier: dict[int, list[dict]] = {}
    torn = total = 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        total += 1
        try:
            rec = json.loads(line)
        except ValueError:
            # a line torn by a kill; the next launch appended right after it
            torn += 1
            tail = line.rfind(b'{"step"')
            if tail <= 0:
                continue
            try:
                rec = json.loads(line[tail:])
            except ValueError:
                continue
        step = int(rec["step"])
        if step in final:
            earlier.setdefault(step, []).append(final[step])
        final[step] = rec
    return final, {"lines": total, "torn": torn, "rerun_steps": sorted(earlier), "earlier": earlier}


def _comparable(rec: dict) -> str:
    return json.dumps({k: v for k, v in rec.items() if k != "time"}, sort_keys=True)


def compare_metrics(a_path: str, b_path: str, iters: int) -> dict:
    a, a_info = read_metrics(a_path)
    b, b_info = read_metrics(b_path)
    problems = []
    for name, recs, info in (("A", a, a_info), ("B", b, b_info)):
        if sorted(recs) != list(range(1, iters + 1)):
            missing = sorted(set(range(1, iters + 1)) - set(recs))
            problems.append(f"run {name}: steps {missing[:10]} missing from metrics.jsonl")
    if a_info["rerun_steps"]:
        problems.append(f"run A (uninterrupted) logged steps twice: {a_info['rerun_steps'][:10]}")
    rerun_mismatch = [s for s, olds in b_info["earlier"].items()
                      if any(_comparable(o) != _comparable(b[s]) for o in olds)]
    if rerun_mismatch:
        problems.append(f"run B: re-run steps differ from their killed first run: {rerun_mismatch[:10]}")
    steps = sorted(set(a) & set(b))
    differ = [s for s in steps if _comparable(a[s]) != _comparable(b[s])]
    alpha_differ = [s for s in steps if a[s].get("alpha") != b[s].get("alpha")]
    dloss = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps
             if isinstance(a[s]["loss"], float) and isinstance(b[s]["loss"], float)
             and math.isfinite(a[s]["loss"]) and math.isfinite(b[s]["loss"])]
    if differ:
        s = differ[0]
        fields = [k for k in set(a[s]) | set(b[s]) if k != "time" and
                  json.dumps(a[s].get(k)) != json.dumps(b[s].get(k))]
        problems.append(f"{len(differ)} steps differ between A and B (first: step {s}, fields {sorted(fields)})")
    return {"steps_compared": len(steps), "steps_differ": differ, "alpha_differ": alpha_differ,
            "max_abs_dloss": max(dloss) if dloss else 0.0, "b_lines": b_info["lines"],
            "b_torn_lines": b_info["torn"], "b_rerun_steps": len(b_info["rerun_steps"]),
            "b_rerun_consistent": not rerun_mismatch, "problems": problems}


def _flatten(obj, prefix: str, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}/", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}/", out)
    else:
        out[prefix.rstrip("/")] = obj
    return out


def _same(x, y) -> bool:
    import torch

    if torch.is_tensor(x) or torch.is_tensor(y):
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            return False
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        xb = x.detach().cpu().contiguous().reshape(-1)
        yb = y.detach().cpu().contiguous().reshape(-1)
        if xb.dtype == torch.bool:
            return torch.equal(xb, yb)
        return torch.equal(xb.view(torch.uint8), yb.view(torch.uint8))  # bitwise, NaN included
    if isinstance(x, float) and isinstance(y, float):
        return x.hex() == y.hex() if not (math.isnan(x) and math.isnan(y)) else True
    return type(x) is type(y) and x == y


def load_final_checkpoint(run_dir: str, scratch: str) -> tuple[int, dict]:
    """Everything in the checkpoint the tracker names, as one flat {name: value} dict.

    The torch_dist part is read with torch.distributed.checkpoint (no process group, any layout:
    tensors come back whole) through dcp_to_torch_save into a scratch file."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step = read_tracker(run_dir)
    if step is None:
        raise RuntimeError(f"{run_dir}: no {TRACKER}")
    path = iter_dir(run_dir, step)
    os.makedirs(scratch, exist_ok=True)
    full = os.path.join(scratch, "full_state.pt")
    dcp_to_torch_save(path, full)
    flat = _flatten(torch.load(full, weights_only=True), "dist/", {})
    os.remove(full)
    flat.update(_flatten(torch.load(os.path.join(path, "common.pt"), weights_only=True), "common/", {}))
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    config = state.pop("config", {})
    for key in ("save", "load"):
        config.get("checkpoint", {}).pop(key, None)  # the run directory differs, by design
    flat.update(_flatten(state, "trainer_state/", {}))
    flat.update(_flatten(config, "trainer_state/config/", {}))
    for name in sorted(os.listdir(path)):
        if name.startswith("rng_rank") and name.endswith(".pt"):
            flat.update(_flatten(torch.load(os.path.join(path, name), weights_only=True), f"{name}/", {}))
    return step, flat


def compare_checkpoints(a_dir: str, b_dir: str, scratch: str) -> dict:
    a_step, a = load_final_checkpoint(a_dir, os.path.join(scratch, "A"))
    b_step, b = load_final_checkpoint(b_dir, os.path.join(scratch, "B"))
    only = sorted(set(a) ^ set(b))
    differ = sorted(k for k in set(a) & set(b) if not _same(a[k], b[k]))
    weights = sorted(k for k in set(a) | set(b) if k.startswith("dist/") and not k.startswith("dist/optimizer."))
    import torch

    n_tensors = sum(1 for k in a if torch.is_tensor(a[k]))
    weights_equal = a_step == b_step and bool(weights) and all(k in a and k in b and _same(a[k], b[k])
                                                               for k in weights)
    return {"a_step": a_step, "b_step": b_step, "entries": len(a), "tensors": n_tensors,
            "weight_tensors": sum(1 for k in weights if torch.is_tensor(a[k])),
            "weights_equal": weights_equal, "all_equal": a_step == b_step and not only and not differ,
            "differ": differ[:20], "only_one_side": only[:20]}


def compare_eval(a_dir: str, b_dir: str) -> list[str]:
    keys = ("before", "before_sampled", "before_splits", "after", "after_sampled", "after_splits")
    try:
        a = json.load(open(os.path.join(a_dir, "eval.json")))
        b = json.load(open(os.path.join(b_dir, "eval.json")))
    except (OSError, ValueError) as e:
        return [f"eval.json: {e}"]
    return [f"eval.json {k}: A {a.get(k)} != B {b.get(k)}" for k in keys if a.get(k) != b.get(k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--iters", type=int, required=True, help="steps both runs must have logged")
    p.add_argument("--scratch", default="", help="where the checkpoints are unpacked (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = args.scratch or tmp
        metrics = compare_metrics(os.path.join(args.run_a, "metrics.jsonl"),
                                  os.path.join(args.run_b, "metrics.jsonl"), args.iters)
        ckpt = compare_checkpoints(args.run_a, args.run_b, scratch)
        evals = compare_eval(args.run_a, args.run_b)
    same = not metrics["problems"] and ckpt["all_equal"] and not evals
    print(json.dumps({"same": same, "metrics": metrics, "checkpoint": ckpt, "eval": evals}, indent=2,
                     default=str))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
