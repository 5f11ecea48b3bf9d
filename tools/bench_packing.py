"""Token-budget packing benchmark: native vs pure-Python partitioning time, and the balance of
token-budget micro-batches and rank assignment against fixed-size micro-batches.

Lengths are drawn log-normal (heavy-tailed, like reasoning rollouts: most short, a few near the
cap). Prints a Markdown table and, with --csv, appends one row per measurement.

  python tools/bench_packing.py                       # 100,000 lengths, DP=64, 16 prompts per rank
  python tools/bench_packing.py --csv bench_packing.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import numpy as np

from atesd_mc import packing


def lognormal_lengths(n: int, median: int, sigma: float, cap: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(int).tolist()


def _time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (the first call included: no warm-up to hide)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def partition_times(lengths: list[int], budget: int, repeats: int) -> dict:
    py = _time(lambda: packing.first_fit_decreasing_py(lengths, budget), repeats)
    row = {"n": len(lengths), "budget": budget, "python_s": py, "native_s": float("nan"), "identical": ""}
    if packing.native_available():
        row["native_s"] = _time(lambda: packing.first_fit_decreasing(lengths, budget), repeats)
        row["identical"] = packing.first_fit_decreasing(lengths, budget) == tuple(
            packing.first_fit_decreasing_py(lengths, budget))
    return row


def _ratio(loads) -> float:
    return max(loads) / (sum(loads) / len(loads))


def balance(lengths: list[int], dp: int, per_rank: int, micro: int, budget: int) -> dict:
    """Mean over consecutive global batches of max/mean tokens: per rank (contiguous slices as
    the sampler hands them out, vs balance_ranks) and per micro-batch (fixed `micro` sequences,
    vs token_micro_batches of `budget` within each balanced rank), plus micro-batches per rank."""
    g = dp * per_rank
    fixed_rank, bal_rank, fixed_mb, tok_mb, n_fixed, n_tok = [], [], [], [], [], []
    for start in range(0, len(lengths) - g + 1, g):
        batch = lengths[start:start + g]
        slices = [batch[r * per_rank:(r + 1) * per_rank] for r in range(dp)]
        fixed_rank.append(_ratio([sum(s) for s in slices]))
        mbs = [sum(s[i:i + micro]) for s in slices for i in range(0, per_rank, micro)]
        fixed_mb.append(_ratio(mbs))
        n_fixed.append(per_rank // micro)
        ranks = packing.balance_ranks(batch, dp)
        bal_rank.append(_ratio([sum(batch[i] for i in r) for r in ranks]))
        groups = [[batch[r[i]] for i in grp] for r in ranks
                  for grp in packing.token_micro_batches([batch[i] for i in r], budget)]
        tok_mb.append(_ratio([sum(grp) for grp in groups]))
        n_tok.append(max(len(packing.token_micro_batches([batch[i] for i in r], budget)) for r in ranks))
    return {"dp": dp, "per_rank": per_rank, "micro": micro, "mb_budget": budget,
            "rank_max_mean_fixed": statistics.mean(fixed_rank), "rank_max_mean_balanced": statistics.mean(bal_rank),
            "mb_max_mean_fixed": statistics.mean(fixed_mb), "mb_max_mean_tokens": statistics.mean(tok_mb),
            "mbs_per_rank_fixed": statistics.mean(n_fixed), "max_mbs_per_rank_tokens": statistics.mean(n_tok)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="lengths to partition")
    ap.add_argument("--median", type=int, default=1500, help="median rollout + prompt tokens")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (tail weight)")
    ap.add_argument("--cap", type=int, default=32768, help="longest sequence (max_new_tokens + prompt)")
    ap.add_argument("--budget", type=int, default=65536, help="tokens per micro-batch")
    ap.add_argument("--dp", type=int, default=64)
    ap.add_argument("--per-rank", type=int, default=16, help="prompts per rank per step")
    ap.add_argument("--micro", type=int, default=4, help="fixed micro-batch size to compare with")
    ap.add_argument("--mb-budget", type=int, default=0,
                    help="token budget of the micro-batches compared; 0 = micro x the mean length "
                         "(the same number of micro-batches on average as the fixed size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=None, help="append the row to this CSV file")
    args = ap.parse_args(argv)
    lengths = lognormal_lengths(args.n, args.median, args.sigma, args.cap, args.seed)
    row = {"lengths": f"lognormal(median={args.median},sigma={args.sigma},cap={args.cap})",
           **partition_times(lengths, args.budget, args.repeats),
           **balance(lengths, args.dp, args.per_rank, args.micro,
                     args.mb_budget or round(args.micro * statistics.mean(lengths)))}
    print("| " + " | ".join(row) + " |\n|" + "---|" * len(row))
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(row))
            if new:
                wr.writeheader()
            wr.writerow(row)


if __name__ == "__main__":
    main()
