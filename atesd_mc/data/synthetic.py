"""The embedded synthetic task: sums of looked-up facts ("context distillation of facts").

A hidden table f(k) (``num_keys`` keys -> one digit in [min_value, max_value]) is fixed by the
task seed. A problem asks for the sum of n distinct table entries (n in [min_steps, max_steps]);
the reference solution looks every term up, one line each, then adds them up as a running sum
in the same order, one addition per line, and ends with the boxed answer::

    problem:   H+E+q
    solution:  H=6
               E=3
               q=2
               6+3=9
               9+2=11
               \\boxed{11}

A solution has m = 2n lines (n lookups, n-1 additions, the box) and no blank line, so the
segmenter cuts it into m line segments and a reveal ratio alpha = 0.5 shows the teacher exactly
the n lookup lines, whatever n is; alpha in (0.5, 1) adds the reference's partial sums and
alpha = 1 the boxed line too.

Why this shape (docs/METHOD.md, Test bed): the teacher must hold something privileged, valid on
the student's own rollouts. A fraction ``novel_fraction`` of the keys is *novel*: in the warm
start (see ``warm_start_examples``) every novel key gets a fresh random value in every example,
so the weights cannot learn the true novel facts (the student is left at chance on them, 1/9),
while teacher-format examples teach the model to copy a value that is revealed in its context.
Known facts, the format and the (easy, one-digit) additions are learned by both. Given the
revealed lookup lines, the teacher therefore knows the novel facts and the student does not;
self-distillation on the student's rollouts moves them into the student's weights. With
``lookup_order="problem"`` every solution follows the problem's order, so the student's lookup
lines line up with the revealed ones. Revealing the additions shows partial sums of the
*reference's* values, which disagree with a rollout that used a wrong (guessed) value: the
teacher then pushes sums that do not follow from the rollout's own operands, so alpha past the
lookups costs something and the best fixed alpha is interior.

Measured on a plain-PyTorch prototype (tiny Qwen3, 0.8M parameters, one CPU thread; warm start
1000 x 16 examples at lr 3e-3, then 150 steps x 32 rollouts of forward-KL self-distillation,
lr 1e-3, no per-vocab clip), held-out greedy accuracy on 200 problems, two warm-start seeds:
warm start 0.20 / 0.32; alpha 0: 0.18 / 0.32; alpha 0.5: 0.61 / 0.58; alpha 1: 0.49 / 0.47;
SFT on the references, same steps: 0.97. Per-token KL on student rollouts rises with alpha
(0.15 / 0.28 / 0.39 and 0.10 / 0.19 / 0.28 at alpha 0 / 0.5 / 1). The OPSD per-vocab clip
c = 0.05 blocks the transfer (clamped terms carry no gradient, so the teacher's confident facts
are exactly what is cut): alpha 0.5 with c = 0.05 fell to 0.16.

Everything is pure Python and a function of the config alone (``random.Random`` seeded by
strings derived from ``seed``), so every process rebuilds the same table and splits.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Iterator

LETTERS = string.ascii_lowercase + string.ascii_uppercase
KEY_STYLES = ("letter", "f_number")
LOOKUP_ORDERS = ("problem", "random")
_KEY = r"(?:[a-zA-Z]|f\d+)"
_PROBLEM_RE = re.compile(rf"^{_KEY}(?:\+{_KEY})+$")
_NUMBERED_RE = re.compile(r"^f(\d+)$")


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
    """Held-out evaluation problems (distinct key sets, none shared with train or probe): the test split."""
    val_size: int = 0
    """Validation problems (distinct key sets, disjoint from every other split): where a study makes its
    choices (best fixed alpha, learning rates), so the test split is read only for the final numbers."""
    prior_size: int = 0
    """Prior-skill problems: only *known* keys (facts the warm start teaches), distinct key sets disjoint
    from every other split. The warm-started student already solves most of them, so accuracy on them
    after training measures retention (forgetting), beside accuracy on the novel facts."""
    min_steps: int = 2
    """Fewest terms per problem (a problem with n terms has 2n solution lines); >= 2."""
    max_steps: int = 3
    """Most terms per problem (3 keeps the warm start within ~1.5 min on 2 CPU cores)."""
    num_keys: int = 52
    """Size of the hidden table."""
    key_style: str = "letter"
    """How keys are written: "letter" (a..z, A..Z: one character, at most 52 keys) or
    "f_number" (f0, f1, ...: a key spans several tokens, which makes finding it by content
    harder to learn)."""
    lookup_order: str = "problem"
    """Order of the lookup lines (and so of the running sum): "problem" (the order the terms are
    written in: one path, so the revealed lookups line up with the student's) or "random" (a
    random order per solution: many paths; the teacher must then find facts by key)."""
    min_value: int = 1
    """Smallest table value."""
    max_value: int = 9
    """Largest table value (one digit keeps the additions easy)."""
    novel_fraction: float = 0.5
    """Fraction of keys that are novel: the warm start never shows their true value (each
    warm-start example gives them fresh random values), so only the teacher, reading revealed
    lookup lines, knows them (see module doc)."""
    warm_teacher_fraction: float = 0.75
    """Warm start: fraction of examples in teacher format (the rest are student format). At 0.5
    the copy skill emerged within 1000 steps for one model seed of two; at 0.75 for both."""
    warm_reorder_prob: float = 1.0
    """Warm start, teacher format, lookup_order="random" only: probability that the trained
    solution looks the facts up in a fresh random order instead of the revealed reference's
    order, so that the teacher learns to find a fact by its key (valid on any path) rather
    than copy the reference line by line (slower to learn: not reached in ~1.5 min)."""

    def __post_init__(self) -> None:
        if self.min_steps < 2:
            raise ValueError(f"min_steps must be >= 2 (4 solution lines), got {self.min_steps}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps={self.max_steps} must be >= min_steps={self.min_steps}")
        if self.lookup_order not in LOOKUP_ORDERS:
            raise ValueError(f"lookup_order must be one of {LOOKUP_ORDERS}")
        if self.key_style not in KEY_STYLES:
            raise ValueError(f"key_style must be one of {KEY_STYLES}, got {self.key_style!r}")
        if self.key_style == "letter" and self.num_keys > len(LETTERS):
            raise ValueError(f"key_style='letter' allows at most {len(LETTERS)} keys")
        if self.num_keys < 2 * self.max_steps:
            raise ValueError(f"num_keys={self.num_keys} must be >= 2*max_steps")
        if not 0 <= self.min_value <= self.max_value <= 9:
            raise ValueError("need 0 <= min_value <= max_value <= 9")
        if not 0.0 <= self.novel_fraction < 1.0:
            raise ValueError(f"novel_fraction must be in [0, 1), got {self.novel_fraction}")
        for name in ("warm_teacher_fraction", "warm_reorder_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in ("train_size", "probe_size", "eval_size", "val_size", "prior_size"):
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


def key_name(k: int, style: str = "letter") -> str:
    return LETTERS[k] if style == "letter" else f"f{k}"


def key_id(name: str) -> int:
    m = _NUMBERED_RE.match(name)
    if m:
        return int(m.group(1))
    if len(name) == 1 and name in LETTERS:
        return LETTERS.index(name)
    raise ValueError(f"not a key: {name!r}")


def problem_text(keys: tuple[int, ...] | list[int], style: str = "letter") -> str:
    return "+".join(key_name(k, style) for k in keys)


def parse_problem(problem: str) -> list[int]:
    """Keys of a problem, in the order written."""
    if not _PROBLEM_RE.match(problem):
        raise ValueError(f"not a synthetic problem: {problem!r}")
    return [key_id(t) for t in problem.split("+")]


def solve(problem: str, table: dict[int, int]) -> int:
    return sum(table[k] for k in parse_problem(problem))


def solution_text(keys: list[int], order: list[int], table: dict[int, int],
                  style: str = "letter") -> str:
    """Lookups of keys[order] one per line, then the running sum in that order, then the box."""
    seq = [keys[i] for i in order]
    lines = [f"{key_name(k, style)}={table[k]}" for k in seq]
    total = table[seq[0]]
    for k in seq[1:]:
        lines.append(f"{total}+{table[k]}={total + table[k]}")
        total += table[k]
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def _example(keys: list[int], rng: random.Random, table: dict[int, int],
             cfg: SyntheticTaskConfig) -> dict:
    order = list(range(len(keys)))
    if cfg.lookup_order == "random":
        rng.shuffle(order)
    style = cfg.key_style
    return {"problem": problem_text(keys, style),
            "solution": solution_text(keys, order, table, style),
            "answer": str(sum(table[k] for k in keys))}


def make_splits(cfg: SyntheticTaskConfig) -> dict[str, list[dict]]:
    """{"train", "probe", "eval", "val", "prior"}: lists of {"problem", "solution", "answer"}.

    Eval, probe, val and prior problems have distinct key sets (prior: known keys only); train never
    uses a key set of any of them (so no problem text, nor any reordering of one, is shared); train
    may repeat a problem (each copy with its own lookup order). Val and prior are drawn after probe
    and consume nothing when their size is 0, so a task without them draws the same splits as before."""
    table = hidden_table(cfg)
    rng = _rng(cfg, "splits")
    used: set[frozenset[int]] = set()
    out: dict[str, list[dict]] = {}
    known = sorted(set(range(cfg.num_keys)) - novel_keys(cfg))

    def draw(pool=range(cfg.num_keys)) -> list[int]:
        n = rng.randint(cfg.min_steps, min(cfg.max_steps, len(pool)))
        return rng.sample(pool, n)

    for name, size, pool in (("eval", cfg.eval_size, range(cfg.num_keys)),
                             ("probe", cfg.probe_size, range(cfg.num_keys)),
                             ("val", cfg.val_size, range(cfg.num_keys)), ("prior", cfg.prior_size, known)):
        rows = []
        for _ in range(100 * size + 1000 if size else 0):
            if len(rows) == size:
                break
            keys = draw(pool)
            if frozenset(keys) in used:
                continue
            used.add(frozenset(keys))
            rows.append(_example(keys, rng, table, cfg))
        if len(rows) < size:
            raise ValueError(f"cannot draw {size} distinct {name} problems; raise num_keys")
        out[name] = rows
    train = []
    while len(train) < cfg.train_size:
        keys = draw()
        if frozenset(keys) not in used:
            train.append(_example(keys, rng, table, cfg))
    out["train"] = train
    held = [{r["problem"] for r in out[name]} for name in ("eval", "probe", "val", "prior")]
    assert not set().union(*held) & {r["problem"] for r in train}, "train overlaps a held-out split"
    assert sum(map(len, held)) == len(set().union(*held)), "two held-out splits share a problem"
    return {name: out[name] for name in ("train", "probe", "eval", "val", "prior")}


def num_terms(example: dict) -> int:
    return len(parse_problem(example["problem"]))


def lookup_order(example: dict) -> list[int]:
    """Keys in the order the solution looks them up."""
    n = num_terms(example)
    return [key_id(line.split("=")[0]) for line in example["solution"].split("\n")[:n]]


def warm_start_examples(cfg: SyntheticTaskConfig, rng: random.Random | int,
                        train: list[dict] | None = None
                        ) -> Iterator[tuple[str, dict, int | None]]:
    """Endless warm-start stream of (kind, example, revealed_segments); see WARM_START_MIX.

    kind "student": train example["solution"] after the student prompt of example["problem"];
    revealed_segments is None.
    kind "teacher": train example["solution"] after the teacher prompt that reveals the first
    revealed_segments lines of example["reference"] (then "Final answer: \\boxed{answer}" and
    the transition). The loss is on the solution tokens (and the end-of-turn token) only.

    Both kinds draw a training problem uniformly and replace the values of its novel keys by
    fresh uniform random values (solution, reference and answer recomputed), so the true novel
    facts never reach the weights and the student is left at chance on them.

    So the yielded example is generally NOT a row of the train split: tokenise its own texts
    (e.g. store.make_example(tok, ex["problem"], ex.get("reference", ex["solution"])) for the
    prompts and tok.encode(ex["solution"]) + EOS for the target). Mapping it back to the stored
    training example by problem text would train the true novel facts and void the task. With
    lookup_order="problem" (the default) ex["reference"] == ex["solution"]."""
    if isinstance(rng, int):
        rng = random.Random(rng)
    if train is None:
        train = make_splits(cfg)["train"]
    table = hidden_table(cfg)
    novel = novel_keys(cfg)
    while True:
        ex = rng.choice(train)
        keys = parse_problem(ex["problem"])
        n = len(keys)
        values = dict(table)
        for k in keys:
            if k in novel:
                values[k] = rng.randint(cfg.min_value, cfg.max_value)
        order = [keys.index(k) for k in lookup_order(ex)]
        solution = solution_text(keys, order, values, cfg.key_style)
        out = {"problem": ex["problem"], "solution": solution,
               "answer": str(sum(values[k] for k in keys))}
        if rng.random() >= cfg.warm_teacher_fraction:
            yield "student", out, None
            continue
        out["reference"] = solution
        if cfg.lookup_order == "random" and rng.random() < cfg.warm_reorder_prob:
            other = list(range(n))
            rng.shuffle(other)
            out["solution"] = solution_text(keys, other, values, cfg.key_style)
        yield "teacher", out, rng.randint(0, 2 * n)


WARM_START_MIX = """\
Warm start (SFT before distillation), per example: draw a training problem uniformly; give each
of its novel keys a fresh value uniform in [min_value, max_value] (known keys keep their true
value) and recompute the lines and the answer. With probability 1 - warm_teacher_fraction train
the solution after the student prompt. Otherwise train it after the teacher prompt whose reference
is the same facts in the example's lookup order, with revealed_segments uniform in {0, ..., 2n}
(n terms, 2n lines); only with lookup_order="random", with probability warm_reorder_prob the
trained solution then uses a fresh random lookup order (and its own running sums), so the
revealed lines can be used by key but not copied line by line. Loss on the solution tokens (and
the end-of-turn token) only. Prototype schedule: 1000 steps of 16 examples, AdamW lr 3e-3
(50-step warm-up, cosine to 10%), about 100-120 s on one CPU thread for the tiny model."""


def corpus(cfg: SyntheticTaskConfig) -> Iterator[str]:
    """Text for training the tokenizer: every problem and solution, and the template words."""
    from atesd_mc.data.templates import BOXED_INSTRUCTION, REFERENCE_INTRO, TRANSITION

    splits = make_splits(cfg)
    for _ in range(20):
        yield f"Problem: \n\n{BOXED_INSTRUCTION}"
        yield f"{REFERENCE_INTRO}\n"
        yield f"{TRANSITION}\nFinal answer: \\boxed{{}}\n"
    for name in ("train", "probe", "eval", "val", "prior"):
        for r in splits[name]:
            yield r["problem"]
            yield r["solution"]
