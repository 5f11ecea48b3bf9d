"""Before any sweep: does the exposed teacher beat the student where it is meant to teach?

    python tools/check_teacher.py --config examples/study_arith.yaml [--n 100] [-- run flags]

Builds (or loads from the cache) the run's warm start exactly as tools/pretrain_atesd.py does, then
on the first n held-out problems measures:
1. greedy accuracy from the student prompt and from the teacher prompt at each alpha;
2. on the student's own sampled rollouts (the tokens distillation trains on), per alpha: the mean
   per-token KL(teacher || student), and - synthetic task only - at the positions where a rollout
   writes the value of a *novel* fact (``K=`` then a digit; the warm start never shows their true
   values in the student format) the probability the teacher and the student give the true value.
Prints a markdown table. One process (world 1, gloo)."""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHECK_KEYS = 1
"""The sampling stream's purpose (stages.rollout_keys): not the trainer's rollouts' nor its eval's."""


def _log_probs(h, w, valid):
    """Log-probs [R, V] from hidden states [R, h] at the rows that predict response tokens."""
    import torch

    return (h.float() @ w[:valid].float().t()).log_softmax(-1).to(torch.float64)


def _novel_value_positions(cfg, tok, rollouts):
    """(flat index, true value token) where a rollout writes the value of a novel fact."""
    from atesd_mc.data.synthetic import hidden_table, key_id, novel_keys
    from atesd_mc.tasks import synthetic_task_config

    task = synthetic_task_config(cfg)
    table, novel = hidden_table(task), novel_keys(task)
    out, off = [], 0
    for toks in rollouts:
        text = [tok.decode([t]) for t in toks]
        for j in range(2, len(toks)):
            key = text[j - 2]
            if text[j - 1] == "=" and len(key) == 1 and key.isalpha() and key_id(key) in novel:
                digit = tok.encode(str(table[key_id(key)]))
                if len(digit) == 1:
                    out.append((off + j, digit[0]))
        off += len(toks)
    return out


def measure(trainer, n: int, split: str = "test") -> list[dict]:
    """The table's rows for the first n problems of a held-out split ("test", or a further split of
    the synthetic task such as "val") of a built trainer (no training)."""
    import torch

    from atesd_mc import stages
    from atesd_mc.evaluation import is_correct
    from atesd_mc.generation import generate_bucketed

    rt, problems = trainer.rt, trainer.data.problems
    tok = problems.tokenizer
    if split != "test" and split not in problems.extra_eval:
        raise SystemExit(f"error: --split {split}: the run has no such held-out split (has: test"
                         f"{''.join(', ' + k for k in problems.extra_eval)})")
    held = list(problems.eval if split == "test" else problems.extra_eval[split])[:n]
    greedy = stages.sampling(rt, greedy=True)

    def accuracy(model, prompts):  # greedy: no randomness, no keys
        out = generate_bucketed(model, prompts, greedy, None, lean=rt.engine.lean_decode)
        return sum(is_correct(tok.decode(t, skip_special_tokens=True), ex.answer)
                   for ex, t in zip(held, out.tokens)) / len(held)

    rows = [{"who": "student", "accuracy": accuracy(rt.ddp, [ex.student.tolist() for ex in held])}]
    # Held-out problem i's rollout is sample i of its own stream (purpose CHECK_KEYS).
    keys = stages.rollout_keys(rt, 0, range(len(held)), purpose=CHECK_KEYS)
    rollouts = generate_bucketed(rt.ddp, [ex.student.tolist() for ex in held], stages.sampling(rt), keys,
                                 lean=rt.engine.lean_decode).tokens
    synthetic = not rt.cfg.data.data_path
    novel = _novel_value_positions(rt.cfg, tok, rollouts) if synthetic else []
    w = stages.output_weights(rt)
    with torch.no_grad():
        for alpha in ALPHAS:
            pair = stages.teacher_contexts(rt, held, rollouts, alpha)
            with rt.teacher.context() as teacher:
                acc = accuracy(teacher, [ex.teacher.tokens_at(alpha, rt.cfg.exposure.reveal_unit).tolist()
                                         for ex in held])
            lp_t = _log_probs(torch.cat(stages.teacher_forward(rt, [p.teacher for p in pair])), w.for_teacher,
                              w.valid)
            lp_s = _log_probs(torch.cat(stages.student_forward(rt, [p.student for p in pair])), w.student, w.valid)
            kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1).mean().item()
            row = {"who": f"teacher alpha={alpha:g}", "accuracy": acc, "kl": kl}
            if novel:
                idx = torch.tensor([i for i, _ in novel])
                tok_ids = torch.tensor([t for _, t in novel])
                row["p_novel_teacher"] = lp_t[idx, tok_ids].exp().mean().item()
                row["p_novel_student"] = lp_s[idx, tok_ids].exp().mean().item()
                row["novel_positions"] = len(novel)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--n", type=int, default=100, help="held-out problems")
    p.add_argument("--split", default="test", help="held-out split: test, or val/prior when the run has them")
    p.add_argument("--json", default="", help="also write the rows to this file (written whole, then renamed)")
    p.add_argument("extra", nargs="*", help="run flags (after --), e.g. --seed 1")
    args = p.parse_args(argv)
    from atesd_mc.config_io import parse_config
    from atesd_mc.trainer import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(["--config", args.config, "--save", tmp, "--no-progress-bar", *args.extra])
        rows = measure(build_trainer(cfg), args.n, args.split)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"n": args.n, "split": args.split, "flags": args.extra, "rows": rows}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    print(f"| (n = {args.n} {args.split} problems) | greedy accuracy | KL(T||S) per rollout token "
          "| p(true novel value): teacher | student |")
    print("|---|---|---|---|---|")
    for r in rows:
        def f(key):
            return f"{r[key]:.3f}" if key in r else ""
        print(f"| {r['who']} | {f('accuracy')} | {f('kl')} | {f('p_novel_teacher')} | {f('p_novel_student')} |")
    if "novel_positions" in rows[-1]:
        print(f"\nnovel-fact value positions in the student's rollouts: {rows[-1]['novel_positions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
