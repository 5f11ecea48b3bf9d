"""Split a reference solution y* into reasoning segments r_1..r_m and a final answer A
(docs/METHOD.md, Segments and the final answer).

Segment unit: paragraphs (blank lines); when that gives fewer than 4, lines; when that still
gives fewer than 4, sentences. If no unit reaches 4 the one with the most segments wins, the
coarser on a tie (so a two-line GSM8K solution stays two lines rather than being re-flowed).

Segments are stored stripped; in the teacher prompt each is followed by its unit's separator
("\\n\\n" after a paragraph, "\\n" after a line or a sentence: a sentence gets its own line), so
every revealed prefix ends with a newline and the answer line always starts a fresh line.

Answer A, first that applies: the data set's answer field; the last ``\\boxed{..}`` /
``\\fbox{..}`` (brace matched); GSM8K's ``#### N`` (thousands commas removed), which in the
``auto`` format counts only when there is no box (markdown solutions use "####" headers).
When the answer comes from ``#### N`` the reasoning is the text before it, optionally without
the ``<<48/2=24>>`` calculator annotations; otherwise the reasoning is the whole solution.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MIN_SEGMENTS = 4
UNITS = ("paragraph", "line", "sentence")
SEPARATORS = {"paragraph": "\n\n", "line": "\n", "sentence": "\n"}
ANSWER_FORMATS = ("auto", "boxed", "gsm8k")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE_RE = re.compile(r"\\boxed\s+([^\s${}]+)")  # "\boxed 5": no braces
_CALC_RE = re.compile(r"<<[^<>]*>>")
_PARA_RE = re.compile(r"\n[ \t]*\n")
# A sentence ends at . ! ? followed by space and something that starts a sentence; requiring
# the capital/digit/LaTeX start avoids splitting "e.g. the" or "3.5".
_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\\$(\[])")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


class SegmentationError(ValueError):
    """No answer could be found, or the solution is empty; `field` names the culprit."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Segmentation:
    """A reference solution ready for partial exposure."""

    segments: tuple[str, ...]
    """Reasoning segments r_1..r_m, stripped of surrounding whitespace."""
    unit: str
    """paragraph | line | sentence."""
    answer: str
    """Final answer A: the inside of \\boxed{}, without the box."""

    @property
    def separator(self) -> str:
        return SEPARATORS[self.unit]

    def pieces(self) -> list[str]:
        """Segment texts as they appear in the teacher prompt (each with its separator)."""
        return [s + self.separator for s in self.segments]

    def reasoning_text(self, n_revealed: int | None = None) -> str:
        """The first n_revealed segments (all by default), as shown to the teacher."""
        return "".join(self.pieces()[:n_revealed])


def last_boxed(text: str) -> str | None:
    """Inside of the last brace-balanced \\boxed{..} or \\fbox{..} (also "\\boxed 5"), or None.

    Empty boxes are skipped: a response that quotes the instruction "within \\boxed{}" has not
    answered with it."""
    best: tuple[int, str] | None = None
    for m in _BOX_RE.finditer(text):
        inner = _balanced(text, m.end())
        if inner is not None and inner.strip():
            best = (m.start(), inner)
    for m in _BOX_BARE_RE.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), m.group(1))
    return None if best is None else best[1].strip()


def _balanced(text: str, start: int) -> str | None:
    """Text from start up to the brace closing the one just before start; None if unclosed."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def gsm8k_split(solution: str) -> tuple[str, str] | None:
    """(reasoning before the last "####", the first line after it), or None without "####"."""
    head, sep, tail = solution.rpartition("####")
    if not sep:
        return None
    answer = tail.strip().split("\n", 1)[0].strip()
    if _THOUSANDS_RE.fullmatch(answer):
        answer = answer.replace(",", "")
    return head, answer


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K's <<48/2=24>> annotations (the result right after them stays)."""
    return _CALC_RE.sub("", text)


def _units(text: str) -> dict[str, list[str]]:
    paragraphs = [p.strip() for p in _PARA_RE.split(text) if p.strip()]
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    sentences = [s.strip() for ln in lines for s in _SENT_RE.split(ln) if s.strip()]
    return {"paragraph": paragraphs, "line": lines, "sentence": sentences}


def split_reasoning(text: str, min_segments: int = MIN_SEGMENTS) -> tuple[list[str], str]:
    """(segments, unit): the first unit giving >= min_segments, else the one giving most."""
    units = _units(text)
    for unit in UNITS:
        if len(units[unit]) >= min_segments:
            return units[unit], unit
    most = max(len(units[u]) for u in UNITS)
    unit = next(u for u in UNITS if len(units[u]) == most)  # coarsest on a tie
    return units[unit], unit


def segment_solution(solution: str, *, answer: str | None = None, answer_format: str = "auto",
                     strip_calculator: bool = False, min_segments: int = MIN_SEGMENTS,
                     solution_field: str = "solution", answer_field: str = "answer"
                     ) -> Segmentation:
    """Split a solution into reasoning segments and its final answer (see module doc)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if not solution.strip():
        raise SegmentationError(solution_field, "empty solution")
    reasoning, found = solution, None
    if answer_format == "gsm8k":
        split = gsm8k_split(solution)
        if split is None or not split[1]:
            raise SegmentationError(solution_field, "no '#### N' final answer line")
        reasoning, found = split
    else:
        found = last_boxed(solution)
        # "####" only counts when there is no box: OpenThoughts-style markdown uses "####" headers.
        split = gsm8k_split(solution) if found is None and answer_format == "auto" else None
        if split is not None and split[1]:
            reasoning, found = split
    if answer is not None and answer.strip():
        found = answer.strip()
    if not found:
        where = answer_field if answer is not None else solution_field
        raise SegmentationError(where, "no extractable final answer (\\boxed{..} or '#### N')")
    if strip_calculator:
        reasoning = strip_calculator_annotations(reasoning)
    segments, unit = split_reasoning(reasoning, min_segments)
    if not segments:
        raise SegmentationError(solution_field, "no reasoning before the final answer")
    return Segmentation(tuple(segments), unit, found)
