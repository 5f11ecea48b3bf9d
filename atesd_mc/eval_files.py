"""Benchmark files: rows of a JSONL in one of several formats -> EvalProblem (problem text and
reference final answer). Formats and detection are described by FORMAT_HELP (evaluate.py --help)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

from atesd_mc.data.segment import gsm8k_split, last_boxed


@dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem."""

    problem: str
    answer: str
    """Reference final answer (LaTeX or integer, as a string)."""
    index: int = 0
    """0-based position in its file."""


@dataclass(frozen=True)
class EvalFormat:
    """Where a benchmark row keeps its problem and its reference final answer."""

    name: str
    problem_key: str
    answer_key: str
    answer_from: str
    """field: the field is the final answer; gsm8k: what follows its last '####'; boxed: the
    inside of its last \\boxed{}."""
    latex: bool
    """Text is LaTeX: JSON-escape typos are repaired (repair_latex_escapes)."""


EVAL_FORMATS = {
    "answer-only": EvalFormat("answer-only", "problem", "answer", "field", True),
    "gsm8k": EvalFormat("gsm8k", "question", "answer", "gsm8k", False),
    "boxed": EvalFormat("boxed", "problem", "solution", "boxed", True),
}
FORMAT_ALIASES = {"aime": "answer-only", "hmmt": "answer-only"}
FORMAT_HELP = ("auto: from the first row: the problem is field 'problem' (else 'question'), the "
               "reference field 'answer' (else 'solution'); its final answer is the inside of its "
               "last \\boxed{} if it has one, else what follows a '#### N' line (GSM8K), else the "
               "whole field. answer-only (alias aime, hmmt): {problem, answer}, the answer field is "
               "the final answer (AIME, HMMT, MATH-500). gsm8k: {question, answer}, the final "
               "answer follows the answer's last '####'. boxed: {problem, solution}, the final "
               "answer is the solution's last \\boxed{} (MATH, OpenThoughts).")


def _fields_text(row: dict) -> str:
    return ", ".join(map(repr, sorted(row))) or "none"


def _first_key(row: dict, given: str | None, candidates: tuple[str, str], path: str, line: int,
               flag: str) -> str:
    """The given field, else the first candidate the row has; ValueError naming it if absent."""
    key = given or next((k for k in candidates if row.get(k) is not None), None)
    if key is None or row.get(key) is None:
        wanted = repr(given) if given else f"{candidates[0]!r} (or {candidates[1]!r})"
        raise ValueError(f"{path}:{line}: field {wanted}: missing; the row has "
                         f"{_fields_text(row)} (pass --format or {flag})")
    return key


def detect_format(path: str, line: int, row: dict, *, problem_key: str | None = None,
                  answer_key: str | None = None) -> EvalFormat:
    """The format of a file from its first row (rules in FORMAT_HELP); ValueError naming the
    file, the line and the missing field when none fits."""
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{line}: not a JSON object but {type(row).__name__}")
    problem_key = _first_key(row, problem_key, ("problem", "question"), path, line, "--problem-key")
    answer_key = _first_key(row, answer_key, ("answer", "solution"), path, line, "--answer-key")
    value = str(row[answer_key])
    if last_boxed(value) is not None:
        base = EVAL_FORMATS["boxed"]
    elif gsm8k_split(value) is not None:
        base = EVAL_FORMATS["gsm8k"]
    else:
        base = EVAL_FORMATS["answer-only"]
    return dataclasses.replace(base, problem_key=problem_key, answer_key=answer_key)


def _reference(fmt: EvalFormat, value: str, path: str, line: int) -> str:
    """The reference final answer of one row under fmt."""
    where = f"{path}:{line}: field {fmt.answer_key!r}"
    if fmt.answer_from == "gsm8k":
        split = gsm8k_split(value)
        if split is None or not split[1]:
            raise ValueError(f"{where}: no '#### N' final answer line")
        return split[1]
    if fmt.answer_from == "boxed":
        boxed = last_boxed(value)
        if boxed is None:
            raise ValueError(f"{where}: no \\boxed{{}} final answer")
        return boxed
    if not value.strip():
        raise ValueError(f"{where}: empty")
    return value.strip()


def _rows(path: str):
    """(1-based line, decoded JSON) of each non-blank line; errors name file:line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{line}: not a valid UTF-8 JSON line ({e})") from e


def read_eval_file(path: str, fmt: str = "auto", *, problem_key: str | None = None,
                   answer_key: str | None = None, repair: bool = True
                   ) -> tuple[list[EvalProblem], EvalFormat]:
    """A benchmark JSONL and the format it was read with. fmt: auto | a name of EVAL_FORMATS or
    FORMAT_ALIASES; problem_key / answer_key override the format's fields. LaTeX formats get their
    JSON-escape typos repaired (unless repair=False). Errors name file:line and the field."""
    name = FORMAT_ALIASES.get(fmt, fmt)
    if name != "auto" and name not in EVAL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose auto, {', '.join(EVAL_FORMATS)} or "
                         f"{', '.join(FORMAT_ALIASES)}")
    spec, problems = None, []
    for line, row in _rows(path):
        if spec is None:  # the first row fixes the format for the whole file
            if name == "auto":
                spec = detect_format(path, line, row, problem_key=problem_key, answer_key=answer_key)
            else:
                spec = dataclasses.replace(EVAL_FORMATS[name],
                                           problem_key=problem_key or EVAL_FORMATS[name].problem_key,
                                           answer_key=answer_key or EVAL_FORMATS[name].answer_key)
        for key in (spec.problem_key, spec.answer_key):
            if not isinstance(row, dict) or row.get(key) is None:
                raise ValueError(f"{path}:{line}: field {key!r}: missing")
        problem = str(row[spec.problem_key])
        answer = _reference(spec, str(row[spec.answer_key]), path, line)
        if repair and spec.latex:
            problem, answer = repair_latex_escapes(problem), repair_latex_escapes(answer)
        problems.append(EvalProblem(problem, answer, len(problems)))
    if not problems:
        raise ValueError(f"{path}: no problems (the file has no rows)")
    return problems, spec


# JSON escapes that were meant as LaTeX commands: after json.loads, "\frac" written as "\f" + "rac"
# is a form feed + "rac". Form feed and backspace never occur in problem text, so they always
# go back; tab and carriage return only when a letter follows ("\t" + "riangle").
_ESCAPE_REPAIRS = [(re.compile("\x0c"), "\\\\f"), (re.compile("\x08"), "\\\\b"),
                   (re.compile("\t(?=[A-Za-z])"), "\\\\t"), (re.compile("\r(?=[A-Za-z])"), "\\\\r")]


def repair_latex_escapes(text: str) -> str:
    """Undo JSON-escape typos in LaTeX (see _ESCAPE_REPAIRS); other text is unchanged."""
    for pattern, repl in _ESCAPE_REPAIRS:
        text = pattern.sub(repl, text)
    return text


def load_eval_jsonl(path: str, fmt: str = "auto", *, problem_key: str | None = None,
                    answer_key: str | None = None, repair: bool = True) -> list[EvalProblem]:
    """The problems of a benchmark JSONL (read_eval_file without the format)."""
    return read_eval_file(path, fmt, problem_key=problem_key, answer_key=answer_key,
                          repair=repair)[0]
