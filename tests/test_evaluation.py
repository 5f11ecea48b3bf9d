"""Answer extraction and checking, metrics, benchmark loading, results
(docs/METHOD.md, Evaluation)."""
from __future__ import annotations

import json
import os
import threading

import pytest
from math_verify import parse, verify
from test_data_fixtures import MATH_EVAL, need, tmp_dir

from atesd_mc.evaluation import (EvalProblem, aggregate, answers_match, evaluate_problems,
                                 extract_answer, format_table, is_correct, load_eval_jsonl,
                                 majority_answer, pass_at_k, score_problem, write_results)

BENCHMARKS = ("aime24", "aime25", "hmmt25")


def _load(name):
    return load_eval_jsonl(need(os.path.join(MATH_EVAL, f"{name}.jsonl")))


def test_extract_answer():
    assert extract_answer("x \\boxed{1} then \\boxed{\\frac{a}{b}} done") == "\\frac{a}{b}"
    assert extract_answer("\\fbox{12}") == "12"
    assert extract_answer("so 3+4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,080\ntrailing") == "1080"
    assert extract_answer("the answer is 7") is None


def test_real_answers_self_correct_neighbour_wrong():
    """All 90 AIME24/AIME25/HMMT25 answers: boxed self is right, the next problem's is wrong."""
    for name in BENCHMARKS:
        probs = _load(name)
        assert len(probs) == 30
        for i, p in enumerate(probs):
            neighbour = probs[(i + 1) % 30].answer
            assert neighbour != p.answer
            assert is_correct(f"Thus the answer is \\boxed{{{p.answer}}}.", p.answer), (name, i)
            assert not is_correct(f"\\boxed{{{neighbour}}}", p.answer), (name, i, neighbour)


def test_pair_answer_compared_as_set():
    p = _load("hmmt25")[9]
    assert p.answer == "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"
    assert is_correct("\\boxed{\\frac{-1-\\sqrt{17}}{2}, \\frac{-1+\\sqrt{17}}{2}}", p.answer)
    assert not is_correct("\\boxed{\\frac{-1+\\sqrt{17}}{2}}", p.answer)  # one of two


EQUIVALENT = [("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("204", " 204 "),
              ("204", "204\\text{ cm}"), ("\\sqrt{\\frac{95}{24}}", "\\frac{\\sqrt{570}}{12}"),
              ("\\frac{1}{576}", "1/576"), ("1080", "1,080"), ("3375", "3375")]
DIFFERENT = [("204", "205"), ("\\frac{1}{2}", "2"), ("8\\sqrt{10}", "8\\sqrt{11}")]


@pytest.mark.parametrize("ref, pred", EQUIVALENT + DIFFERENT)
def test_equivalent_forms_judged_as_math_verify(ref, pred):
    mv = verify(parse(f"\\boxed{{{ref}}}"), parse(f"\\boxed{{{pred}}}"))
    assert answers_match(ref, pred) == mv == ((ref, pred) in EQUIVALENT)


def test_string_fallback_where_math_verify_cannot_parse():
    assert not verify(parse("\\boxed{5}"), parse("\\boxed{5.}"))
    assert answers_match("5", "5.")  # trailing period
    assert answers_match("\\text{Monday}", "$\\text{ monday }$")


def test_check_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(
        (is_correct("\\boxed{0.5}", "\\frac{1}{2}"), is_correct("\\boxed{3}", "2"))))
    t.start()
    t.join()
    assert out == [(True, False)]


# Fixed table of fake responses, k = 4; hand-computed metrics below.
TABLE = [
    ("5", ["\\boxed{5}", "\\boxed{6}", "no answer", "\\boxed{5}"]),           # 2 right, maj 5
    ("\\frac{1}{2}", ["\\boxed{0.5}", "\\boxed{3}", "\\boxed{3}",
                      "\\boxed{\\dfrac{1}{2}}"]),                              # 2 right, tie -> 0.5
    ("7", ["\\boxed{8}", "\\boxed{8}", "\\boxed{7}", "#### 9"]),               # 1 right, maj 8
    ("10", ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"]),          # 0 right, maj 1
]


def test_metrics_on_fixed_table():
    probs = [EvalProblem(f"q{i}", ref, i) for i, (ref, _) in enumerate(TABLE)]
    records = [score_problem(p, r) for p, (_, r) in zip(probs, TABLE)]
    assert [r["n_correct"] for r in records] == [2, 2, 1, 0]
    assert [r["majority_answer"] for r in records] == ["5", "0.5", "8", "1"]
    agg = aggregate(records, 4)
    assert agg["avg@4"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 0) / 4)  # 0.3125
    assert agg["pass@4"] == pytest.approx(3 / 4)
    assert agg["maj@4"] == pytest.approx(2 / 4)
    assert agg["pass@1_unbiased"] == pytest.approx(0.3125)
    assert agg["pass@2_unbiased"] == pytest.approx((5 / 6 + 5 / 6 + 1 / 2 + 0) / 4)


def test_pass_at_k_and_majority_rules():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert majority_answer([None, None]) is None
    assert majority_answer(["2", "1", "1", "2"]) == "2"  # tie: earliest cluster
    assert majority_answer(["1", "\\frac{1}{2}", "0.5"]) == "\\frac{1}{2}"  # clusters merge forms


def test_aime25_escape_typos_repaired():
    probs = _load("aime25")
    for p in probs:
        assert "\x0c" not in p.problem and "\t" not in p.problem
    assert "\\frac{\\log_k" in probs[18].problem        # line 19: "\f" + "rac"
    assert "\\triangle DEF" in probs[19].problem        # line 20: "\t" + "riangle"
    assert "x_1=\\frac{25}{11}" in probs[27].problem    # line 28
    raw = load_eval_jsonl(os.path.join(MATH_EVAL, "aime25.jsonl"), repair=False)
    assert "\x0crac" in raw[18].problem and "\triangle" in raw[19].problem


def test_evaluate_problems_writes_results_and_table():
    probs = [EvalProblem(f"q{i}", ref, i) for i, (ref, _) in enumerate(TABLE)]
    calls = []

    def generate(prompts, k, temperature, top_p, max_new_tokens):
        calls.append((len(prompts), k, temperature, top_p, max_new_tokens))
        return [TABLE[int(p.split("Problem: q")[1][0])][1] for p in prompts]

    res = evaluate_problems(probs, generate, 4, max_new_tokens=64, batch_size=3)
    assert calls == [(3, 4, 1.0, 0.95, 64), (1, 4, 1.0, 0.95, 64)]
    assert res["aggregate"]["avg@4"] == pytest.approx(0.3125)
    assert res["problems"][2]["extracted"] == ["8", "8", "7", "9"]
    path = write_results(os.path.join(tmp_dir(), "out", "results.json"),
                         {"toy": res, "toy2": res}, meta={"model": "fake"})
    saved = json.load(open(path))
    assert saved["meta"] == {"model": "fake"}
    assert saved["benchmarks"]["toy"]["problems"][0]["correct"] == [True, False, False, True]
    table = format_table(saved["benchmarks"])
    assert "| toy | 4 | 31.25 | 75.00 | 50.00 |" in table
    assert "| mean | 8 | 31.25 | 75.00 | 50.00 |" in table
    with pytest.raises(ValueError, match="responses"):
        evaluate_problems(probs, lambda p, k, *a: [["x"]] * len(p), 4)


def test_load_errors_name_file_and_line():
    path = os.path.join(tmp_dir(), "b.jsonl")
    with open(path, "w") as f:
        f.write('{"problem": "p", "answer": "1"}\n{"problem": "p"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: field 'answer': missing"):
        load_eval_jsonl(path)
