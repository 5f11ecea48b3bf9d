"""GRPO baseline step: G rollouts per prompt, reward 1/0 from the verified answer, group-normalised
advantages, PPO-clipped policy gradient, no KL term (OPSD's GRPO setting).

To keep the compute budget of the distillation runs, a step uses batch/G prompts with G rollouts
each: the same number of rollouts and student updates. The prompts are the first batch/G of the
global batch and every rollout is keyed by its global index, so any layout gives the same step.
One update per batch, so the ratio is 1 at
the update (the clip only matters if the loss is reused)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from atesd_mc import schedule, stages
from atesd_mc.evaluation import is_correct
from atesd_mc.losses import grpo_advantages, grpo_loss, target_log_probs
from atesd_mc.model.qwen3 import tp_input
from atesd_mc.optim import zero_grads
from atesd_mc.run_log import Timer
from atesd_mc.runtime import Runtime, counts_here, global_sum
from atesd_mc.steps import StepStats, TrainData, update_and_probe


@dataclasses.dataclass(kw_only=True, slots=True)
class _GrpoSums:
    loss: float
    correct: float
    rollouts: float
    rollout_tokens: float


def grpo_step(rt: Runtime, data: TrainData, tokenizer, step: int, timer: Timer) -> StepStats:
    g = rt.cfg.generation.rollouts_per_prompt
    glob = data.sampler.next_global_batch()
    problems = glob[:max(1, len(glob) // g)]
    # Global rollout k is sample k % g of problem k // g; rank r takes a contiguous share of them,
    # so the rollouts, their keys and their groups are the same on every layout.
    lo, hi = _share(len(problems) * g, rt)
    examples = [data.problems.train[problems[k // g]] for k in range(lo, hi)]
    prompts = [ex.student.tolist() for ex in examples]
    with timer("rollout"):
        rolled = stages.rollouts(rt, prompts, stages.sampling(rt), stages.rollout_keys(rt, step, range(lo, hi)))
    rewards = torch.tensor([float(is_correct(tokenizer.decode(r, skip_special_tokens=True), ex.answer))
                            for ex, r in zip(examples, rolled.tokens)], dtype=torch.float64)
    # Per-sequence weights 1 / (|y| * used / dp): with DDP's average over replicas, a global mean.
    batches = stages.response_batches(prompts, rolled.tokens, rt.cfg.train.micro_batch_size,
                                      len(problems) * g / rt.dp, rt.device)
    adv = grpo_advantages(_global_rewards(rt, rewards, lo, len(problems) * g), g)[lo:hi]
    advantages = _token_advantages(adv, rolled.tokens, rt.cfg.train.micro_batch_size, rt.device)
    with timer("student"):
        losses = _policy_gradient_backward(rt, batches, advantages)
    sums = global_sum(rt.info, _GrpoSums(loss=sum(float(x) for x in losses), correct=float(rewards.sum()),
                                         rollouts=float(len(examples)),
                                         rollout_tokens=float(sum(len(r) for r in rolled.tokens))), rt.device)
    loss, update, probe = update_and_probe(rt, data, step, sums.loss / rt.dp, timer)
    return StepStats(step=step + 1, alpha=None, loss=loss, update=update, probe_nll=probe,
                     lr=rt.optimizer.param_groups[0]["lr"], reward_accuracy=sums.correct / max(sums.rollouts, 1),
                     tokens={"rollout": sums.rollout_tokens, "student": sums.rollout_tokens})


def _share(n: int, rt: Runtime) -> tuple[int, int]:
    """This data-parallel rank's contiguous share [lo, hi) of n global rollouts."""
    r, dp = rt.info.dp_rank, rt.dp
    lo, hi = r * n // dp, (r + 1) * n // dp
    if lo == hi:
        raise ValueError(f"GRPO: {n} rollouts per step leave data-parallel rank {r} of {dp} none "
                         "(raise global_batch_size or lower rollouts_per_prompt)")
    return lo, hi


def _global_rewards(rt: Runtime, mine: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """All n rewards of the step (groups may span replicas): one all-reduce, one replica rank each."""
    full = torch.zeros(n, dtype=torch.float64, device=rt.device)
    if counts_here(rt.info):
        full[lo:lo + len(mine)] = mine.to(rt.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)
    return full.cpu()


def _token_advantages(adv: torch.Tensor, responses: list[list[int]], micro: int, device) -> list[torch.Tensor]:
    """Each sequence's advantage repeated over its response tokens, per micro-batch."""
    out = []
    for start in range(0, len(responses), micro):
        lengths = torch.tensor([len(r) for r in responses[start:start + micro]])
        out.append(torch.repeat_interleave(adv[start:start + micro], lengths).to(device))
    return out


def _policy_gradient_backward(rt: Runtime, batches, advantages) -> list[torch.Tensor]:
    w = stages.output_weights(rt)

    def loss_fn(h, i):
        lp = target_log_probs(tp_input(h), w.student, w.valid, batches[i].ids)
        loss = grpo_loss(lp, lp.detach(), advantages[i], batches[i].weights.to(rt.device, lp.dtype))
        return loss, {"loss": loss.detach().clone()}

    zero_grads(rt.ddp, rt.optimizer)
    infos = schedule.run(rt.ddp, [b.side for b in batches], loss_fn, forward_only=False,
                         lean=rt.engine.lean_forward)
    return [i["loss"] for i in infos]
