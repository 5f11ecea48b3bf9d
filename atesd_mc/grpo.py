"""GRPO baseline step: G rollouts per prompt, reward 1/0 from the verified answer, group-normalised
advantages, PPO-clipped policy gradient, no KL term (OPSD's GRPO setting).

To keep the compute budget of the distillation runs, a step uses batch/G prompts with G rollouts
each: the same number of rollouts and student updates. One update per batch, so the ratio is 1 at
the update (the clip only matters if the loss is reused)."""
from __future__ import annotations

import torch

from atesd_mc import schedule
from atesd_mc.batching import build_side, per_sequence_weights
from atesd_mc.evaluation import is_correct
from atesd_mc.generation import generate
from atesd_mc.losses import _masked_logits, grpo_advantages, grpo_loss, token_log_probs
from atesd_mc.model.qwen3 import tp_input
from atesd_mc.optim import zero_grads


def grpo_step(trainer) -> dict:
    t, g = trainer.timer, trainer.cfg.generation.rollouts_per_prompt
    indices = trainer.sampler.next_batch()
    prompts_n = max(1, len(indices) // g)
    examples = [trainer.problems.train[i] for i in indices[:prompts_n] for _ in range(g)]
    t.start("rollout")
    rollouts = generate(trainer.ddp, [ex.student.tolist() for ex in examples], trainer.sampling(),
                        trainer._generator())
    t.stop("rollout")
    rewards = torch.tensor([float(is_correct(trainer.tok.decode(r, skip_special_tokens=True), ex.answer))
                            for ex, r in zip(examples, rollouts.tokens)])
    adv = grpo_advantages(rewards, g)
    w, _, valid = trainer._weights()
    sides, ids, advs, weights = [], [], [], []
    n_seq = len(examples)
    for k, mb in enumerate(trainer._micro(list(range(n_seq)))):
        resp = [rollouts.tokens[i] for i in mb]
        side, rid = build_side([examples[i].student.tolist() for i in mb], resp, trainer.device)
        lens = torch.tensor([len(r) for r in resp])
        sides.append(side)
        ids.append(rid)
        advs.append(torch.repeat_interleave(adv[mb], lens).to(trainer.device))
        weights.append(per_sequence_weights(lens, n_seq).to(trainer.device))

    def loss_fn(h, i):
        lp = token_log_probs(_masked_logits(tp_input(h), w, valid), ids[i])
        loss = grpo_loss(lp, lp.detach(), advs[i], weights[i].to(lp.dtype))
        return loss, {"loss": loss.detach().clone()}

    t.start("student")
    zero_grads(trainer.ddp, trainer.optimizer)
    infos = schedule.run(trainer.ddp, sides, loss_fn, forward_only=False, lean=trainer.lean_train)
    t.stop("student")
    tot = trainer._all_sum([sum(float(i["loss"]) for i in infos), float(rewards.sum()), float(n_seq),
                            float(sum(len(r) for r in rollouts.tokens))])
    return trainer._update_and_record(None, tot[0] / trainer.dp,
                                      {"rollout": tot[3], "student": tot[3]},
                                      {"reward_accuracy": tot[1] / max(tot[2], 1)})
