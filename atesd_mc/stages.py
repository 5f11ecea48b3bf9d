"""The stages a training step is made of, each a function with explicit inputs and outputs.

atesd_mc/steps.py strings them together (distillation, SFT), atesd_mc/grpo.py and
atesd_mc/warm_start.py reuse them, and tools/bench_throughput.py times them. Sums that go through
an all-reduce are dataclasses with named fields (runtime.global_sum)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from atesd_mc import packing, schedule
from atesd_mc.batching import PairBatch, SideBatch, build_pair, build_side, per_sequence_weights
from atesd_mc.generation import Rollouts, SampleKeys, SamplingParams, generate, generate_bucketed, stream_key
from atesd_mc.losses import distill_loss, rollout_statistics, sft_loss
from atesd_mc.model.qwen3 import tp_input
from atesd_mc.optim import optimizer_step, zero_grads
from atesd_mc.run_log import Progress
from atesd_mc.runtime import Runtime, global_sum, micro_batches, output_weights

# ------------------------------------------------------------------------------------- rollouts


def sampling(rt: Runtime, *, greedy: bool = False, max_new: int | None = None) -> SamplingParams:
    g = rt.cfg.generation
    return SamplingParams(max_new_tokens=max_new or g.max_new_tokens,
                          temperature=0.0 if greedy else g.rollout_temperature,
                          top_p=g.top_p, top_k=g.top_k, eos_id=rt.eos_id)


# Purposes of the sampling streams of one step (the third part of stream_key).
ROLLOUT, EVAL = 0, 7919


def rollout_keys(rt: Runtime, step: int, indices: Sequence[int], purpose: int = ROLLOUT) -> SampleKeys:
    """Sampling randomness from (seed, step, purpose) and each row's global sample index, never
    the rank: every parallel layout samples the same tokens, and a resumed run (on any layout)
    samples what the uninterrupted run sampled, without saved state."""
    return SampleKeys(stream_key(rt.cfg.train.seed, step, purpose), tuple(indices))


def rollouts(rt: Runtime, prompts: list[list[int]], params: SamplingParams,
             keys: SampleKeys | torch.Generator) -> Rollouts:
    """The student samples a continuation of each prompt (on the resolved decode engine)."""
    return generate(rt.ddp, prompts, params, keys, lean=rt.engine.lean_decode)


# ------------------------------------------------------------------------------------- teacher


def teacher_contexts(rt: Runtime, examples: list, responses: list[list[int]], alpha: float) -> list[PairBatch]:
    """Per micro-batch: the teacher's [problem ; revealed reference ; answer ; transition ;
    response] and the student's [prompt ; response] (exposure/reveal.py's rule for alpha)."""
    groups = micro_batch_groups([len(ex.student) + len(r) for ex, r in zip(examples, responses)],
                                rt.cfg.train.micro_batch_size, rt.cfg.train.micro_batch_tokens)
    return [build_pair([examples[i] for i in g], [responses[i] for i in g], alpha,
                       rt.cfg.exposure.reveal_unit, rt.device) for g in groups]


def micro_batch_groups(lengths: Sequence[int], size: int, tokens: int = 0) -> list[list[int]]:
    """Indices of each micro-batch: chunks of `size` sequences, or (tokens > 0) first-fit-decreasing
    bins of at most `tokens` tokens (native packer). Every loss here is a mean of per-sequence means
    weighted by the step's sequence count, so any grouping gives the same loss and gradients."""
    if tokens > 0:
        return packing.token_micro_batches(lengths, tokens)
    return micro_batches(list(range(len(lengths))), size)


def balance_across_ranks(rt: Runtime, examples: list, rows: Sequence[int], rolled: Rollouts):
    """(examples, global rows, rollouts) this replica trains on after moving whole samples between
    data-parallel replicas so each holds about the same [prompt ; response] tokens (the teacher and
    student passes; generation already ran where the sample was drawn). Every replica gathers all
    samples (all_gather_object over its data-parallel group: token lists, cheap at these sizes) and
    computes the same deterministic assignment, in global-row order, so the result does not depend
    on which replica drew a sample. Tensor/pipeline ranks of one replica hold the same samples and
    therefore choose the same."""
    if rt.dp == 1:
        return examples, rows, rolled
    mine = list(zip(rows, examples, rolled.tokens, rolled.finished))
    gathered: list = [None] * rt.dp
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    every = sorted((s for part in gathered for s in part), key=lambda s: s[0])
    share = packing.balance_ranks([len(ex.student) + len(toks) for _, ex, toks, _ in every],
                                  rt.dp)[rt.info.dp_rank]
    picked = [every[i] for i in share]
    return ([s[1] for s in picked], [s[0] for s in picked],
            Rollouts(tokens=[s[2] for s in picked], finished=[s[3] for s in picked]))


def _keep_hidden(h: torch.Tensor, i: int):
    return h.sum() * 0, {"h": h.detach()}


def teacher_forward(rt: Runtime, sides: list[SideBatch]) -> list[torch.Tensor]:
    """The teacher's final hidden states [R, h] at the response positions, per micro-batch (no grad)."""
    with rt.teacher.context() as teacher_model:
        return [o["h"] for o in schedule.run(teacher_model, sides, _keep_hidden, forward_only=True,
                                             lean=rt.engine.lean_forward)]


@torch.no_grad()
def student_forward(rt: Runtime, sides: list[SideBatch]) -> list[torch.Tensor]:
    """The student's final hidden states [R, h] at the response positions (no grad; diagnostics)."""
    return [o["h"] for o in schedule.run(rt.ddp, sides, _keep_hidden, forward_only=True,
                                         lean=rt.engine.lean_forward)]


@torch.no_grad()
def teacher_score(rt: Runtime, examples: list, references: list[list[int]], alpha: float | None) -> float:
    """Teacher-grounded score: the exposed teacher's mean log-prob per token of the reference.
    A replica may hold none of the examples (they are a global selection): it still joins the sum."""
    if alpha is None:
        return float("nan")
    sides, ids = [], []
    if examples:
        pair = build_pair(examples, references, alpha, rt.cfg.exposure.reveal_unit, rt.device)
        sides, ids = [pair.teacher], [pair.rollout_ids]
    with rt.teacher.context() as teacher_model:
        return -mean_target_nll(rt, teacher_model, sides, ids, output_weights(rt).for_teacher)


@dataclasses.dataclass(kw_only=True, slots=True)
class _Mean:
    total: float
    n: float


def mean_target_nll(rt: Runtime, model, sides: list[SideBatch], ids: list[torch.Tensor],
                    weight: torch.Tensor) -> float:
    """Mean NLL per token of ids[i] at the response positions of sides[i] (forward only), over
    every data-parallel replica; a replica with no rows still joins the sum (NaN: none anywhere)."""
    valid = output_weights(rt).valid
    infos = schedule.run(model, sides, lambda h, i: (h.sum() * 0, {
        "nll": sft_loss(h, weight, valid, ids[i], torch.ones_like(ids[i], dtype=h.dtype)),
        "n": float(len(ids[i]))}), forward_only=True, lean=rt.engine.lean_forward) if sides else []
    total = global_sum(rt.info, _Mean(total=sum(float(i["nll"]) for i in infos), n=sum(i["n"] for i in infos)),
                       rt.device)
    return total.total / total.n if total.n else float("nan")


# ------------------------------------------------------------------------------------- student


@dataclasses.dataclass(kw_only=True, slots=True)
class DistillSums:
    """Summed over micro-batches (and, after global_sum, over data-parallel replicas)."""
    loss: float
    kl: float
    top1_disagree: float
    confidence: float
    tokens_scored: float
    rollout_tokens: float
    teacher_tokens: float
    student_tokens: float
    finished: float
    rollouts: float


def distill_backward(rt: Runtime, pairs: list[PairBatch], h_teacher: list[torch.Tensor],
                     num_sequences: int) -> list[dict]:
    """Student forward + the fused output-layer divergence against the teacher's hidden states +
    backward, per micro-batch; gradients accumulate in DDP's buffers. Returns per micro-batch info
    (loss, kl, top1_disagree, confidence, count) on the last pipeline stage."""
    w = output_weights(rt)
    loss_cfg = rt.cfg.loss

    def loss_fn(h, i):
        pair = pairs[i]
        weights = per_sequence_weights(pair.rollout_lengths, num_sequences).to(h.device)
        loss = distill_loss(tp_input(h), h_teacher[i], w.student, w.teacher, w.valid, weights, loss_cfg,
                            pair.rollout_ids)
        stats = rollout_statistics(h, h_teacher[i], w.student, w.teacher, w.valid)
        return loss, {"loss": loss.detach().clone(), **stats}

    zero_grads(rt.ddp, rt.optimizer)
    return schedule.run(rt.ddp, [p.student for p in pairs], loss_fn, forward_only=False,
                        lean=rt.engine.lean_forward)


def distill_sums(infos: list[dict], rolled: Rollouts, pairs: list[PairBatch]) -> DistillSums:
    """This replica's sums of one distillation step (pass through runtime.global_sum)."""
    return DistillSums(
        loss=sum(float(i["loss"]) for i in infos), kl=sum(float(i["kl"]) for i in infos),
        top1_disagree=sum(float(i["top1_disagree"]) for i in infos),
        confidence=sum(float(i["confidence"]) for i in infos),
        tokens_scored=sum(float(i["count"]) for i in infos),
        rollout_tokens=sum(len(r) for r in rolled.tokens),
        teacher_tokens=sum(int(p.teacher.lengths.sum()) for p in pairs),
        student_tokens=sum(int(p.student.lengths.sum()) for p in pairs),
        finished=float(sum(rolled.finished)), rollouts=float(len(rolled.finished)))


# ------------------------------------------------------------------------------------- SFT


@dataclasses.dataclass(kw_only=True, slots=True)
class ResponseBatch:
    """One micro-batch of [prompt ; response] rows trained or scored on the response tokens."""
    side: SideBatch
    ids: torch.Tensor
    """[R] response token ids (targets)."""
    weights: torch.Tensor
    """[R] per-token weights: 1 / (|response| * sequences), a mean of per-sequence means."""


def response_batches(prompts: list[list[int]], responses: list[list[int]], micro: int,
                     num_sequences: int, device, *, micro_tokens: int = 0) -> list[ResponseBatch]:
    """SFT, GRPO, warm-start and probe micro-batches, built one way (micro_tokens > 0: token-budget
    micro-batches, see micro_batch_groups)."""
    out = []
    for g in micro_batch_groups([len(p) + len(r) for p, r in zip(prompts, responses)], micro, micro_tokens):
        resp = [responses[i] for i in g]
        side, ids = build_side([prompts[i] for i in g], resp, device)
        weights = per_sequence_weights(torch.tensor([len(r) for r in resp]), num_sequences)
        out.append(ResponseBatch(side=side, ids=ids, weights=weights))
    return out


def sft_backward(ddp, optimizer, batches: list[ResponseBatch], weight: torch.Tensor, valid: int, *,
                 lean: bool) -> list[torch.Tensor]:
    """Next-token loss on the responses, forward + backward; the per micro-batch losses (detached,
    still on the device: summing them is the caller's choice of when to synchronise)."""
    def loss_fn(h, i):
        b = batches[i]
        loss = sft_loss(tp_input(h), weight, valid, b.ids, b.weights.to(h.device, h.dtype))
        return loss, {"loss": loss.detach().clone()}

    zero_grads(ddp, optimizer)
    infos = schedule.run(ddp, [b.side for b in batches], loss_fn, forward_only=False, lean=lean)
    return [i["loss"] for i in infos]


@torch.no_grad()
def probe_nll(rt: Runtime, probe: list, references) -> float:
    """The student's teacher-forced NLL per token of y* given x only, on the fixed probe set (each
    replica its share; the controller's learning-progress signal)."""
    mine = probe[rt.info.dp_rank::rt.dp]
    batches = response_batches([ex.student.tolist() for ex in mine], [references(ex) for ex in mine],
                               rt.cfg.train.micro_batch_size, 1, rt.device)
    return mean_target_nll(rt, rt.model, [b.side for b in batches], [b.ids for b in batches],
                           output_weights(rt).student)


# ------------------------------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Update:
    applied: bool
    """False: the step was skipped (non-finite loss or gradient); nothing changed."""
    grad_norm: float


def _grads_finite(rt: Runtime) -> bool:
    """All ranks agree whether every gradient is finite (one all-reduce)."""
    bad = torch.zeros(1, dtype=torch.float32, device=rt.device)
    for buf in getattr(rt.ddp, "buffers", []):
        if not bool(torch.isfinite(buf.grad_data).all()):
            bad.fill_(1.0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def optimizer_update(rt: Runtime, loss: float) -> Update:
    """Optimizer and LR-schedule step, then the teacher's own update (EMA); skipped on a
    non-finite loss or gradient, so a bad batch changes nothing."""
    if not (math.isfinite(loss) and _grads_finite(rt)):
        return Update(applied=False, grad_norm=float("nan"))
    updated, grad_norm, _ = optimizer_step(rt.optimizer, rt.scheduler)
    applied = updated and math.isfinite(grad_norm)
    if applied:
        rt.teacher.after_optimizer_step()
    return Update(applied=applied, grad_norm=grad_norm)


# ------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(kw_only=True, slots=True)
class _Correct:
    correct: float
    total: float


@torch.no_grad()
def held_out_accuracy(rt: Runtime, held: list, tokenizer, step: int, *, greedy: bool = True) -> dict:
    """Held-out accuracy from the student prompt at `step`: greedy (one rollout per problem), or
    Avg@k over k = eval_samples sampled rollouts per problem. Rank 0 shows a progress line on
    stderr unless logging.progress_bar is off (run_log.Progress)."""
    from atesd_mc.evaluation import is_correct

    if not held:
        return {}
    k = 1 if greedy else rt.cfg.train.eval_samples
    mode = "greedy" if greedy else f"avg@{k}"
    # Problem m's j-th sample is global sample m * k + j, whichever rank evaluates it.
    problems = range(rt.info.dp_rank, len(held), rt.dp)
    mine = [held[m] for m in problems for _ in range(k)]
    keys = rollout_keys(rt, step, [m * k + j for m in problems for j in range(k)], EVAL)
    params = sampling(rt, greedy=greedy, max_new=rt.cfg.train.eval_max_new_tokens or None)
    # Rank 0 shows its own share; the data-parallel ranks split the set evenly.
    share = f", data-parallel rank 0 of {rt.dp}" if rt.dp > 1 else ""
    with Progress(len(mine) // k, f"held-out eval at iteration {step} ({mode}{share})",
                  rows_per_problem=k, enabled=rt.is_rank0 and rt.cfg.logging.progress_bar) as bar:
        out = generate_bucketed(rt.ddp, [ex.student.tolist() for ex in mine], params, keys,
                                lean=rt.engine.lean_decode, progress=bar.update)
    correct = sum(int(is_correct(tokenizer.decode(t, skip_special_tokens=True), ex.answer))
                  for ex, t in zip(mine, out.tokens))
    g = global_sum(rt.info, _Correct(correct=correct, total=len(mine)), rt.device)
    return {"accuracy": g.correct / max(g.total, 1), "n": int(g.total) // k, "k": k, "mode": mode}
