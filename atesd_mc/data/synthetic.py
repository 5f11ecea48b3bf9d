"""The embedded synthetic task: sums of looked-up facts ("context distillation of facts").

A hidden table f(k) (``num_keys`` keys -> one digit in [min_value, max_value]) is fixed by the task
seed. A problem asks for the sum of ``n`` distinct table entries; the reference solution first
looks every term up, one line each, in a random order, then adds them up as a running sum in
that same order, one addition per line, and ends with the boxed answer::

    problem:   f12+f7+f33
    solution:  f33=1
               f12=4
               f7=9
               1+4=5
               5+9=14
               \\boxed{14}

so a solution has m = 2n lines (n lookups, n-1 additions, the box), one reasoning segment each
(the segmenter falls back to lines because there are no blank lines), and a reveal ratio
alpha = 0.5 shows the teacher exactly the n lookup lines, whatever n is.

Why this shape (ATESD_SPEC §6): what the teacher should pass on must be privileged and valid on
any path the student takes. A fraction ``novel_fraction`` of the keys is *novel*: the warm start
never asks the student to recall them (student-format warm-start examples use known keys only)
and shows them only in teacher-format examples where every lookup line is revealed, i.e. where
copying from the context is the way to get them right. So after the warm start the student
guesses novel facts, while the teacher, given the lookup lines, copies them: a content-addressed
copy, correct whatever order the student looked them up in. Self-distillation on the student's
own rollouts is then what moves novel facts into the student's weights. Revealing the additions
(alpha > 0.5) shows the reference's partial sums, which belong to the reference's order; a
teacher that learned to copy pushes them onto rollouts that took another order.
Arithmetic is kept easy (one-digit values) so that facts, not sums, are the bottleneck.

Everything is pure Python and a function of the config alone (``random.Random`` seeded by
strings derived from ``seed``), so every process rebuilds the same table and splits.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

KEY_PREFIX = "f"
_PROBLEM_RE = re.compile(r"^f\d+(?:\+f\d+)+$")


@dataclass(kw_only=True, slots=True)
class SyntheticTaskConfig:
    """The synthetic task; defaults are the design measured in the prototype (see module doc)."""

    seed: int = 0
    """Fixes the hidden table, the novel keys and every split."""
    train_size: int = 20000
    """Training problems (the batch stream and the warm start draw from these)."""
    probe_size: int = 64
    """Probe problems (controller's probe NLL): same distribution as train, disjoint from it."""
    eval_size: int = 200
    """Held-out evaluation problems (distinct key sets, none shared with train or probe)."""
    min_steps: int = 2
    """Fewest terms per problem (a problem with n terms has 2n solution lines); >= 2."""
    max_steps: int = 4
    """Most terms per problem."""
    num_keys: int = 96
    """Size of the hidden table: keys f0 .. f{num_keys-1}."""
    min_value: int = 1
    """Smallest table value."""
    max_value: int = 9
    """Largest table value (one digit keeps the additions easy)."""
    novel_fraction: float = 0.5
    """Fraction of keys the warm start never asks the student to recall (see module doc)."""
    warm_teacher_fraction: float = 0.5
    """Warm start: fraction of examples in teacher format (the rest are student format)."""
    warm_student_known_only: bool = True
    """Warm start: student-format examples are drawn only from problems with no novel key."""
    warm_novel_reveal_all_lookups: bool = True
    """Warm start: a teacher-format example with a novel key reveals at least its n lookup
    lines (revealed count uniform in [n, 2n]); without novel keys it is uniform in [0, 2n]."""

    def __post_init__(self) -> None:
        if self.min_steps < 2:
            raise ValueError(f"min_steps must be >= 2 (4 solution lines), got {self.min_steps}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps={self.max_steps} must be >= min_steps={self.min_steps}")
        if self.num_keys < 2 * self.max_steps:
            raise ValueError(f"num_keys={self.num_keys} must be >= 2*max_steps")
        if not 0 <= self.min_value <= self.max_value <= 9:
            raise ValueError("need 0 <= min_value <= max_value <= 9")
        if not 0.0 <= self.novel_fraction < 1.0:
            raise ValueError(f"novel_fraction must be in [0, 1), got {self.novel_fraction}")
        if not 0.0 <= self.warm_teacher_fraction <= 1.0:
            raise ValueError("warm_teacher_fraction must be in [0, 1]")
        for name in ("train_size", "probe_size", "eval_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


def _rng(cfg: SyntheticTaskConfig, purpose: str) -> random.Random:
    return random.Random(f"atesd-synthetic/{cfg.seed}/{purpose}")


def hidden_table(cfg: SyntheticTaskConfig) -> dict[int, int]:
    """The facts: key -> value."""
    rng = _rng(cfg, "table")
    return {k: rng.randint(cfg.min_value, cfg.max_value) for k in range(cfg.num_keys)}


def novel_keys(cfg: SyntheticTaskConfig) -> frozenset[int]:
    """Keys the warm start never asks the student to recall."""
    rng = _rng(cfg, "novel")
    keys = list(range(cfg.num_keys))
    rng.shuffle(keys)
    return frozenset(keys[:round(cfg.novel_fraction * cfg.num_keys)])


def problem_text(keys: tuple[int, ...] | list[int]) -> str:
    return "+".join(f"{KEY_PREFIX}{k}" for k in keys)


def parse_problem(problem: str) -> list[int]:
    """Keys of a problem, in the order written."""
    if not _PROBLEM_RE.match(problem):
        raise ValueError(f"not a synthetic problem: {problem!r}")
    return [int(t[len(KEY_PREFIX):]) for t in problem.split("+")]


def solve(problem: str, table: dict[int, int]) -> int:
    return sum(table[k] for k in parse_problem(problem))


def solution_text(keys: list[int], order: list[int], table: dict[int, int]) -> str:
    """Lookups of keys[order] one per line, then the running sum in that order, then the box."""
    seq = [keys[i] for i in order]
    lines = [f"{KEY_PREFIX}{k}={table[k]}" for k in seq]
    total = table[seq[0]]
    for k in seq[1:]:
        lines.append(f"{total}+{table[k]}={total + table[k]}")
        total += table[k]
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def _example(keys: list[int], rng: random.Random, table: dict[int, int]) -> dict:
    order = list(range(len(keys)))
    rng.shuffle(order)
    return {"problem": problem_text(keys), "solution": solution_text(keys, order, table),
            "answer": str(sum(table[k] for k in keys))}


def make_splits(cfg: SyntheticTaskConfig) -> dict[str, list[dict]]:
    """{"train", "probe", "eval"}: lists of {"problem", "solution", "answer"}.

    Eval and probe problems have distinct key sets; train never uses a key set of either (so no
    problem text, nor any reordering of one, is shared); train may repeat a problem (each copy
    with its own lookup order)."""
    table = hidden_table(cfg)
    rng = _rng(cfg, "splits")
    used: set[frozenset[int]] = set()
    out: dict[str, list[dict]] = {}

    def draw() -> list[int]:
        n = rng.randint(cfg.min_steps, cfg.max_steps)
        return rng.sample(range(cfg.num_keys), n)

    for name, size in (("eval", cfg.eval_size), ("probe", cfg.probe_size)):
        rows = []
        for _ in range(100 * size + 1000):
            if len(rows) == size:
                break
            keys = draw()
            if frozenset(keys) in used:
                continue
            used.add(frozenset(keys))
            rows.append(_example(keys, rng, table))
        if len(rows) < size:
            raise ValueError(f"cannot draw {size} distinct {name} problems; raise num_keys")
        out[name] = rows
    train = []
    while len(train) < cfg.train_size:
        keys = draw()
        if frozenset(keys) not in used:
            train.append(_example(keys, rng, table))
    out["train"] = train
    held = {r["problem"] for r in out["eval"]} | {r["problem"] for r in out["probe"]}
    assert not held & {r["problem"] for r in train}, "train overlaps eval/probe"
    assert not {r["problem"] for r in out["eval"]} & {r["problem"] for r in out["probe"]}
    return {"train": out["train"], "probe": out["probe"], "eval": out["eval"]}


def num_terms(example: dict) -> int:
    return len(parse_problem(example["problem"]))


def warm_start_examples(cfg: SyntheticTaskConfig, rng: random.Random | int,
                        train: list[dict] | None = None
                        ) -> Iterator[tuple[str, dict, int | None]]:
    """Endless warm-start stream of (kind, example, revealed_segments).

    kind "student": train the solution given the student prompt (revealed_segments is None).
    kind "teacher": train the solution given the teacher prompt with the first revealed_segments
    of the example's own solution lines revealed (plus the answer line and the transition).
    The mix: teacher format with probability warm_teacher_fraction. Student format draws
    uniformly from the training problems without novel keys (all of them if
    warm_student_known_only is off). Teacher format draws uniformly from all training problems;
    revealed_segments ~ uniform{lo..2n}, lo = n when the problem has a novel key (and
    warm_novel_reveal_all_lookups), else 0. The loss is on the solution tokens only."""
    if isinstance(rng, int):
        rng = random.Random(rng)
    if train is None:
        train = make_splits(cfg)["train"]
    novel = novel_keys(cfg)
    has_novel = [any(k in novel for k in parse_problem(r["problem"])) for r in train]
    student_pool = [r for r, h in zip(train, has_novel) if not (h and cfg.warm_student_known_only)]
    if cfg.warm_teacher_fraction < 1.0 and not student_pool:
        raise ValueError("no training problem without novel keys for student-format warm start")
    while True:
        if rng.random() < cfg.warm_teacher_fraction:
            i = rng.randrange(len(train))
            n = num_terms(train[i])
            lo = n if (has_novel[i] and cfg.warm_novel_reveal_all_lookups) else 0
            yield "teacher", train[i], rng.randint(lo, 2 * n)
        else:
            yield "student", rng.choice(student_pool), None


def corpus(cfg: SyntheticTaskConfig) -> Iterator[str]:
    """Text for training the tokenizer: every problem and solution, and the template words."""
    from atesd_mc.data.templates import BOXED_INSTRUCTION, REFERENCE_INTRO, TRANSITION

    splits = make_splits(cfg)
    for _ in range(20):
        yield f"Problem: \n\n{BOXED_INSTRUCTION}"
        yield f"{REFERENCE_INTRO}\n"
        yield f"{TRANSITION}\nFinal answer: \\boxed{{}}\n"
    for name in ("train", "probe", "eval"):
        for r in splits[name]:
            yield r["problem"]
            yield r["solution"]
