"""Student/teacher prompts (docs/METHOD.md, Prompts) and the teacher token pieces used for
packing."""
from __future__ import annotations

import numpy as np
import pytest
from test_data_fixtures import bpe_tokenizer, gsm8k_rows

from atesd_mc.data.segment import Segmentation, segment_solution
from atesd_mc.data.templates import (render_student_prompt, render_teacher_prompt,
                                     student_tokens, student_user_text, teacher_pieces,
                                     teacher_prompt_tokens, teacher_user_text)

SEG = Segmentation(("Step one.", "Step two."), "paragraph", "42")


def test_student_prompt_exact():
    assert student_user_text("What is 6*7?") == (
        "Problem: What is 6*7?\n\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.")
    tok = bpe_tokenizer()
    text = render_student_prompt(tok, "What is 6*7?", enable_thinking=False)
    assert text == ("<|im_start|>user\n" + student_user_text("What is 6*7?") +
                    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert list(student_tokens(tok, "What is 6*7?", False)) == tok.encode(text)


def test_teacher_text_exact_for_each_reveal_level():
    tail = ("After understanding the reference solution and the rationale behind each step, now "
            "articulate your own step-by-step reasoning that derives the same final answer to the "
            "problem below:\nPlease reason step by step, and put your final answer within "
            "\\boxed{}.")
    head = "What is 6*7?\n\nHere is a reference solution to this problem:\n"
    assert teacher_user_text("What is 6*7?", SEG, 0) == head + "Final answer: \\boxed{42}\n" + tail
    assert teacher_user_text("What is 6*7?", SEG, 1) == (
        head + "Step one.\n\nFinal answer: \\boxed{42}\n" + tail)
    assert teacher_user_text("What is 6*7?", SEG, 2) == (
        head + "Step one.\n\nStep two.\n\nFinal answer: \\boxed{42}\n" + tail)


def test_pieces_equal_whole_prompt_tokenisation_at_every_level():
    """With a Qwen-style pre-tokeniser, prefix+reference[:end_k]+answer+transition equals
    encode(rendered teacher prompt) for every k: the pieces are a faithful tokenisation."""
    tok = bpe_tokenizer()
    for row in gsm8k_rows(150):
        seg = segment_solution(row["answer"], answer_format="gsm8k", strip_calculator=True)
        for thinking in (True, False):
            pieces = teacher_pieces(tok, row["question"], seg, thinking)
            assert pieces.num_segments == len(seg.segments)
            assert pieces.segment_ends[-1] == len(pieces.reference)
            assert np.all(np.diff(pieces.segment_ends) > 0)
            for k in range(len(seg.segments) + 1):
                want = tok.encode(render_teacher_prompt(tok, row["question"], seg, k, thinking))
                assert list(teacher_prompt_tokens(pieces, k)) == want


def test_piece_contents_and_token_unit():
    tok = bpe_tokenizer()
    p = teacher_pieces(tok, "What is 6*7?", SEG, enable_thinking=False)
    assert tok.decode(p.prefix).endswith("Here is a reference solution to this problem:\n")
    assert tok.decode(p.prefix).startswith("<|im_start|>user\nWhat is 6*7?")
    assert tok.decode(p.reference[:p.segment_ends[0]]) == "Step one.\n\n"
    assert tok.decode(p.answer) == "Final answer: \\boxed{42}\n"
    assert tok.decode(p.transition).startswith("After understanding")
    assert tok.decode(p.transition).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert p.tokens(n_tokens=3).tolist() == (
        p.prefix.tolist() + p.reference[:3].tolist() + p.answer.tolist() + p.transition.tolist())
    assert p.tokens(2).dtype == np.int32 and len(p.tokens(2)) == p.max_length()
    with pytest.raises(ValueError):
        p.tokens(3)
    with pytest.raises(ValueError):
        p.tokens(1, n_tokens=2)


def test_teacher_context_at_alpha_uses_the_one_reveal_rule():
    """tokens_at(alpha) shows exactly revealed_count(alpha, m) segments (0.58 of 50 segments is 29,
    though 0.58 * 50 < 29 in floating point), and the same prompt that training packs."""
    import torch

    from atesd_mc.batching import build_pair
    from atesd_mc.exposure.reveal import revealed_count

    tok = bpe_tokenizer()
    seg = Segmentation(tuple(f"Step {i}." for i in range(50)), "paragraph", "42")
    p = teacher_pieces(tok, "What is 6*7?", seg, enable_thinking=False)
    assert p.num_segments == 50 and 0.58 * 50 < 29
    for alpha in (0.0, 0.29, 0.58, 0.7, 1.0):
        n = revealed_count(alpha, 50)
        assert p.tokens_at(alpha).tolist() == p.tokens(n).tolist()
        assert p.tokens_at(alpha).tolist() == tok.encode(
            render_teacher_prompt(tok, "What is 6*7?", seg, n, enable_thinking=False))
        cut = revealed_count(alpha, len(p.reference))
        assert p.tokens_at(alpha, "token").tolist() == p.tokens(n_tokens=cut).tolist()
    assert p.reveal_cut(0.58) == p.reveal_length(29)

    class Ex:  # the two fields build_pair reads from a store Example
        student, teacher = np.asarray(student_tokens(tok, "What is 6*7?", False)), p

    for alpha, unit in ((0.58, "segment"), (0.29, "token"), (1.0, "segment")):
        pair = build_pair([Ex()], [[7, 8]], alpha, unit, torch.device("cpu"))
        teacher_row = pair.teacher.tokens[0, :int(pair.teacher.lengths[0]) - 2]  # drop the rollout
        assert teacher_row.tolist() == p.tokens_at(alpha, unit).tolist()
