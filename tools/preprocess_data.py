#!/usr/bin/env python
"""JSONL (or Parquet) -> problem store (zarr) for the trainer.

    python tools/preprocess_data.py --input ../shared/data/gsm8k/train.jsonl \\
        --output data/gsm8k_train.zarr --tokenizer path/to/tokenizer_dir --preset gsm8k

    python tools/preprocess_data.py --input ../shared/data/math_eval/aime24.jsonl \\
        --output data/aime24.zarr --tokenizer path/to/tokenizer_dir --preset aime

Bad rows (broken JSON, non-UTF-8 bytes, missing or empty field, no final answer, too long) are
reported as file:line with the field and reason. By default the first one is fatal: exit status
1 and no store is written. With --skip-bad they are skipped, counted and listed in the manifest.

The tokenizer must fit the model's vocabulary: a token id at or past the model's vocab_size has
no embedding row of its own (it would land on padding). The model's size is read from
--model-vocab-size, else from --model (an import-hf checkpoint's or training run's
model_config.json, or an HF config.json), else from a model_config.json or config.json in the
--tokenizer directory (an HF model directory holds both). A tokenizer with more ids is refused
with exit status 2 and no store is written; when none of these is there, nothing is checked here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atesd_mc.data.jsonl import (PRESET_HELP, PRESETS, BadRow, BadRowError,  # noqa: E402
                                 HashingReader, RowSpec, init_worker, iter_parquet_rows,
                                 process_item)
from atesd_mc.data.store import StoreError, StoreWriter  # noqa: E402
from atesd_mc.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

MAX_LISTED_BAD_ROWS = 1000


def _presets_text() -> str:
    import textwrap

    lines = ["presets (--preset; --problem-key etc. override their fields):"]
    for name in PRESETS:
        lines.append(textwrap.fill(PRESET_HELP[name], 96, initial_indent=f"  {name:13s}",
                                   subsequent_indent=" " * 15))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=_presets_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (or .parquet) file")
    p.add_argument("--output", required=True, help="store directory to create")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer dir or sentencepiece .model")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="field names and answer format of a known data set (listed below)")
    p.add_argument("--problem-key", help="field with the problem (default: preset or 'problem')")
    p.add_argument("--solution-key", help="field with the solution (default: preset or 'solution')")
    p.add_argument("--answer-key", help="field with the final answer (default: preset, else from "
                                        "the solution)")
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
    p.add_argument("--model-vocab-size", type=int, default=0,
                   help="the model's vocabulary size; a tokenizer with more ids is refused")
    p.add_argument("--model", default="",
                   help="model whose vocabulary the tokenizer must fit: an import-hf checkpoint or "
                        "training run (model_config.json) or an HF model directory (config.json)")
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


class VocabularyError(ValueError):
    """The tokenizer has ids the model's vocabulary does not."""


def _description_files(path: str) -> list[str]:
    """Files that may state a model's vocab_size under path, most specific first: the latest
    checkpoint's model_config.json (a training run or import), path's own, an HF config.json,
    import-hf's copy of it."""
    files = []
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        from atesd_mc.checkpoint import iter_dir, latest_step

        step = latest_step(path)
        if step is not None:
            files.append(os.path.join(iter_dir(path, step), "model_config.json"))
    return files + [os.path.join(path, n) for n in ("model_config.json", "config.json",
                                                    "hf_config.json")]


def model_vocab(args: argparse.Namespace) -> tuple[int, str] | None:
    """(the model's vocabulary size, where it was read) or None when nothing says (see module
    doc). A --model that states no vocab_size is an error."""
    if args.model_vocab_size:
        return args.model_vocab_size, "--model-vocab-size"
    where = args.model or (args.tokenizer if os.path.isdir(args.tokenizer) else "")
    for path in _description_files(where) if where else []:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                size = json.load(f).get("vocab_size")
        except (OSError, ValueError, AttributeError) as e:
            raise VocabularyError(f"{path}: cannot read the model's vocab_size ({e})") from None
        if isinstance(size, int) and size > 0:  # 0: "from the tokenizer", says nothing
            return size, path
    if args.model:
        raise VocabularyError(f"--model {args.model}: no model_config.json or config.json with a "
                              "vocab_size there")
    return None


def check_vocab(args: argparse.Namespace, tok) -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (when that is known)."""
    known = model_vocab(args)
    if known is not None and tok.vocab_size > known[0]:
        raise VocabularyError(f"the tokenizer {args.tokenizer} has {tok.vocab_size} ids but the "
                              f"model's vocabulary has {known[0]} ({known[1]}): ids {known[0]}.."
                              f"{tok.vocab_size - 1} would have no embedding row")


def convert(args: argparse.Namespace) -> dict:
    """Write the store; returns a summary. Raises BadRowError / StoreError / TokenizerError /
    VocabularyError."""
    spec = row_spec(args)
    tok = load_tokenizer(args.tokenizer)
    check_vocab(args, tok)
    parquet = args.input.endswith(".parquet")
    if not os.path.isfile(args.input):
        raise StoreError(f"{args.input}: input file not found")
    reader = None if parquet else HashingReader(args.input)
    items = iter_parquet_rows(args.input) if parquet else iter(reader)
    bad: list[str] = []
    t0 = time.perf_counter()
    creation = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    creation["row_spec"] = dataclasses.asdict(spec)  # the preset resolved into its fields
    vocab = model_vocab(args)
    creation["model_vocab"] = None if vocab is None else {"size": vocab[0], "from": vocab[1]}
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
        # answer-only stores (no reference solution) are evaluation sets, not training data
        writer.meta["reference_solutions"] = spec.solution_key is not None
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
        hint = "use --skip-bad to skip such rows"
        if e.row.reason == "missing field" and e.row.field == row_spec(args).solution_key:
            hint = "a set without reference solutions, e.g. AIME or HMMT: --preset answer-only"
        print(f"error: {e} ({hint}); no store written", file=sys.stderr)
        return 1
    except VocabularyError as e:
        print(f"error: {e}; no store written", file=sys.stderr)
        return 2
    except (StoreError, TokenizerError) as e:
        print(f"error: {e}; no store written", file=sys.stderr)
        return 1
    print(f"wrote {summary['store']}: {summary['examples']} examples, {summary['bad_rows']} bad "
          f"rows skipped, {summary['bytes'] / 1e6:.2f} MB in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
