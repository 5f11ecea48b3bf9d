"""Student and teacher prompts (docs/METHOD.md, Prompts), as text and as token pieces for packing.

Student user message::

    Problem: {x}\\n\\nPlease reason step by step, and put your final answer within \\boxed{}.

Teacher user message, with k of the m reasoning segments revealed::

    {x}\\n\\nHere is a reference solution to this problem:\\n
    {r_1 sep r_2 sep ... r_k sep}Final answer: \\boxed{A}\\n
    After understanding the reference solution ... to the problem below:\\n
    Please reason step by step, and put your final answer within \\boxed{}.

i.e. the ``{y*}`` of docs/METHOD.md (Prompts) is the revealed segments (each followed by its separator, see
segment.py) and then the line ``Final answer: \\boxed{A}``; k = 0 shows the answer line only,
k = m is OPSD's full reference (re-flowed into segments) plus the answer line. Both messages go
through the tokenizer's chat template as one user turn followed by the assistant header.

Token pieces (what the trainer packs): the rendered teacher prompt is cut into
``prefix | reference (segment by segment) | answer | transition``, each tokenised on its own.
Every cut sits right after a newline and right before a non-space character, so for a Qwen-style
pre-tokeniser the concatenated pieces equal the tokenisation of the whole text; for other
tokenisers they are still a valid (if not always the shortest) tokenisation of the same text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atesd_mc.data.segment import Segmentation
from atesd_mc.data.tokenizer import Tokenizer
from atesd_mc.exposure.reveal import reveal_tokens

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
REFERENCE_INTRO = "Here is a reference solution to this problem:"
TRANSITION = ("After understanding the reference solution and the rationale behind each step, "
              "now articulate your own step-by-step reasoning that derives the same final answer "
              "to the problem below:")
# The fixed template text as whole phrases: the embedded task's tokenizer makes each one token so a
# 4-layer model's prompts stay short (student 17 tokens instead of 40, teacher ~40 instead of ~110);
# with the long spelled-out template the tiny warm-started student copied problem keys wrongly
# (docs/FINDINGS.md). Real tokenizers are left as they are.
TEMPLATE_PHRASES = ("Problem: ", BOXED_INSTRUCTION, REFERENCE_INTRO, TRANSITION, "Final answer: ",
                    "user", "assistant")
# Private-use characters: cannot occur in real text, survive any chat template unchanged.
_REF_MARK, _TAIL_MARK = "\ue000", "\ue001"
TOKEN_DTYPE = np.int32


def student_user_text(problem: str) -> str:
    return f"Problem: {problem}\n\n{BOXED_INSTRUCTION}"


def answer_line(answer: str) -> str:
    """The answer piece, newline included (the template's newline after {y*})."""
    return f"Final answer: \\boxed{{{answer}}}\n"


def _teacher_user_text(problem: str, reference: str, tail: str) -> str:
    return f"{problem}\n\n{REFERENCE_INTRO}\n{reference}{tail}"


def _tail_text() -> str:
    return f"{TRANSITION}\n{BOXED_INSTRUCTION}"


def teacher_user_text(problem: str, seg: Segmentation, n_revealed: int) -> str:
    reference = seg.reasoning_text(n_revealed) + answer_line(seg.answer)
    return _teacher_user_text(problem, reference, _tail_text())


def _chat(tok: Tokenizer, user: str, enable_thinking: bool) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}],
                                   add_generation_prompt=True, enable_thinking=enable_thinking)


def render_student_prompt(tok: Tokenizer, problem: str, enable_thinking: bool = True) -> str:
    """Chat-rendered student prompt, ending with the assistant header."""
    return _chat(tok, student_user_text(problem), enable_thinking)


def render_teacher_prompt(tok: Tokenizer, problem: str, seg: Segmentation, n_revealed: int,
                          enable_thinking: bool = True) -> str:
    """Chat-rendered teacher prompt with the first n_revealed segments shown."""
    return _chat(tok, teacher_user_text(problem, seg, n_revealed), enable_thinking)


def student_tokens(tok: Tokenizer, problem: str, enable_thinking: bool = True) -> np.ndarray:
    return np.asarray(tok.encode(render_student_prompt(tok, problem, enable_thinking)),
                      dtype=TOKEN_DTYPE)


@dataclass(frozen=True, eq=False)  # numpy fields: == would be ambiguous
class TeacherPieces:
    """The teacher prompt of one example as token pieces; any reveal level is a prefix cut.

    Full teacher prompt with k segments revealed:
    ``prefix + reference[:segment_ends[k-1]] + answer + transition`` (k = 0: no reference)."""

    prefix: np.ndarray
    """Chat header + problem + "Here is a reference solution to this problem:\\n"."""
    reference: np.ndarray
    """All reasoning segments (each with its separator), tokenised segment by segment."""
    segment_ends: np.ndarray
    """End offset (exclusive) of each segment in `reference`; increasing, last = len(reference)."""
    answer: np.ndarray
    """The answer line: Final answer: \\boxed{A} and its newline."""
    transition: np.ndarray
    """Transition prompt + boxed instruction + end of the user turn + assistant header."""

    @property
    def num_segments(self) -> int:
        return len(self.segment_ends)

    def reveal_length(self, n_revealed: int) -> int:
        """Reference tokens shown when the first n_revealed segments are revealed."""
        if not 0 <= n_revealed <= self.num_segments:
            raise ValueError(f"n_revealed={n_revealed} outside [0, {self.num_segments}]")
        return int(self.segment_ends[n_revealed - 1]) if n_revealed else 0

    def reveal_cut(self, alpha: float, unit: str = "segment") -> int:
        """Reference tokens shown at reveal ratio alpha: the one reveal rule (exposure/reveal.py),
        so a teacher prompt built here matches the one training packs (kernels.reveal_lengths)."""
        return reveal_tokens(self.segment_ends, alpha, unit, total_tokens=len(self.reference))

    def tokens_at(self, alpha: float, unit: str = "segment") -> np.ndarray:
        """Full teacher prompt at reveal ratio alpha (unit "segment" or "token")."""
        return self.tokens(n_tokens=self.reveal_cut(alpha, unit))

    def tokens(self, n_revealed: int | None = None, *, n_tokens: int | None = None) -> np.ndarray:
        """Full teacher prompt: n_revealed whole segments, or (token unit) n_tokens tokens."""
        if (n_revealed is None) == (n_tokens is None):
            raise ValueError("give exactly one of n_revealed and n_tokens")
        cut = self.reveal_length(n_revealed) if n_revealed is not None else int(n_tokens)
        if not 0 <= cut <= len(self.reference):
            raise ValueError(f"n_tokens={cut} outside [0, {len(self.reference)}]")
        return np.concatenate([self.prefix, self.reference[:cut], self.answer, self.transition])

    def max_length(self) -> int:
        """Length of the fully revealed teacher prompt."""
        return len(self.prefix) + len(self.reference) + len(self.answer) + len(self.transition)


def _split_rendered(rendered: str) -> tuple[str, str]:
    """(text before the reference, text after the answer) of a rendered marker prompt."""
    if rendered.count(_REF_MARK) != 1 or rendered.count(_TAIL_MARK) != 1:
        raise ValueError("the chat template changed the user message (reference markers lost)")
    head, rest = rendered.split(_REF_MARK)
    between, tail = rest.split(_TAIL_MARK)
    if between:
        raise ValueError("the chat template inserted text inside the user message")
    return head, tail


def teacher_pieces(tok: Tokenizer, problem: str, seg: Segmentation,
                   enable_thinking: bool = True) -> TeacherPieces:
    """Tokenise one example's teacher prompt into pieces (see module doc)."""
    user = _teacher_user_text(problem, _REF_MARK, _TAIL_MARK + _tail_text())
    head, tail = _split_rendered(_chat(tok, user, enable_thinking))
    enc = tok.encode_batch([head, *seg.pieces(), answer_line(seg.answer), tail])
    seg_tokens = enc[1:-2]
    ends = np.cumsum([len(t) for t in seg_tokens], dtype=np.int64).astype(TOKEN_DTYPE)
    reference = np.asarray([i for t in seg_tokens for i in t], dtype=TOKEN_DTYPE)
    return TeacherPieces(prefix=np.asarray(enc[0], dtype=TOKEN_DTYPE), reference=reference,
                         segment_ends=ends, answer=np.asarray(enc[-2], dtype=TOKEN_DTYPE),
                         transition=np.asarray(enc[-1], dtype=TOKEN_DTYPE))


def teacher_prompt_tokens(pieces: TeacherPieces, n_revealed: int) -> np.ndarray:
    """Reference implementation of the packed teacher prompt (for kernels and generation)."""
    return pieces.tokens(n_revealed)
