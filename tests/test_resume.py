"""Exact resume: N steps straight == N/2 steps, save, new processes, load, N/2 steps (bitwise on
CPU), for TP=1 and TP=2; a TP=2 checkpoint resumed at TP=1 continues with the same losses."""
import os

import pytest
import torch

from harness import run_distributed
from test_trainer import _cfg

from atesd_mc.config import ParallelConfig

N = 4


def _weights(trainer):
    from atesd_mc.model.qwen3 import unwrap

    return {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items() if torch.is_tensor(v)}


def _steps(cfg, n, save_at_end):
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    records = [trainer.train_step() for _ in range(n)]
    if save_at_end:
        trainer.save_checkpoint()
    return [(r["loss"], r["alpha"]) for r in records], _weights(trainer), trainer.step


def _layout(cfg, tp):
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=tp)
    return cfg


@pytest.mark.parametrize("tp", [1, 2])
def test_resume_is_bitwise_exact(tmp_path, tp):
    world = tp
    straight = _layout(_cfg(tmp_path / "a", warm_start_iters=10), tp)
    straight.data.cache_dir = str(tmp_path / "cache")
    split = _layout(_cfg(tmp_path / "b", warm_start_iters=10), tp)
    split.data.cache_dir = str(tmp_path / "cache")
    ref = run_distributed(_steps, world=world, tp=tp, args=(straight, N, False))
    first = run_distributed(_steps, world=world, tp=tp, args=(split, N // 2, True))
    assert os.path.exists(os.path.join(split.run_dir, "latest_checkpointed_iteration.txt"))
    second = run_distributed(_steps, world=world, tp=tp, args=(split, N // 2, False))
    for r in range(world):
        losses = first[r][0] + second[r][0]
        assert second[r][2] == N
        assert losses == ref[r][0]  # losses and alphas, exactly
        assert ref[r][1].keys() == second[r][1].keys()
        for k in ref[r][1]:
            assert torch.equal(ref[r][1][k], second[r][1][k]), k


def test_tp2_checkpoint_resumes_at_tp1(tmp_path):
    straight = _layout(_cfg(tmp_path / "a", warm_start_iters=10), 2)
    straight.data.cache_dir = str(tmp_path / "cache")
    ref = run_distributed(_steps, world=2, tp=2, args=(straight, N, False))[0][0]
    split = _layout(_cfg(tmp_path / "b", warm_start_iters=10), 2)
    split.data.cache_dir = str(tmp_path / "cache")
    first = run_distributed(_steps, world=2, tp=2, args=(split, N // 2, True))[0][0]
    second = run_distributed(_steps, world=1, args=(_layout(split, 1), N // 2, False))[0][0]
    for (loss, alpha), (ref_loss, ref_alpha) in zip(first + second, ref):
        assert alpha == ref_alpha
        assert abs(loss - ref_loss) <= 1e-6, (first, second, ref)
