"""Answer extraction and checking, metrics, benchmark loading, results
(docs/METHOD.md, Evaluation)."""
from __future__ import annotations

import io
import json
import os
import threading

import pytest
from math_verify import parse, verify
from test_data_fixtures import MATH_EVAL, need, tmp_dir

from atesd_mc.eval_files import EvalProblem, load_eval_jsonl, read_eval_file
from atesd_mc.evaluation import (aggregate, answers_match, evaluate_problems, extract_answer,
                                 format_table, is_correct, majority_answer, pass_at_k,
                                 score_problem, write_new_results, write_results)
from atesd_mc.run_log import Progress

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


# --- benchmark formats ---------------------------------------------------------------------------

GSM8K_TEST = os.path.join(os.path.dirname(MATH_EVAL), "gsm8k", "test.jsonl")


def _first_rows(path, n):
    with open(need(path), encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_gsm8k_read_in_its_own_format():
    """GSM8K test: auto and --format gsm8k read question / the number after '####' (commas out)."""
    rows = _first_rows(GSM8K_TEST, 1319)
    want = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows]
    for fmt in ("auto", "gsm8k"):
        probs, spec = read_eval_file(GSM8K_TEST, fmt)
        assert spec.name == "gsm8k" and (spec.problem_key, spec.answer_key) == ("question", "answer")
        assert [p.answer for p in probs] == want
        assert [p.problem for p in probs] == [r["question"] for r in rows]  # no LaTeX repair
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in rows)  # the comma rule is exercised


def test_answer_only_detected_and_aliases():
    probs, spec = read_eval_file(os.path.join(MATH_EVAL, "hmmt25.jsonl"))
    assert spec.name == "answer-only" and probs[9].answer.startswith("\\frac{-1+\\sqrt{17}}{2}")
    for alias in ("aime", "hmmt", "answer-only"):
        assert read_eval_file(os.path.join(MATH_EVAL, "hmmt25.jsonl"), alias)[0] == probs


def test_boxed_format_and_key_overrides():
    path = os.path.join(tmp_dir(), "m.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}."}) + "\n")
        f.write(json.dumps({"problem": "q", "solution": "no box"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: field 'solution': no \\boxed\{\} final answer"):
        read_eval_file(path)
    custom = os.path.join(tmp_dir(), "c.jsonl")
    with open(custom, "w") as f:
        f.write(json.dumps({"prompt": "p", "final": 7}) + "\n")
    probs, spec = read_eval_file(custom, problem_key="prompt", answer_key="final")
    assert spec.name == "answer-only" and probs == [EvalProblem("p", "7", 0)]


def test_no_matching_fields_names_file_and_field():
    path = os.path.join(tmp_dir(), "x.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"question": "q", "label": "1"}) + "\n")
    with pytest.raises(ValueError) as e:
        read_eval_file(path)
    assert str(e.value) == (f"{path}:1: field 'answer' (or 'solution'): missing; the row has "
                            "'label', 'question' (pass --format or --answer-key)")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: field 'answer': no '#### N'"):
        with open(path, "w") as f:
            f.write(json.dumps({"question": "q", "answer": "2"}) + "\n")
        read_eval_file(path, "gsm8k")


# --- results files --------------------------------------------------------------------------------

def test_results_never_written_over_an_old_file():
    import datetime

    folder = os.path.join(tmp_dir(), "eval")
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    first = write_new_results(folder, {"a": {}}, {"n": 1}, now=when)
    second = write_new_results(folder, {"b": {}}, {"n": 2}, now=when)  # the same second
    assert os.path.basename(first) == "results-20250102T030405Z.json"
    assert os.path.basename(second) == "results-20250102T030405Z-2.json"
    assert json.load(open(first))["meta"] == {"n": 1} and json.load(open(second))["meta"] == {"n": 2}
    with pytest.raises(FileExistsError, match="already exists"):
        write_results(first, {"c": {}})
    assert json.load(open(first))["meta"] == {"n": 1}
    write_results(first, {"c": {}}, {"n": 3}, overwrite=True)
    assert json.load(open(first))["meta"] == {"n": 3}
    assert set(os.listdir(folder)) == {os.path.basename(first), os.path.basename(second)}


# --- progress -------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_log_lines_every_tenth_and_every_30s():
    clock, log = _Clock(), io.StringIO()
    bar = Progress(20, "eval x", rows_per_problem=2, stream=log, clock=clock)
    clock.now += 10
    bar.update(2, 50)     # 1 problem: 5%, no line
    clock.now += 10
    bar.update(4, 100)    # 2 problems: 10%
    clock.now += 31
    bar.update(5, 120)    # 2 problems still, but 31 s since the last line; ETA 35 rows * 51 s / 5
    clock.now += 9
    bar.update(40, 800)   # all done
    bar.close()
    assert log.getvalue().splitlines() == [
        "eval x: 0/20 problems (0%) | - tokens/s | elapsed 0:00 | ETA ?",
        "eval x: 2/20 problems (10%) | 5.0 tokens/s | elapsed 0:20 | ETA 3:00",
        "eval x: 2/20 problems (10%) | 2.4 tokens/s | elapsed 0:51 | ETA 5:57",
        "eval x: 20/20 problems (100%) | 13.3 tokens/s | elapsed 1:00 | ETA 0:00"]


def test_progress_redraws_in_place_on_a_terminal_and_is_silent_when_disabled():
    clock, tty = _Clock(), _Tty()
    with Progress(4, "e", stream=tty, clock=clock) as bar:
        clock.now += 2
        bar.update(1, 10)
    assert tty.getvalue() == ("\re: 0/4 problems (0%) | - tokens/s | elapsed 0:00 | ETA ?\x1b[K"
                              "\re: 1/4 problems (25%) | 5.0 tokens/s | elapsed 0:02 | ETA 0:06\x1b[K\n")
    quiet = io.StringIO()
    with Progress(4, "e", stream=quiet, clock=clock, enabled=False) as bar:
        bar.update(4, 10)
    assert quiet.getvalue() == ""


def test_generate_bucketed_reports_rows_and_tokens_after_each_bucket(monkeypatch):
    from atesd_mc import generation

    def fake_generate(model, prompts, params, generator, *, lean=False):
        return generation.Rollouts(tokens=[[7] * (len(p) % 3 + 1) for p in prompts],
                                   finished=[True] * len(prompts))

    monkeypatch.setattr(generation, "generate", fake_generate)
    prompts = [[1] * n for n in (40, 5, 90, 6, 7)]
    calls = []
    out = generation.generate_bucketed(None, prompts, generation.SamplingParams(max_new_tokens=4),
                                       None, max_batch=2, progress=lambda r, t: calls.append((r, t)))
    # buckets by length: [5, 6], [7] (40 - 7 > max_spread 32), [40], [90]
    assert calls == [(2, 4), (3, 6), (4, 8), (5, 9)]
    assert [len(t) for t in out.tokens] == [2, 3, 1, 1, 2]
