"""Token-budget micro-batches (--micro-batch-tokens): the distillation loss is a mean of
per-sequence means, so regrouping the sequences by token count leaves the loss and every gradient
unchanged to float rounding, on one process and on two data-parallel ranks; the native packer and
its pure-Python fallback partition identically."""
import random

import pytest
import torch

from harness import run_distributed
from test_trainer import _cfg


def _one_step(cfg, assignment=None):
    """First distillation step: its record, every trainable gradient (DDP main_grad, read before
    the optimizer step), the sequence count of each micro-batch and the problems this rank trained.
    assignment: replaces the token balancer's choice of global rows per rank (forces moves)."""
    from atesd_mc import packing, stages
    from atesd_mc.trainer import build_trainer

    grads, groups, problems = {}, [], []
    optimizer_update, teacher_contexts = stages.optimizer_update, stages.teacher_contexts

    def capture_then_update(rt, loss):
        grads.update({n: p.main_grad.detach().clone()
                      for n, p in rt.ddp.module.named_parameters() if p.requires_grad})
        return optimizer_update(rt, loss)

    def record_groups(*args):
        pairs = teacher_contexts(*args)
        groups.append([len(p.rollout_lengths) for p in pairs])
        problems.append(sorted(ex.problem for ex in args[1]))
        return pairs

    stages.optimizer_update, stages.teacher_contexts = capture_then_update, record_groups  # fork only
    if assignment is not None:
        packing.balance_ranks = lambda lengths, ranks: assignment
    record = build_trainer(cfg).train_step()
    return record, grads, groups[-1], problems[-1]


def _tiny(tmp_path, tokens: int):
    # Warm-started so the teacher's context moves its distribution (a real loss). The same seed and
    # cache for both runs: the same weights and rollouts; one run directory per run.
    cfg = _cfg(tmp_path, warm_start_iters=30, warm_start_lr=3e-3, micro_batch_size=2,
               global_batch_size=4, micro_batch_tokens=tokens)
    cfg.checkpoint.save = str(tmp_path / f"run-{tokens}")
    cfg.generation.max_new_tokens = 8
    return cfg


@pytest.mark.parametrize("world,assignment", [(1, None), (2, None), (2, [[0, 2, 3], [1]])])
def test_token_budget_micro_batches_equal_fixed(tmp_path, world, assignment):
    fixed = run_distributed(_one_step, world=world, args=(_tiny(tmp_path, 0),))
    # A budget of one token: every sequence alone in its micro-batch, a grouping that differs from
    # the fixed micro-batches of 2. On 2 ranks samples move to balance tokens; the forced assignment
    # moves global row 1 to rank 1 and rows 2, 3 to rank 0 (uneven: 3 micro-batches against 1).
    packed = run_distributed(_one_step, world=world, args=(_tiny(tmp_path, 1), assignment))
    assert sum(len(groups) for *_, groups, _ in packed) == 4  # every sample trained exactly once
    if assignment is not None:
        assert [len(groups) for *_, groups, _ in packed] == [3, 1]
        drawn, trained = [p for *_, p in fixed], [p for *_, p in packed]
        assert set(trained[1]) < set(drawn[0]), (drawn, trained)  # rank 1 trains one of rank 0's
        assert sorted(trained[0] + trained[1]) == sorted(drawn[0] + drawn[1])
    for (ref, grads_ref, groups_ref, _), (rec, grads, groups, _) in zip(fixed, packed):
        assert groups_ref == [2] * (2 // world) and set(groups) == {1}, (groups_ref, groups)
        assert rec["tokens"] == ref["tokens"]  # the same rollouts and contexts
        assert ref["loss"] > 1e-3  # a real loss, well above the tolerance
        assert abs(rec["loss"] - ref["loss"]) <= 1e-5 * max(1.0, abs(ref["loss"])), (rec["loss"], ref["loss"])
        assert grads.keys() == grads_ref.keys() and len(grads_ref) > 0
        for name, g in grads_ref.items():
            scale = g.abs().max().item()
            assert scale > 0, name
            assert (grads[name] - g).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def test_native_and_python_partitions_identical():
    from atesd_mc import packing

    if not packing.native_available():
        pytest.skip("atesd_mc._native not built")
    rng = random.Random(0)
    for trial in range(200):
        budget = rng.randint(1, 4096)
        lengths = [min(int(rng.lognormvariate(5, 1.2)), budget) for _ in range(rng.randint(0, 300))]
        if trial % 3 == 0:  # many ties: the order among equal lengths must agree too
            lengths = [rng.choice((0, budget // 2, budget)) for _ in lengths]
        assert packing.first_fit_decreasing(lengths, budget) == tuple(packing.first_fit_decreasing_py(lengths, budget))


def test_token_micro_batches_cover_every_sequence_within_budget():
    from atesd_mc import packing

    lengths = [900, 10, 300, 300, 5000, 0, 700, 120]
    groups = packing.token_micro_batches(lengths, 1000)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # the over-long sequence 4 counts as a full bin: only empties join it
        assert sum(min(lengths[i], 1000) for i in g) <= 1000, g
    assert [4, 5] in groups and len(groups) == 4, groups  # 5000+0 | 900+10 | 700+300 | 300+120


def test_balance_ranks_bounds_heaviest_rank():
    from atesd_mc import packing

    lengths = [7, 7, 6, 6, 5, 5, 4, 4, 4]
    ranks = packing.balance_ranks(lengths, 3)
    assert sorted(i for r in ranks for i in r) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert max(loads) <= 4 / 3 * 16 and sum(loads) == 48, loads  # 16 = the perfect split


def test_bench_packing_row(tmp_path):
    """The benchmark's CSV row on a small draw: native and Python agree, and the balanced ranks
    are at least as even as the sampler's contiguous slices."""
    import csv
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "tools" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.csv"
    bench.main(["--n", "4096", "--dp", "8", "--repeats", "1", "--csv", str(out)])
    (row,) = list(csv.DictReader(open(out)))
    assert row["n"] == "4096" and row["identical"] in ("True", "")
    assert 1.0 <= float(row["rank_max_mean_balanced"]) <= float(row["rank_max_mean_fixed"])
