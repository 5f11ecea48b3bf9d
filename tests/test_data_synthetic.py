"""The embedded synthetic task: determinism, disjoint splits, correct answers, solution format,
and the warm-start mix (novel facts never reach the weights)."""
from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections import Counter

import pytest

from atesd_mc.data.segment import segment_solution
from atesd_mc.data.synthetic import (LETTERS, SyntheticTaskConfig, corpus, hidden_table,
                                     key_id, key_name, lookup_order, make_splits, novel_keys,
                                     parse_problem, solve, warm_start_examples)

SMALL = SyntheticTaskConfig(train_size=3000, probe_size=32, eval_size=100)
LOOKUP_RE = re.compile(r"^([a-zA-Z]|f\d+)=(\d)$")
ADD_RE = re.compile(r"^(\d+)\+(\d)=(\d+)$")


def check_solution(ex: dict, table: dict[int, int], lookup_order_kind: str = "problem") -> None:
    """One step per line, no blank line, lookups then running sums then the box, all correct."""
    keys = parse_problem(ex["problem"])
    n = len(keys)
    lines = ex["solution"].split("\n")
    assert len(lines) == 2 * n and all(line and line == line.strip() for line in lines)
    seen = []
    for line in lines[:n]:
        m = LOOKUP_RE.match(line)
        assert m, line
        k = key_id(m.group(1))
        assert int(m.group(2)) == table[k]
        seen.append(k)
    assert sorted(seen) == sorted(keys)
    if lookup_order_kind == "problem":
        assert seen == keys
    total = table[seen[0]]
    for line, k in zip(lines[n:2 * n - 1], seen[1:]):
        m = ADD_RE.match(line)
        assert m, line
        assert (int(m.group(1)), int(m.group(2))) == (total, table[k])
        total += table[k]
        assert int(m.group(3)) == total
    assert lines[-1] == f"\\boxed{{{total}}}"
    assert ex["answer"] == str(total) == str(solve(ex["problem"], table))


def test_deterministic_by_seed_and_seed_matters():
    a, b = make_splits(SMALL), make_splits(SMALL)
    assert a == b
    assert hidden_table(SMALL) == hidden_table(SMALL) and novel_keys(SMALL) == novel_keys(SMALL)
    other = dataclasses.replace(SMALL, seed=1)
    assert make_splits(other)["eval"] != a["eval"]
    assert hidden_table(other) != hidden_table(SMALL)
    assert list(itertools.islice(warm_start_examples(SMALL, 5, a["train"]), 200)) == \
        list(itertools.islice(warm_start_examples(SMALL, random.Random(5)), 200))
    assert list(corpus(SMALL)) == list(corpus(SMALL))


def test_split_sizes_and_disjointness():
    sp = make_splits(SMALL)
    assert set(sp) == {"train", "probe", "eval", "val", "prior"} and sp["val"] == sp["prior"] == []
    assert (len(sp["train"]), len(sp["probe"]), len(sp["eval"])) == (3000, 32, 100)
    sets = {name: {frozenset(parse_problem(r["problem"])) for r in rows}
            for name, rows in sp.items()}
    texts = {name: {r["problem"] for r in rows} for name, rows in sp.items()}
    for x, y in (("train", "probe"), ("train", "eval"), ("probe", "eval")):
        assert not texts[x] & texts[y]
        assert not sets[x] & sets[y]  # not even a reordering of a held-out problem
    assert len(sets["eval"]) == 100 and len(sets["probe"]) == 32  # held-out problems distinct


@pytest.mark.parametrize("overrides", [{}, {"lookup_order": "random"},
                                       {"key_style": "f_number", "num_keys": 120, "max_steps": 5}])
def test_answers_and_format(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    table = hidden_table(cfg)
    sp = make_splits(cfg)
    for rows in sp.values():
        for ex in rows:
            assert set(ex) == {"problem", "solution", "answer"}
            n = len(parse_problem(ex["problem"]))
            assert cfg.min_steps <= n <= cfg.max_steps
            assert len(set(parse_problem(ex["problem"]))) == n  # distinct keys
            check_solution(ex, table, cfg.lookup_order)


def test_segmenter_cuts_one_segment_per_line_and_half_reveals_the_lookups():
    from atesd_mc.exposure.reveal import revealed_count
    for ex in make_splits(SMALL)["eval"][:50]:
        seg = segment_solution(ex["solution"])
        n = len(parse_problem(ex["problem"]))
        assert seg.unit == "line" and len(seg.segments) == 2 * n
        assert seg.answer == ex["answer"]
        shown = seg.segments[:revealed_count(0.5, len(seg.segments))]
        assert all(LOOKUP_RE.match(s) for s in shown) and len(shown) == n


def test_table_values_and_novel_fraction():
    table = hidden_table(SMALL)
    assert len(table) == SMALL.num_keys
    assert all(SMALL.min_value <= v <= SMALL.max_value for v in table.values())
    assert len(novel_keys(SMALL)) == round(SMALL.novel_fraction * SMALL.num_keys)
    assert all(key_id(key_name(k)) == k for k in range(len(LETTERS)))
    assert key_id("f17") == 17


def test_warm_start_mix():
    cfg = SMALL
    table, novel = hidden_table(cfg), novel_keys(cfg)
    train = make_splits(cfg)["train"]
    stream = list(itertools.islice(warm_start_examples(cfg, 0, train), 4000))
    kinds = Counter(kind for kind, _, _ in stream)
    assert abs(kinds["teacher"] / len(stream) - cfg.warm_teacher_fraction) < 0.05
    novel_values = Counter()
    problems = {r["problem"] for r in train}
    for kind, ex, k in stream:
        assert ex["problem"] in problems
        keys = parse_problem(ex["problem"])
        n = len(keys)
        # the example is consistent with its own (partly counterfactual) values
        values = dict(table)
        for line in ex["solution"].split("\n")[:n]:
            name, v = line.split("=")
            values[key_id(name)] = int(v)
        for kk in keys:
            if kk not in novel:
                assert values[kk] == table[kk]  # known facts are true
            else:
                novel_values[values[kk] == table[kk]] += 1
        check_solution(ex, values)
        if kind == "student":
            assert k is None and "reference" not in ex
        else:
            assert 0 <= k <= 2 * n
            check_solution({**ex, "solution": ex["reference"]}, values)
            assert lookup_order({**ex, "solution": ex["reference"]}) == keys
    # novel values are fresh draws: right only by chance (1/9), so the weights cannot learn them
    frac = novel_values[True] / sum(novel_values.values())
    assert 0.06 < frac < 0.17


def test_random_order_reorders_teacher_targets():
    cfg = dataclasses.replace(SMALL, lookup_order="random")
    stream = itertools.islice(warm_start_examples(cfg, 1), 2000)
    teacher = [ex for kind, ex, _ in stream if kind == "teacher"]
    differs = sum(lookup_order(ex) != lookup_order({**ex, "solution": ex["reference"]})
                  for ex in teacher)
    assert differs > 0.4 * len(teacher)


def test_corpus_covers_task_and_templates():
    text = "\n".join(corpus(SMALL))
    assert "Here is a reference solution to this problem:" in text
    assert "Final answer: \\boxed{" in text and "Please reason step by step" in text
    ex = make_splits(SMALL)["eval"][0]
    assert ex["problem"] in text and ex["solution"] in text


def test_config_validation():
    with pytest.raises(ValueError):
        SyntheticTaskConfig(min_steps=1)
    with pytest.raises(ValueError):
        SyntheticTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        SyntheticTaskConfig(num_keys=60)  # letters allow 52
    with pytest.raises(ValueError):
        SyntheticTaskConfig(lookup_order="sorted")
    with pytest.raises(ValueError):
        SyntheticTaskConfig(novel_fraction=1.0)


def test_validation_and_prior_skill_splits():
    """val and prior are disjoint from every other split (no key set shared with train either),
    prior holds known keys only, and adding them leaves the test and probe splits as they were."""
    base = SyntheticTaskConfig(seed=5, train_size=3000, probe_size=16, eval_size=300)
    cfg = SyntheticTaskConfig(seed=5, train_size=3000, probe_size=16, eval_size=300, val_size=200, prior_size=100)
    plain, s = make_splits(base), make_splits(cfg)
    assert plain["val"] == [] and plain["prior"] == []
    assert s["eval"] == plain["eval"] and s["probe"] == plain["probe"]
    assert len(s["val"]) == 200 and len(s["prior"]) == 100
    keysets = {name: {frozenset(parse_problem(r["problem"])) for r in s[name]} for name in s}
    for a in ("eval", "probe", "val", "prior"):
        assert not keysets[a] & keysets["train"], a
        for b in ("eval", "probe", "val", "prior"):
            assert a == b or not keysets[a] & keysets[b], (a, b)
    novel = novel_keys(cfg)
    assert all(not set(parse_problem(r["problem"])) & novel for r in s["prior"])
    assert any(set(parse_problem(r["problem"])) & novel for r in s["val"])
    table = hidden_table(cfg)
    assert all(int(r["answer"]) == solve(r["problem"], table) for r in s["val"] + s["prior"])
