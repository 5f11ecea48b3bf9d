"""On-policy rollouts from a megatron GPTModel stage: batched sampling with a KV cache.

Prompts of different lengths share one static KV cache: the batch is prefilled up to the shortest
prompt, then advanced one position at a time; a row still inside its prompt takes its prompt token
instead of the sample (Megatron's static-batching scheme, no padding tokens ever attended).

Tensor parallel: logits are gathered over TP and every TP rank draws from the same generator, and
TP rank 0's tokens are broadcast so TP ranks can never diverge. Pipeline parallel: each stage runs
its layers on the new positions and sends hidden states downstream; the last stage samples and the
tokens are broadcast back over the pipeline group."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist

from atesd_mc.model.lean import LeanDecoder


@dataclasses.dataclass(kw_only=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    eos_id: int | None = None


@dataclasses.dataclass(kw_only=True, slots=True)
class Rollouts:
    tokens: list[list[int]]
    """Generated tokens per prompt (EOS included when produced)."""
    finished: list[bool]
    """True when the row stopped at EOS (False: hit max_new_tokens)."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and outside the top-p nucleus to -inf ([b, V], float32)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row from [b, V] logits (float32) with a seeded CPU generator."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def _pp_info():
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size(), ps.is_pipeline_first_stage(),
            ps.is_pipeline_last_stage())


def _stage_forward(model, tokens, positions, ctx, hidden_size):
    """Run this stage on tokens [b, s]; returns last-position logits [b, V] on the last stage."""
    from megatron.core import parallel_state as ps

    from atesd_mc.model.qwen3 import unwrap

    inner = unwrap(model)
    pp, first, last = _pp_info()
    b, s = tokens.shape
    if not first:
        recv = torch.empty(s, b, hidden_size, dtype=inner.config.params_dtype, device=tokens.device)
        dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
        inner.set_input_tensor(recv)
    out = inner(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[:, -1, :] if out.dim() == 3 else out  # [b, V_padded]


def _broadcast_tokens(tok: torch.Tensor) -> torch.Tensor:
    """Last PP stage's (TP rank 0's) tokens to every rank of the model-parallel group."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tok, src=ps.get_tensor_model_parallel_src_rank(),
                       group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tok, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return tok


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams,
             generator: torch.Generator, *, lean: bool = False) -> Rollouts:
    """Sample continuations of `prompts` (same prompts and generator on every TP/PP rank).
    lean: decode on model/lean.py's KV cache (engine.Engine.lean_decode), else megatron's layers."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from atesd_mc.model.qwen3 import unwrap

    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    dev = next(inner.parameters()).device
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    if (lens == 0).any():
        raise ValueError("generate: empty prompt")
    total = int(lens.max()) + params.max_new_tokens
    buf = torch.zeros(b, total, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    lens = lens.to(dev)
    real_vocab = inner.real_vocab_size
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    decoder = LeanDecoder(inner, b, total) if lean else None
    ctx = StaticInferenceContext(b, total) if decoder is None else None
    start, pos = 0, int(lens.min())
    try:
        while pos < total:
            chunk = buf[:, start:pos]
            if decoder is not None:
                logits = decoder.forward(chunk, start)
            else:
                positions = torch.arange(start, pos, device=dev).expand(b, -1)
                logits = _stage_forward(model, chunk, positions, ctx, inner.config.hidden_size)
                ctx.sequence_len_offset += pos - start
            tok = torch.zeros(b, dtype=torch.long, device=dev)
            if logits is not None:
                tok = sample_next(logits[:, :real_vocab].float(), params, generator)
            tok = _broadcast_tokens(tok)
            in_prompt = pos < lens
            new_tok = torch.where(in_prompt, buf[:, pos], tok)
            new_tok = torch.where(done, torch.zeros_like(new_tok), new_tok)
            buf[:, pos] = new_tok
            if params.eos_id is not None:
                hit = ~in_prompt & ~done & (new_tok == params.eos_id)
                finished |= hit
                done |= hit
            done |= (pos + 1 - lens) >= params.max_new_tokens
            start, pos = pos, pos + 1
            if bool(done.all()):
                break
    finally:
        inner.train(was_training)
    out = []
    for i in range(b):
        gen = buf[i, int(lens[i]): pos].tolist()
        if params.eos_id is not None and params.eos_id in gen:
            gen = gen[: gen.index(params.eos_id) + 1]
        out.append(gen[: params.max_new_tokens])
    return Rollouts(tokens=out, finished=finished.tolist())


def generate_bucketed(model, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
                      *, lean: bool = False, max_batch: int = 64, max_spread: int = 32,
                      progress: Callable[[int, int], None] | None = None) -> Rollouts:
    """generate() over length buckets: prompts sorted by length and cut into batches whose lengths
    differ by at most max_spread, because the shared cache advances one position at a time from
    the shortest prompt of a batch. Results come back in the input order.

    progress(rows_done, tokens_generated), when given, is called after each bucket with the totals
    so far (EOS tokens included), e.g. run_log.Progress.update; nothing here prints."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens: list[list[int] | None] = [None] * len(prompts)
    finished = [False] * len(prompts)
    start = generated = 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < max_batch
               and len(prompts[order[end]]) - len(prompts[order[start]]) <= max_spread):
            end += 1
        idx = order[start:end]
        out = generate(model, [prompts[i] for i in idx], params, generator, lean=lean)
        for j, i in enumerate(idx):
            tokens[i], finished[i] = out.tokens[j], out.finished[j]
        generated += sum(len(t) for t in out.tokens)
        start = end
        if progress is not None:
            progress(start, generated)
    return Rollouts(tokens=tokens, finished=finished)
