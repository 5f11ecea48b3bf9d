"""On-policy rollouts from a megatron GPTModel stage: batched sampling with a KV cache.

Prompts of different lengths share one static KV cache: the batch is prefilled up to the shortest
prompt, then advanced one position at a time; a row still inside its prompt takes its prompt token
instead of the sample (Megatron's static-batching scheme, no padding tokens ever attended).

Randomness is counter-based (SampleKeys): the token drawn for a row at a position depends only on
(stream, the row's global sample index, position) and the logits, never on the batch, the rank or
the bucket that holds the row, so every data-parallel split samples the same tokens. Sampling stays
on the device: the host uploads one table of uniforms per call and reads one value per decode
step, the all-done flag (on CUDA one step late, so the device never waits for the host).

Tensor parallel: logits are gathered over TP and every TP rank draws with the same keys, and
TP rank 0's tokens are broadcast so TP ranks can never diverge. Pipeline parallel: each stage runs
its layers on the new positions and sends hidden states downstream; the last stage samples and the
tokens are broadcast back over the pipeline group."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
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


def sample_next(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """One token per row from [b, V] logits: the inverse CDF of the filtered softmax at the row's
    uniform u [b] (float32 in [0, 1), on the logits' device). Nothing leaves the device."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    cdf = logits.softmax(-1).cumsum(-1)
    # Token j is drawn when cdf[j-1] <= u * total < cdf[j]: probability p_j, filtered tokens (p = 0,
    # an empty interval) never. Scaling by the total absorbs the cumsum's rounding of the mass.
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put the target at the top, past the last token with mass: that token is the
    # first index where the CDF reaches its maximum.
    return torch.minimum(tok, cdf.argmax(-1))


# SplitMix64 (Steele, Lea and Flood 2014) on numpy uint64 arrays, whose arithmetic wraps modulo
# 2**64: exact integer arithmetic on the host, so the keys do not depend on the device.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _u64(values: Sequence[int]) -> np.ndarray:
    return np.array([int(v) % 2 ** 64 for v in values], dtype=np.uint64)


def stream_key(*parts: int) -> int:
    """One 64-bit key from integers, e.g. (seed, step, purpose); order matters."""
    z = np.zeros(1, dtype=np.uint64)
    for p in _u64(parts):
        z = _mix64(z + p + _GAMMA)
    return int(z[0])


@dataclasses.dataclass(frozen=True, slots=True)
class SampleKeys:
    """Counter-based sampling randomness: row i at position t (its column in the sequence) draws
    the uniform of (stream, indices[i], t) alone, so a sample gets the same randomness whichever
    rank, batch or bucket holds it (and, integer arithmetic on the host, whichever device)."""
    stream: int
    """The run's key for one batch of samples: stream_key(seed, step, purpose)."""
    indices: tuple[int, ...]
    """Each row's global sample index (its place in the global batch)."""

    def select(self, rows: Sequence[int]) -> "SampleKeys":
        return SampleKeys(self.stream, tuple(self.indices[r] for r in rows))

    def uniforms(self, positions: int) -> torch.Tensor:
        """[rows, positions] float32 in [0, 1) on the CPU: position t of row i is output t of a
        SplitMix64 stream seeded by mixing (stream, index); its top 24 bits, exact in float32."""
        seeds = _mix64(_mix64(_u64(self.indices) + _GAMMA) ^ np.uint64(self.stream % 2 ** 64))
        steps = np.arange(1, positions + 1, dtype=np.uint64) * _GAMMA
        bits = _mix64(seeds[:, None] + steps[None, :]) >> np.uint64(40)
        return torch.from_numpy(bits.astype(np.float32) * np.float32(2.0 ** -24))


def as_keys(keys: "SampleKeys | torch.Generator | None", rows: int) -> SampleKeys | None:
    """SampleKeys for `rows` prompts. A seeded torch.Generator (tools and tests that hold one) gives
    one draw from it as the stream and numbers the rows 0..rows-1; None (greedy only) stays None."""
    if keys is None:
        return None
    if isinstance(keys, torch.Generator):
        return SampleKeys(int(torch.randint(0, 2 ** 62, (1,), generator=keys)), tuple(range(rows)))
    if len(keys.indices) != rows:
        raise ValueError(f"{len(keys.indices)} sample keys for {rows} prompts")
    return keys


class _AllDone:
    """Whether every row is done, read without stalling the device. Lagged (the default on CUDA):
    the flag of decode step t goes to (pinned) host memory, behind an event on CUDA, and is read at
    step t+1, when step t+1 is already queued; the extra step writes only padding, and every rank
    reads the same step's flag, so a TP/PP group leaves the loop together. Otherwise the flag is
    read at once (on the CPU there is no device to stall)."""

    def __init__(self, device: torch.device, lagged: bool | None = None):
        cuda = device.type == "cuda"
        self.lagged = cuda if lagged is None else lagged
        self.host = torch.zeros(2, dtype=torch.bool, pin_memory=cuda)
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None
        self.calls = 0

    def __call__(self, done: torch.Tensor) -> bool:
        if not self.lagged:
            return bool(done.all())
        slot, self.calls = self.calls % 2, self.calls + 1
        self.host[slot].copy_(done.all(), non_blocking=True)
        if self.events:
            self.events[slot].record()
        if self.calls == 1:
            return False
        if self.events:
            self.events[1 - slot].synchronize()
        return bool(self.host[1 - slot])


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


def _prompt_buffer(prompts: list[list[int]], total: int, dev) -> torch.Tensor:
    buf = torch.zeros(len(prompts), total, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return buf.to(dev)


def _rollouts(buf: torch.Tensor, lens: torch.Tensor, finished: torch.Tensor, params: SamplingParams) -> Rollouts:
    host = buf.cpu()  # one copy at the end, not one per row
    out = []
    for i, n in enumerate(lens.tolist()):
        gen = host[i, n:].tolist()
        if params.eos_id is not None and params.eos_id in gen:
            gen = gen[: gen.index(params.eos_id) + 1]
        out.append(gen[: params.max_new_tokens])
    return Rollouts(tokens=out, finished=finished.tolist())


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams,
             keys: SampleKeys | torch.Generator | None, *, lean: bool = False) -> Rollouts:
    """Sample continuations of `prompts` (same prompts and keys on every TP/PP rank).
    keys: each row's counter-based randomness (a torch.Generator or None: see as_keys).
    lean: decode on model/lean.py's KV cache (engine.Engine.lean_decode), else megatron's layers."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from atesd_mc.model.qwen3 import unwrap

    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    dev = next(inner.parameters()).device
    b = len(prompts)
    keys = as_keys(keys, b)
    lens = torch.tensor([len(p) for p in prompts])
    if (lens == 0).any():
        raise ValueError("generate: empty prompt")
    total = int(lens.max()) + params.max_new_tokens
    buf = _prompt_buffer(prompts, total, dev)
    table = None  # uniforms of every (row, position), uploaded once; greedy decoding needs none
    if params.temperature != 0:
        if keys is None:
            raise ValueError("generate: sampling (temperature > 0) needs sample keys")
        table = keys.uniforms(total).to(dev)
    lens_dev = lens.to(dev)
    real_vocab = inner.real_vocab_size
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    all_done = _AllDone(dev)
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
                u = table[:, pos] if table is not None else None
                tok = sample_next(logits[:, :real_vocab].float(), params, u)
            tok = _broadcast_tokens(tok)
            in_prompt = pos < lens_dev
            new_tok = torch.where(in_prompt, buf[:, pos], tok)
            new_tok = torch.where(done, torch.zeros_like(new_tok), new_tok)
            buf[:, pos] = new_tok
            if params.eos_id is not None:
                hit = ~in_prompt & ~done & (new_tok == params.eos_id)
                finished |= hit
                done |= hit
            done |= (pos + 1 - lens_dev) >= params.max_new_tokens
            start, pos = pos, pos + 1
            if all_done(done):
                break
    finally:
        inner.train(was_training)
    return _rollouts(buf[:, :pos], lens, finished, params)


def generate_bucketed(model, prompts: list[list[int]], params: SamplingParams,
                      keys: SampleKeys | torch.Generator | None, *, lean: bool = False, max_batch: int = 64,
                      max_spread: int = 32, progress: Callable[[int, int], None] | None = None) -> Rollouts:
    """generate() over length buckets: prompts sorted by length and cut into batches whose lengths
    differ by at most max_spread, because the shared cache advances one position at a time from
    the shortest prompt of a batch. Results come back in the input order; each prompt keeps its
    own key, so the buckets change no token.

    progress(rows_done, tokens_generated), when given, is called after each bucket with the totals
    so far (EOS tokens included), e.g. run_log.Progress.update; nothing here prints."""
    keys = as_keys(keys, len(prompts))
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
        out = generate(model, [prompts[i] for i in idx], params, keys.select(idx) if keys is not None else None,
                       lean=lean)
        for j, i in enumerate(idx):
            tokens[i], finished[i] = out.tokens[j], out.finished[j]
        generated += sum(len(t) for t in out.tokens)
        start = end
        if progress is not None:
            progress(start, generated)
    return Rollouts(tokens=tokens, finished=finished)
