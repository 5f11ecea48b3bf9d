"""Answer extraction, checking, Avg@k / Pass@k / Maj@k and results files (docs/METHOD.md,
Evaluation); benchmark files are read by atesd_mc/eval_files.py.

Checking: the response's answer is the inside of its last ``\\boxed{}`` / ``\\fbox{}`` (GSM8K's
``#### N`` when there is no box). It is compared with the reference by math-verify (both wrapped
in ``\\boxed{}``, so math-verify sees exactly the extracted answers); a normalised string compare
(spaces, ``\\text{}``, ``\\dfrac``, ``$``, trailing period, ...) also counts as a match, which
catches what math-verify cannot parse. math-verify's timeouts use SIGALRM, which only works in
the main thread; elsewhere the check runs without a timeout rather than crashing.

Majority vote (Maj@k): extracted answers are grouped into clusters of mutually equivalent answers
(each joins the first earlier cluster whose first answer it matches); responses with no answer
do not vote. The largest cluster wins; a tie goes to the cluster whose first member came first.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import threading
from typing import Callable, Sequence

from atesd_mc.data.segment import gsm8k_split, last_boxed
from atesd_mc.eval_files import EvalProblem

VERIFY_TIMEOUT_S = 5
GenerateFn = Callable[..., list]  # (prompts, k, temperature, top_p, max_new_tokens) -> [[str]*k]


def extract_answer(text: str) -> str | None:
    """Last \\boxed{..} / \\fbox{..} (brace matched); else GSM8K's "#### N"; else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    split = gsm8k_split(text)
    if split is not None and split[1]:
        return split[1]
    return None


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_UNIT_RE = re.compile(r"\\(?:text|mbox)\s*\{\s*[a-zA-Z ]*\}\s*$")


def normalize_answer(s: str) -> str:
    """Canonical string form for the fallback compare (not a math parser)."""
    s = s.strip().strip("$").strip()
    s = _UNIT_RE.sub("", s) if not _UNIT_RE.fullmatch(s) else s  # "5\text{ cm}" -> "5"
    s = _TEXT_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("$", "").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.lower()


def _math_verify(reference: str, predicted: str) -> bool | None:
    """math-verify's verdict, or None if it could not parse one side (or is not installed: then
    the normalised string compare decides alone, with one warning per process)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        import warnings

        warnings.warn("math-verify is not installed: answers are compared as normalised strings only")
        return None

    main = threading.current_thread() is threading.main_thread()
    timeout = VERIFY_TIMEOUT_S if main else None  # SIGALRM only exists in the main thread
    try:
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy raise arbitrary errors on odd input; fall back
        return None


def answers_match(reference: str, predicted: str) -> bool:
    """Two extracted answers are the same (math-verify, or normalised strings)."""
    if normalize_answer(reference) == normalize_answer(predicted):
        return True
    return bool(_math_verify(reference, predicted))


def is_correct(response_text: str, reference_answer: str) -> bool:
    """The response's final answer matches the reference answer."""
    predicted = extract_answer(response_text)
    return predicted is not None and answers_match(reference_answer, predicted)


# --- metrics -----------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c={c} <= n={n} and 1 <= k={k} <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: Sequence[str | None],
                    match: Callable[[str, str], bool] = answers_match) -> str | None:
    """The majority answer by equivalence clusters (tie rule in the module doc)."""
    clusters: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        home = next((c for c in clusters if match(c[0], a)), None)
        if home is None:
            clusters.append([a])
        else:
            home.append(a)
    if not clusters:
        return None
    return max(clusters, key=len)[0]  # max() keeps the first of equal maxima


def score_problem(problem: EvalProblem, responses: Sequence[str]) -> dict:
    """Per-problem record: responses, extracted answers, verdicts, majority."""
    extracted = [extract_answer(r) for r in responses]
    correct = [a is not None and answers_match(problem.answer, a) for a in extracted]
    majority = majority_answer(extracted)
    return {"index": problem.index, "problem": problem.problem, "reference": problem.answer,
            "responses": list(responses), "extracted": extracted, "correct": correct,
            "n_correct": sum(correct), "majority_answer": majority,
            "majority_correct": majority is not None and answers_match(problem.answer, majority)}


def aggregate(records: Sequence[dict], k: int) -> dict:
    """Avg@k, Pass@k, Maj@k (fractions) and unbiased pass@j for j in 1, 2, 4, ... < k."""
    if not records:
        return {"n_problems": 0}
    n = len(records)
    out = {"n_problems": n, "k": k,
           f"avg@{k}": sum(r["n_correct"] / len(r["correct"]) for r in records) / n,
           f"pass@{k}": sum(r["n_correct"] > 0 for r in records) / n,
           f"maj@{k}": sum(r["majority_correct"] for r in records) / n}
    j = 1
    while j < k:
        out[f"pass@{j}_unbiased"] = sum(pass_at_k(len(r["correct"]), r["n_correct"], j)
                                        for r in records) / n
        j *= 2
    return out


# --- running a benchmark -----------------------------------------------------------------------

def evaluate_problems(problems: Sequence[EvalProblem], generate_fn: GenerateFn, k: int, *,
                      temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 1024,
                      prompt_fn: Callable[[str], str] | None = None,
                      batch_size: int | None = None) -> dict:
    """Generate k responses per problem, check them, and aggregate.

    generate_fn(prompts, k, temperature, top_p, max_new_tokens) -> one list of k strings per
    prompt. prompt_fn maps a problem to the prompt string; the default is the student user
    message (templates.student_user_text); pass e.g. ``lambda x: render_student_prompt(tok, x)``
    when the generator expects chat-rendered text. batch_size problems go to one generate call
    (default: all). Returns {"settings", "aggregate", "problems": [per-problem records]}."""
    if prompt_fn is None:
        from atesd_mc.data.templates import student_user_text as prompt_fn
    step = batch_size or max(1, len(problems))
    records = []
    for start in range(0, len(problems), step):
        batch = problems[start:start + step]
        outputs = generate_fn([prompt_fn(p.problem) for p in batch], k, temperature, top_p,
                              max_new_tokens)
        if len(outputs) != len(batch) or any(len(o) != k for o in outputs):
            raise ValueError(f"generate_fn returned {[len(o) for o in outputs]} responses for "
                             f"{len(batch)} prompts x k={k}")
        records += [score_problem(p, o) for p, o in zip(batch, outputs)]
    settings = {"k": k, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens}
    return {"settings": settings, "aggregate": aggregate(records, k), "problems": records}


def write_results(path: str, results: dict[str, dict], meta: dict | None = None, *,
                  overwrite: bool = False) -> str:
    """Write {"meta", "benchmarks": {name: evaluate_problems(...)}} as JSON. The file appears
    whole (written beside it, then linked or renamed into place); an existing file is replaced
    only with overwrite=True, else FileExistsError (checked by the link itself, so a file that
    appears meanwhile is not replaced either)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"meta": meta or {}, "benchmarks": results}, f, indent=1, ensure_ascii=False)
    if overwrite:
        os.replace(tmp, path)
        return path
    try:
        _link_new(tmp, path)
    finally:
        os.unlink(tmp)
    return path


def _link_new(tmp: str, path: str) -> None:
    """Give tmp's content the name path, failing with FileExistsError if path exists."""
    try:
        os.link(tmp, path)  # atomic, and never replaces
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists") from None
    except OSError:  # a file system without hard links: exclusive create, then copy
        import shutil

        with open(tmp, "rb") as src, open(path, "xb") as dst:
            shutil.copyfileobj(src, dst)


def write_new_results(directory: str, results: dict[str, dict], meta: dict | None = None, *,
                      now: datetime.datetime | None = None) -> str:
    """Write results to a new file directory/results-<UTC time>.json (-2, -3, ... appended when
    that name is taken); never over an old one. Returns the path."""
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 10_000):
        path = os.path.join(directory, f"results-{stamp}{'' if n == 1 else f'-{n}'}.json")
        if os.path.exists(path):
            continue
        try:
            return write_results(path, results, meta)
        except FileExistsError:  # taken between the check and the link: try the next name
            continue
    raise FileExistsError(f"{directory}: no free results-{stamp}-N.json name")


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per benchmark (percent), and their mean when there are several."""
    rows, ks = [], {r["aggregate"].get("k") for r in results.values()}
    k = ks.pop() if len(ks) == 1 else None
    head = ["benchmark", "n", f"Avg@{k or 'k'}", f"Pass@{k or 'k'}", f"Maj@{k or 'k'}"]
    for name, res in results.items():
        a = res["aggregate"]
        kk = a.get("k")
        rows.append([name, a.get("n_problems", 0), *(100 * a.get(f"{m}@{kk}", float("nan"))
                                                    for m in ("avg", "pass", "maj"))])
    if len(rows) > 1:
        rows.append(["mean", sum(r[1] for r in rows),
                     *(sum(r[i] for r in rows) / len(rows) for i in (2, 3, 4))])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | " + " | ".join(f"{v:.2f}" for v in r[2:]) + " |")
    return "\n".join(lines)
