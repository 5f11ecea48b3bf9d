"""Segmentation of reference solutions and final-answer extraction (docs/METHOD.md, Segments
and the final answer)."""
from __future__ import annotations

import pytest
from test_data_fixtures import gsm8k_rows

from atesd_mc.data.segment import (SegmentationError, last_boxed, segment_solution,
                                   split_reasoning, strip_calculator_annotations)


def test_paragraphs_when_there_are_enough():
    text = "A one.\nA two.\n\nB.\n\n \nC.\n\nD. \\boxed{4}"
    seg = segment_solution(text)
    assert seg.unit == "paragraph"
    assert seg.segments == ("A one.\nA two.", "B.", "C.", "D. \\boxed{4}")
    assert seg.answer == "4"
    assert seg.reasoning_text(2) == "A one.\nA two.\n\nB.\n\n"
    assert seg.reasoning_text() == "".join(seg.pieces())


def test_falls_back_to_lines_then_sentences():
    lines = "First step.\n\nSecond.\nThird.\nFourth."
    assert split_reasoning(lines) == (["First step.", "Second.", "Third.", "Fourth."], "line")
    sentences = "We add 3.5 and 2. Then we get 5.5. Halve it. So 2.75, e.g. the answer."
    segs, unit = split_reasoning(sentences)
    assert unit == "sentence"
    assert segs == ["We add 3.5 and 2.", "Then we get 5.5.", "Halve it.",
                    "So 2.75, e.g. the answer."]


def test_under_four_everywhere_keeps_the_coarsest_with_most():
    assert split_reasoning("One line. Two.\nThree.") == (["One line.", "Two.", "Three."],
                                                          "sentence")
    assert split_reasoning("Line one\nline two") == (["Line one", "line two"], "line")
    assert split_reasoning("Just one") == (["Just one"], "paragraph")


def test_last_boxed_brace_matching():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"  # escaped braces are not grouping
    assert last_boxed("so \\fbox{7}.") == "7"
    assert last_boxed("\\boxed {x^{2}} and \\boxed{unclosed") == "x^{2}"
    assert last_boxed("answer \\boxed 5.") == "5."
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{3}, as asked: within \\boxed{}.") == "3"  # empty box skipped


def test_gsm8k_reasoning_before_hashes_without_calculator():
    row = gsm8k_rows(1)[0]
    seg = segment_solution(row["answer"], answer_format="gsm8k", strip_calculator=True)
    assert seg.answer == "72" and seg.unit == "line"
    assert seg.segments == ("Natalia sold 48/2 = 24 clips in May.",
                            "Natalia sold 48+24 = 72 clips altogether in April and May.")
    kept = segment_solution(row["answer"], answer_format="gsm8k")
    assert "<<48/2=24>>" in kept.segments[0]
    assert strip_calculator_annotations("$<<12/60=0.2>>0.2") == "$0.2"


def test_gsm8k_thousands_and_all_rows_segment():
    assert segment_solution("It costs 1,080.\n#### 1,080", answer_format="gsm8k").answer == "1080"
    for row in gsm8k_rows(2000):
        seg = segment_solution(row["answer"], answer_format="gsm8k", strip_calculator=True)
        text = seg.reasoning_text()
        assert seg.segments and "####" not in text and "<<" not in text


def test_answer_sources_and_errors():
    # The answer field wins over the box; a markdown "####" header is not a GSM8K answer.
    assert segment_solution("x \\boxed{3}", answer="4").answer == "4"
    assert segment_solution("#### Step 1\nso \\boxed{9}").answer == "9"
    with pytest.raises(SegmentationError) as e:
        segment_solution("no answer here")
    assert e.value.field == "solution" and "final answer" in e.value.reason
    with pytest.raises(SegmentationError, match="empty solution"):
        segment_solution("  \n")
    with pytest.raises(SegmentationError, match="####"):
        segment_solution("it is \\boxed{3}", answer_format="gsm8k")
    with pytest.raises(SegmentationError, match="no reasoning"):
        segment_solution("#### 5", answer_format="gsm8k")
