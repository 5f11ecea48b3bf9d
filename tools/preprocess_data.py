#!/usr/bin/env python
"""JSONL (or Parquet) -> problem store (zarr) for the trainer.

    python tools/preprocess_data.py --input ../shared/data/gsm8k/train.jsonl \\
        --output data/gsm8k_train.zarr --tokenizer path/to/tokenizer_dir --preset gsm8k

Bad rows (broken JSON, non-UTF-8 bytes, missing or empty field, no final answer, too long) are
reported as file:line with the field and reason. By default the first one is fatal: exit status
1 and no store is written. With --skip-bad they are skipped, counted and listed in the manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atesd_mc.data.jsonl import (PRESETS, BadRow, BadRowError, HashingReader, RowSpec,  # noqa: E402
                                 init_worker, iter_parquet_rows, process_item)
from atesd_mc.data.store import StoreError, StoreWriter  # noqa: E402
from atesd_mc.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

MAX_LISTED_BAD_ROWS = 1000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL (or .parquet) file")
    p.add_argument("--output", required=True, help="store directory to create")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    p.add_argument("--preset", choices=sorted(PRESETS), help="field names and answer format")
    p.add_argument("--problem-key", help="field with the problem (default: preset or 'problem')")
    p.add_argument("--solution-key", help="field with the solution (default: preset or 'solution')")
    p.add_argument("--answer-key", help="field with the final answer (default: from the solution)")
    p.add_argument("--answer-format", choices=("auto", "boxed", "gsm8k"),
                   help="where the final answer is in the solution (default: preset or auto)")
    p.add_argument("--strip-calculator", action=argparse.BooleanOptionalAction, default=None,
                   help="remove GSM8K <<a*b=c>> annotations (default: on for --preset gsm8k)")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="Qwen3 chat-template thinking switch for the prompts")
    p.add_argument("--max-length", type=int, default=None,
                   help="rows whose student or full teacher prompt is longer are bad rows")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--workers", type=int, default=1, help="tokenisation processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def row_spec(args: argparse.Namespace) -> RowSpec:
    base = dict(PRESETS.get(args.preset, {}))
    for key in ("problem_key", "solution_key", "answer_key", "answer_format", "strip_calculator"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    return RowSpec(**base, enable_thinking=args.enable_thinking, max_length=args.max_length)


def _results(args, spec: RowSpec, items):
    """Examples/BadRows in input order, from a process pool when --workers > 1."""
    if args.workers <= 1:
        init_worker(args.tokenizer, spec, args.input)
        yield from map(process_item, items)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no rayon threads across fork
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(args.workers, init_worker, (args.tokenizer, spec, args.input)) as pool:
        yield from pool.imap(process_item, items, chunksize=64)


def _progress(items, args):
    if args.no_progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="preprocess", unit="row", mininterval=1.0, file=sys.stderr)


def convert(args: argparse.Namespace) -> dict:
    """Write the store; returns a summary. Raises BadRowError / StoreError / TokenizerError."""
    spec = row_spec(args)
    tok = load_tokenizer(args.tokenizer)
    parquet = args.input.endswith(".parquet")
    if not os.path.isfile(args.input):
        raise StoreError(f"{args.input}: input file not found")
    reader = None if parquet else HashingReader(args.input)
    items = iter_parquet_rows(args.input) if parquet else iter(reader)
    bad: list[str] = []
    t0 = time.perf_counter()
    creation = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    creation["row_spec"] = dataclasses.asdict(spec)  # the preset resolved into its fields
    with StoreWriter(args.output, tok, overwrite=args.overwrite,
                     creation_args=creation) as writer:
        for result in _progress(_results(args, spec, items), args):
            if isinstance(result, BadRow):
                print(f"bad row: {result}", file=sys.stderr)
                if not args.skip_bad:
                    raise BadRowError(result)
                bad.append(str(result))
            else:
                writer.append(result)
        if writer.count == 0:
            raise StoreError(f"{args.input}: no usable rows ({len(bad)} bad)")
        writer.meta["source"] = {
            "path": args.input, "sha256": reader.sha256() if reader else _sha256(args.input),
            "rows": writer.count + len(bad), "bad_rows": len(bad),
            "bad_rows_listed": bad[:MAX_LISTED_BAD_ROWS],
            "blank_lines": reader.blank_lines if reader else 0}
        path = writer.close()
    return {"store": path, "examples": writer.count, "bad_rows": len(bad),
            "seconds": round(time.perf_counter() - t0, 2), "bytes": _du(path)}


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args)
    except BadRowError as e:
        print(f"error: {e} (use --skip-bad to skip such rows); no store written", file=sys.stderr)
        return 1
    except (StoreError, TokenizerError) as e:
        print(f"error: {e}; no store written", file=sys.stderr)
        return 1
    print(f"wrote {summary['store']}: {summary['examples']} examples, {summary['bad_rows']} bad "
          f"rows skipped, {summary['bytes'] / 1e6:.2f} MB in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
