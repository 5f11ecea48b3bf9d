"""Forward/backward over micro-batches through megatron-core's pipeline schedules.

One code path for PP=1 and PP>1: the schedule handles p2p, and the callables below compute hidden
states on the last stage, select the positions that predict response tokens, and hand them to a
loss function. Shapes vary step to step (config.variable_seq_lengths)."""
from __future__ import annotations

from typing import Callable

import torch

from atesd_mc.batching import SideBatch
from atesd_mc.model.lean import packed_selected
from atesd_mc.model.qwen3 import forward_hidden, unwrap


def selected_hidden(model, hidden: torch.Tensor, side: SideBatch) -> torch.Tensor:
    """Rows of hidden [s(/tp), b, h] that predict response tokens -> [R, h] (full sequence)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if unwrap(model).config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.predict_index)


def run(model, sides: list[SideBatch], loss_fn: Callable, *, forward_only: bool,
        lean: bool = False) -> list[dict]:
    """Run every micro-batch; loss_fn(selected_hidden [R, h], micro_index) -> (loss, info dict).

    Returns the info dicts (last pipeline stage; empty elsewhere). Loss values are scaled by the
    number of micro-batches here because the schedule divides by it. lean=True (the resolved
    engine.Engine.lean_forward) skips megatron's layers on a rank that holds the whole model
    (model/lean.py packed_selected: the same math on the same weights, padding-free); megatron's
    schedule still runs the backward and the gradient reduction, so DDP, LoRA and the optimizer
    see no difference."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if forward_only and lean:
        with torch.no_grad():
            return [loss_fn(_lean_selected(model, s), i)[1] for i, s in enumerate(sides)]

    n = len(sides)
    order = iter(range(n))

    def step(_, m):
        i = next(order)
        side = sides[i]
        if lean:
            return _lean_selected(m, side), lambda out: _scaled(loss_fn(out, i), n)
        hidden = forward_hidden(m, side.tokens)
        return hidden, lambda out: _scaled(loss_fn(selected_hidden(m, out, side), i), n)

    seq = max(int(s.tokens.shape[1]) for s in sides)
    mbs = max(int(s.tokens.shape[0]) for s in sides)
    return list(get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(range(n)), model=[model], num_microbatches=n,
        seq_length=seq, micro_batch_size=mbs, forward_only=forward_only) or [])


def _lean_selected(model, side: SideBatch) -> torch.Tensor:
    return packed_selected(model, side.tokens, side.lengths, side.predict_index)


def _scaled(result: tuple, n: int) -> tuple:
    loss, info = result
    return loss * n, info
