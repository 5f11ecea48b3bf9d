"""The training loop: learns on the tiny task; alpha reaches every rank bit-identical. (Every
layout, DP=2 / TP=2 / PP=2, giving one process's losses: tests/test_layout_invariance.py.)"""
import struct

import torch

from harness import run_distributed

from atesd_mc.config_io import config_from_dict

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16, "seq_length": 160}


def _cfg(tmp, **train):
    return config_from_dict({
        "model": TINY,
        "data": {"synthetic_train_size": 1200, "synthetic_eval_size": 16, "probe_size": 8,
                 "cache_dir": str(tmp / "cache")},
        "generation": {"max_new_tokens": 24},
        "train": {"train_iters": 3, "micro_batch_size": 4, "global_batch_size": 8, "lr": 1e-3,
                  "seed": 3, **train},
        "checkpoint": {"save": str(tmp / "run")},
        "logging": {"tensorboard": False, "progress_bar": False}}, name="test")


def _run_steps(cfg, n):
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    return [trainer.train_step() for _ in range(n)]


def test_lm_loss_falls_over_50_steps(tmp_path):
    cfg = _cfg(tmp_path, atesd_algorithm="sft", train_iters=50, lr=3e-3)
    records = run_distributed(_run_steps, world=1, args=(cfg, 50))[0]
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def _broadcast_alpha():
    import torch.distributed as dist

    from atesd_mc import distributed

    value = 0.1234567891234567 if dist.get_rank() == 0 else None
    got = distributed.broadcast_object(value)
    return struct.pack("<d", got)


def test_alpha_reaches_every_rank_bit_identical():
    out = run_distributed(_broadcast_alpha, world=2, megatron=False)
    assert out[0] == out[1] == struct.pack("<d", 0.1234567891234567)
