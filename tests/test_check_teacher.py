"""tools/check_teacher.py: the pre-sweep check runs on the tiny task and reports every alpha."""
import math
import os
import sys

from harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def _measure(cfg):
    import check_teacher
    from atesd_mc.trainer import build_trainer

    return check_teacher.measure(build_trainer(cfg), 8)


def test_check_teacher_reports_student_and_every_alpha(tmp_path):
    import check_teacher
    from test_trainer import _cfg

    rows = run_distributed(_measure, world=1, args=(_cfg(tmp_path, warm_start_iters=30, warm_start_lr=3e-3),))[0]
    assert [r["who"] for r in rows] == ["student"] + [f"teacher alpha={a:g}" for a in check_teacher.ALPHAS]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    for r in rows[1:]:
        assert r["kl"] >= -1e-9 and math.isfinite(r["kl"])
        if "novel_positions" in r:  # the student wrote some novel-fact values: probabilities
            assert 0.0 <= r["p_novel_teacher"] <= 1.0 and 0.0 <= r["p_novel_student"] <= 1.0
    # Teacher and student see the same rollouts: the student side does not depend on alpha.
    novel = [r["p_novel_student"] for r in rows[1:] if "p_novel_student" in r]
    assert all(abs(p - novel[0]) < 1e-12 for p in novel)
