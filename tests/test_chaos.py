"""Issue 7: SIGKILL the CLI at seeded-random moments (at least one inside a checkpoint save),
auto-resume after each kill, and end bitwise where the uninterrupted run ends (tools/chaos_resume.py;
the K=20 run is in docs/RELIABILITY.md)."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("chaos_resume", os.path.join(ROOT, "tools", "chaos_resume.py"))
chaos = sys.modules.setdefault("chaos_resume", importlib.util.module_from_spec(_spec))
if not hasattr(chaos, "chaos"):
    _spec.loader.exec_module(chaos)


def test_three_kills_resume_bitwise(tmp_path):
    args = chaos.build_parser().parse_args(
        ["--kills", "3", "--seed", "0", "--workdir", str(tmp_path), "--iters", "6", "--save-interval", "2",
         "--min-save-kills", "1", "--quiet"])
    s = chaos.chaos(args)
    report = chaos.format_summary(s)
    assert s["ok"], report
    assert s["kills"] == 3 and s["kills_inside_save"] >= 1, report
    assert s["resumes_confirmed"] >= 1, report  # at least one launch continued from a checkpoint
    m, c = s["metrics"], s["checkpoint"]
    assert m["steps_compared"] == 6 and not m["steps_differ"] and not m["alpha_differ"], report
    assert m["max_abs_dloss"] == 0.0 and m["b_rerun_consistent"], report
    assert c["weights_equal"] and c["all_equal"] and c["a_step"] == c["b_step"] == 6, report
    # and directly: the final pass of B's metrics equals A's, loss and alpha, bit for bit
    a, _ = chaos.read_metrics(str(tmp_path / "A" / "metrics.jsonl"))
    b, _ = chaos.read_metrics(str(tmp_path / "B" / "metrics.jsonl"))
    assert [(a[i]["loss"], a[i]["alpha"]) for i in range(1, 7)] == [(b[i]["loss"], b[i]["alpha"]) for i in range(1, 7)]


def test_metrics_final_pass_keeps_the_last_record_of_each_step(tmp_path):
    """A killed launch logged steps 3-4 past its checkpoint at 2 (the second torn by the kill);
    the resumed launch re-logged 3-4: the final pass is the resumed launch's records."""
    path = tmp_path / "metrics.jsonl"
    rec = lambda step, loss: json.dumps({"step": step, "loss": loss, "alpha": 0.5, "time": {"x": step}})
    path.write_text("\n".join([rec(1, 1.0), rec(2, 2.0), rec(3, 3.0), rec(4, 4.0)[:10] + rec(3, 3.0),
                               rec(4, 4.0), rec(5, 5.0)]) + "\n")
    final, info = chaos.read_metrics(str(path))
    assert sorted(final) == [1, 2, 3, 4, 5] and info["torn"] == 1 and info["rerun_steps"] == [3]
    assert [final[s]["loss"] for s in range(1, 6)] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_kill_plan_is_seeded_and_spread_over_the_run():
    import random

    a = chaos.plan_kills(20, random.Random(7), 30, 2, 3)
    b = chaos.plan_kills(20, random.Random(7), 30, 2, 3)
    assert [(k.kind, k.target, k.frac) for k in a] == [(k.kind, k.target, k.frac) for k in b]
    assert sum(k.kind == "save" for k in a) >= 4
    for kind in ("save", "step"):
        targets = [k.target for k in a if k.kind == kind]
        assert targets == sorted(targets)
    targets = [k.target for k in a if k.kind != "startup"]
    assert min(targets) <= 3 and max(targets) >= 26
    assert all(k.target % 2 == 0 or k.target == 30 for k in a if k.kind == "save")
