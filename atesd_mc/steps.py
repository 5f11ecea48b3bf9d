"""One training step per algorithm, each reading top to bottom as a list of stages.

    distill_step (ATESD, OPSD, fixed / random alpha):
      alpha -> broadcast -> rollouts -> teacher context -> teacher forward -> fused loss and
      backward -> optimizer -> controller observes
    sft_step: reference tokens -> next-token loss and backward -> optimizer
    (GRPO: atesd_mc/grpo.py; the warm start: atesd_mc/warm_start.py)

The trainer (atesd_mc/trainer.py) logs and saves what a step returns. The loss is a mean over
sequences of per-token means (docs/METHOD.md, "The loss")."""
from __future__ import annotations

import dataclasses

from atesd_mc import distributed, stages
from atesd_mc.data.sampler import DistributedBatchSampler
from atesd_mc.run_log import Timer
from atesd_mc.runtime import Runtime, global_sum
from atesd_mc.stages import Update
from atesd_mc.tasks import Problems, ReferenceTokens


@dataclasses.dataclass(kw_only=True, slots=True)
class TrainData:
    problems: Problems
    references: ReferenceTokens
    sampler: DistributedBatchSampler
    """This data-parallel rank's resumable position in the training set."""

    def next_examples(self) -> list:
        return [self.problems.train[i] for i in self.sampler.next_batch()]

    def global_indices(self, n: int) -> range:
        """Global sample indices of this rank's n examples of a step (its slice of the global batch)."""
        return range(self.sampler.first_index, self.sampler.first_index + n)


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutStats:
    mismatch: float
    """Mean per-token KL(teacher || student) on the rollouts."""
    top1_disagree: float
    confidence: float
    """Mean max-probability of the student over rollout tokens."""
    rollout_len: float
    eos_rate: float


@dataclasses.dataclass(kw_only=True, slots=True)
class StepStats:
    """What one step did, global over data-parallel replicas."""
    step: int
    """The iteration this step completes (1-based)."""
    alpha: float | None
    loss: float
    tokens: dict
    """Tokens processed per stage."""
    update: Update
    probe_nll: float
    lr: float
    teacher_score: float = float("nan")
    rollout: RolloutStats | None = None
    flops: dict | None = None
    """Executed FLOPs per stage."""
    reward_accuracy: float | None = None
    """GRPO: fraction of rollouts with a correct answer."""
    controller: dict = dataclasses.field(default_factory=dict)

    def record(self, skipped_total: int) -> dict:
        """The metrics.jsonl record."""
        out = {"step": self.step, "alpha": self.alpha, "loss": self.loss}
        if self.rollout is not None:
            out.update(dataclasses.asdict(self.rollout), flops=self.flops)
        if self.reward_accuracy is not None:
            out["reward_accuracy"] = self.reward_accuracy
        out.update(probe_nll=self.probe_nll, teacher_score=self.teacher_score,
                   grad_norm=self.update.grad_norm, skipped=not self.update.applied,
                   skipped_total=skipped_total, lr=self.lr, tokens=self.tokens)
        return {**out, **self.controller}


def update_and_probe(rt: Runtime, data: TrainData, step: int, loss: float,
                     timer: Timer) -> tuple[float, Update, float]:
    """The end every step shares: optimizer update (skipped on a non-finite loss or gradient), then
    the probe NLL on the updated weights. Returns (loss as recorded, update, probe NLL). The loss of
    an iteration in --inject-nan-steps is NaN (a testing hook)."""
    if step + 1 in rt.cfg.train.inject_nan_steps:
        loss = float("nan")
    with timer("optimizer"):
        update = stages.optimizer_update(rt, loss)
    with timer("stats"):
        probe = stages.probe_nll(rt, data.problems.probe, data.references)
    return loss, update, probe


def distill_step(rt: Runtime, data: TrainData, exposure, step: int, timer: Timer) -> StepStats:
    """One on-policy self-distillation step at iteration `step` (0-based). `exposure` is the
    alpha schedule or controller (rank 0; None elsewhere)."""
    alpha = distributed.broadcast_object(float(exposure.alpha_for_step(step)) if exposure else None)
    examples = data.next_examples()
    rows = data.global_indices(len(examples))
    with timer("rollout"):
        rolled = stages.rollouts(rt, [ex.student.tolist() for ex in examples], stages.sampling(rt),
                                 stages.rollout_keys(rt, step, rows))
    per_rank = len(examples)  # the per-sequence weights' count, whichever replica trains a sample
    if rt.cfg.train.micro_batch_tokens:
        examples, rows, rolled = stages.balance_across_ranks(rt, examples, rows, rolled)
    pairs = stages.teacher_contexts(rt, examples, rolled.tokens, alpha)
    with timer("teacher"):
        h_teacher = stages.teacher_forward(rt, [p.teacher for p in pairs])
    with timer("student"):
        infos = stages.distill_backward(rt, pairs, h_teacher, per_rank)
    sums = global_sum(rt.info, stages.distill_sums(infos, rolled, pairs), rt.device)
    flops = step_flops(rt, examples, rolled, pairs)
    with timer("stats"):
        # The global batch's first 4 examples, wherever they sit (none on some replicas).
        few = [ex for ex, i in zip(examples, rows) if i < 4]
        score = stages.teacher_score(rt, few, [data.references(ex) for ex in few], alpha)
    loss, update, probe = update_and_probe(rt, data, step, sums.loss / rt.dp, timer)
    n = max(sums.tokens_scored, 1)
    rollout = RolloutStats(mismatch=sums.kl / n, top1_disagree=sums.top1_disagree / n,
                           confidence=sums.confidence / n, rollout_len=sums.rollout_tokens / max(sums.rollouts, 1),
                           eos_rate=sums.finished / max(sums.rollouts, 1))
    controller = observe_controller(rt, exposure, step, alpha, update, loss, rollout, probe, score)
    return StepStats(step=step + 1, alpha=alpha, loss=loss, update=update, probe_nll=probe,
                     lr=rt.optimizer.param_groups[0]["lr"], teacher_score=score, rollout=rollout,
                     flops=flops, controller=controller,
                     tokens={"rollout": sums.rollout_tokens, "teacher": sums.teacher_tokens,
                             "student": sums.student_tokens})


@dataclasses.dataclass(kw_only=True, slots=True)
class _SftSums:
    loss: float
    tokens: float


def sft_step(rt: Runtime, data: TrainData, step: int, timer: Timer) -> StepStats:
    """Next-token loss on the reference solutions given the student prompt (the SFT baseline)."""
    examples = data.next_examples()
    batches = stages.response_batches([ex.student.tolist() for ex in examples],
                                      [data.references(ex) for ex in examples],
                                      rt.cfg.train.micro_batch_size, len(examples), rt.device)
    w = stages.output_weights(rt)
    with timer("student"):
        losses = stages.sft_backward(rt.ddp, rt.optimizer, batches, w.student, w.valid,
                                     lean=rt.engine.lean_forward)
    sums = global_sum(rt.info, _SftSums(loss=sum(float(x) for x in losses),
                                        tokens=float(sum(len(b.ids) for b in batches))), rt.device)
    loss, update, probe = update_and_probe(rt, data, step, sums.loss / rt.dp, timer)
    return StepStats(step=step + 1, alpha=None, loss=loss, update=update, probe_nll=probe,
                     lr=rt.optimizer.param_groups[0]["lr"], tokens={"student": sums.tokens})


def observe_controller(rt: Runtime, exposure, step: int, alpha, update: Update, loss: float,
                       rollout: RolloutStats, probe_nll: float, teacher_score: float) -> dict:
    """The controller (rank 0) records this step's signals; a completed decision window and a
    REINFORCE update happen inside observe(). Returns the fields it adds to the step's record.
    A skipped step is not observed: it changed nothing."""
    if exposure is None or alpha is None or not update.applied:
        return {}
    metric = rt.cfg.controller.mismatch_metric
    out = exposure.observe(step, loss=loss, mismatch=rollout.mismatch if metric == "kl" else rollout.top1_disagree,
                           probe_nll=probe_nll, confidence=rollout.confidence, teacher_score=teacher_score) or {}
    fields = {k: out[k] for k in ("beta_a", "beta_b", "policy_mean") if k in out}
    if out.get("completed"):
        fields["reward"] = out.get("rewards", [None])[-1] if out.get("updated") else None
        fields["decisions_completed"] = len(out["completed"])
    if out.get("updated"):
        fields["reward"] = float(out["reward_mean"])
        fields["policy_loss"] = float(out["policy_loss"])
    if "advantages" in out:  # per decision of the update(s), for corr(advantage, decision time)
        fields.update({k: [float(x) for x in out[k]] for k in ("rewards", "advantages")})
        fields["decision_steps"] = [int(t) for t in out["decision_steps"]]
    return fields


@dataclasses.dataclass(kw_only=True, slots=True)
class _Flops:
    rollout: float
    teacher: float
    student: float


def step_flops(rt: Runtime, examples, rolled, pairs) -> dict:
    """Executed FLOPs per stage of a distillation step, summed over data-parallel replicas."""
    from atesd_mc.flops import step_flops as count
    from atesd_mc.model.qwen3 import padded_vocab_size

    new = [len(r) for r in rolled.tokens]
    teacher_ctx = [int(t) - n for p in pairs for t, n in
                   zip(p.teacher.lengths.tolist(), p.rollout_lengths.tolist())]
    m = rt.cfg.model
    f = count(m, rt.vocab, [len(ex.student) for ex in examples], new, teacher_ctx,
              padded_vocab=padded_vocab_size(rt.vocab, m.make_vocab_size_divisible_by, rt.info.tp))
    assert set(f) == {"rollout", "teacher", "student"}, f
    return dataclasses.asdict(global_sum(rt.info, _Flops(**f), rt.device))
