"""Reading source rows (JSONL, optionally Parquet) and turning them into Examples or BadRows.

Nothing is dropped silently: every row is either an Example or a BadRow that names the file,
the 1-based line (row number for Parquet), the field when one is to blame, and the reason.
Blank lines are not rows; they are only counted.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

from atesd_mc.data.segment import UNITS, Segmentation, SegmentationError
from atesd_mc.data.store import Example, make_example
from atesd_mc.data.tokenizer import Tokenizer

_ANSWER_ONLY = {"problem_key": "problem", "solution_key": None, "answer_key": "answer",
                "answer_format": "auto", "strip_calculator": False}
PRESETS = {
    # GSM8K: question / answer, where the answer is the worked solution ending in "#### N".
    "gsm8k": {"problem_key": "question", "solution_key": "answer", "answer_key": None,
              "answer_format": "gsm8k", "strip_calculator": True},
    # OpenThoughts (math): problem / solution, final answer in the last \boxed{}.
    "openthoughts": {"problem_key": "problem", "solution_key": "solution", "answer_key": None,
                     "answer_format": "boxed", "strip_calculator": False},
    # Evaluation sets with no reference solution (AIME, HMMT): problem / answer.
    "answer-only": _ANSWER_ONLY, "aime": _ANSWER_ONLY, "hmmt": _ANSWER_ONLY,
}
PRESET_HELP = {
    "gsm8k": "{question, answer}: the answer is the worked solution ending in '#### N'; "
             "calculator annotations <<a*b=c>> are stripped.",
    "openthoughts": "{problem, solution}: the final answer is the solution's last \\boxed{}.",
    "answer-only": "{problem, answer} with no reference solution (AIME, HMMT, MATH-500 answers): "
                   "an evaluation set (--eval-data-path); the store holds the student prompt and "
                   "the answer, its teacher prompts show the answer line only, and the manifest "
                   "says reference_solutions: false.",
    "aime": "same as answer-only (e.g. ../shared/data/math_eval/aime24.jsonl).",
    "hmmt": "same as answer-only (e.g. ../shared/data/math_eval/hmmt25.jsonl).",
}


@dataclass(frozen=True)
class BadRow:
    """A source row that cannot become an example, and why."""

    path: str
    line: int
    """1-based line (JSONL) or row (Parquet) number."""
    field: str | None
    """The field to blame, or None when the row as a whole is broken."""
    reason: str

    def __str__(self) -> str:
        where = f"field {self.field!r}: " if self.field else ""
        return f"{self.path}:{self.line}: {where}{self.reason}"


class BadRowError(ValueError):
    """Raised for a BadRow when bad rows are fatal."""

    def __init__(self, row: BadRow):
        super().__init__(str(row))
        self.row = row


@dataclass(frozen=True)
class RowSpec:
    """How to read a row: which keys hold what, and how to segment and tokenise it."""

    problem_key: str = "problem"
    solution_key: str | None = "solution"
    """None: the rows have no reference solution (answer-only); answer_key is then required."""
    answer_key: str | None = None
    answer_format: str = "auto"
    strip_calculator: bool = False
    enable_thinking: bool = True
    max_length: int | None = None
    """Longest allowed student or fully revealed teacher prompt, in tokens (None: no limit)."""

    def __post_init__(self) -> None:
        if self.solution_key is None and not self.answer_key:
            raise ValueError("rows without a solution field need an answer field (answer_key)")


class HashingReader:
    """Iterates the lines of a file as bytes while computing its sha256."""

    def __init__(self, path: str):
        self.path, self.sha = path, hashlib.sha256()
        self.blank_lines = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw line) for each non-blank line."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                self.sha.update(raw)
                if raw.strip():
                    yield number, raw
                else:
                    self.blank_lines += 1

    def sha256(self) -> str:
        return self.sha.hexdigest()


def decode_row(path: str, line: int, raw: bytes) -> dict | BadRow:
    """One JSONL line -> dict, or a BadRow for non-UTF-8 bytes, broken JSON, or a non-object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(path, line, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                        f"column {e.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(path, line, None, f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(row, dict):
        return BadRow(path, line, None, f"not a JSON object but {type(row).__name__}")
    return row


def _field(row: dict, key: str, path: str, line: int, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise BadRowError(BadRow(path, line, key, "missing field"))
        return None
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric answer fields (e.g. AIME) are fine
    if not isinstance(value, str):
        raise BadRowError(BadRow(path, line, key, f"not a string but {type(value).__name__}"))
    if required and not value.strip():
        raise BadRowError(BadRow(path, line, key, "empty"))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to unpaired surrogates
        raise BadRowError(BadRow(path, line, key, "invalid Unicode (unpaired surrogate)")) from None
    return value


def row_to_example(tok: Tokenizer, spec: RowSpec, path: str, line: int,
                   row: dict | BadRow) -> Example | BadRow:
    """Validate, segment and tokenise one decoded row."""
    if isinstance(row, BadRow):
        return row
    try:
        problem = _field(row, spec.problem_key, path, line)
        if spec.solution_key is None:
            ex = _answer_only_example(tok, spec, problem, _field(row, spec.answer_key, path, line),
                                      line)
        else:
            solution = _field(row, spec.solution_key, path, line)
            answer = _field(row, spec.answer_key, path, line, required=False) if spec.answer_key \
                else None
            ex = make_example(tok, problem, solution, answer=answer, answer_format=spec.answer_format,
                              strip_calculator=spec.strip_calculator,
                              enable_thinking=spec.enable_thinking, source_line=line)
    except BadRowError as e:
        return e.row
    except SegmentationError as e:
        key = spec.answer_key if e.field == "answer" else spec.solution_key
        return BadRow(path, line, key, e.reason)
    longest = max(len(ex.student), ex.teacher.max_length())
    if spec.max_length is not None and longest > spec.max_length:
        return BadRow(path, line, spec.solution_key or spec.problem_key,
                      f"too long: {longest} prompt tokens > max length {spec.max_length}")
    return ex


def _answer_only_example(tok: Tokenizer, spec: RowSpec, problem: str, answer: str,
                         line: int) -> Example:
    """A row with no reference solution: the answer field is the final answer as it stands, the
    solution is empty and the reference has no segments (the teacher prompt shows only the answer
    line). Enough for evaluation, which reads the student prompt and the answer."""
    seg = Segmentation(segments=(), unit=UNITS[0], answer=answer.strip())
    return make_example(tok, problem, "", seg=seg, enable_thinking=spec.enable_thinking,
                        source_line=line)


def iter_parquet_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict) of a Parquet file; needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError(f"{path}: reading Parquet needs pyarrow ({e})") from e
    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


# Per-process state for tools/preprocess_data.py's pool (module level so workers can import it).
_WORKER: tuple = ()


def init_worker(tokenizer_path: str, spec: RowSpec, path: str) -> None:
    """Load the tokenizer once per process."""
    global _WORKER
    from atesd_mc.data.tokenizer import load_tokenizer

    _WORKER = (load_tokenizer(tokenizer_path), spec, path)


def process_item(item: tuple[int, bytes | dict]) -> Example | BadRow:
    """(line, raw JSONL bytes or an already decoded row) -> Example or BadRow."""
    tok, spec, path = _WORKER
    line, raw = item
    row = decode_row(path, line, raw) if isinstance(raw, bytes) else raw
    return row_to_example(tok, spec, path, line, row)
