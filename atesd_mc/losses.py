"""Training losses on hidden states at rollout positions, vocab-parallel over TP.

Distillation (docs/METHOD.md, Loss) goes through atesd_mc.kernels' fused output-layer divergence:
the [tokens x vocab] logits are never materialised. The sampled-token estimator and the teacher
top-k variant need per-token log-probs at chosen ids, so they use materialised local-shard logits
(megatron's vocab-parallel cross-entropy). SFT and GRPO losses for the baselines live here too."""
from __future__ import annotations

import torch
import torch.distributed as dist

from atesd_mc.config import LossConfig
from atesd_mc.kernels import divergence_loss, fused_linear_divergence_loss

# Logit for "not in the teacher's top-k": exp underflows to exactly 0 in fp32 while log p stays
# finite, so 0 * log 0 never appears.
_MASKED_LOGIT = -1e4


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _masked_logits(h: torch.Tensor, w: torch.Tensor, valid: int) -> torch.Tensor:
    """Local-shard logits with the padded-vocab columns pushed out of every softmax."""
    z = h.to(w.dtype) @ w.t()
    if valid < z.shape[-1]:
        z = torch.cat([z[..., :valid], torch.full_like(z[..., valid:], _MASKED_LOGIT)], dim=-1)
    return z


def distill_loss(h_s: torch.Tensor, h_t: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor | None,
                 valid: int, token_weights: torch.Tensor, cfg: LossConfig,
                 rollout_ids: torch.Tensor | None = None) -> torch.Tensor:
    """sum_n w_n D_n over rollout tokens. h_* [R, H] (h_s through tp_input); w_* this rank's
    output-layer shard, of which the first `valid` rows are real vocabulary (w_t None: the teacher
    shares the student's output layer)."""
    group = _tp_group()
    # bf16 runs: megatron's Float16Module hands the last stage's output back in fp32; the products
    # run in the weights' dtype (the kernels accumulate in fp32 whatever the input dtype).
    h_s, h_t = h_s.to(w_s.dtype), h_t.to(w_s.dtype)
    if cfg.divergence == "sampled_token" or cfg.teacher_top_k:
        return _materialised_loss(h_s, h_t, w_s, w_t, valid, token_weights, cfg, rollout_ids, group)
    return fused_linear_divergence_loss(
        h_s, h_t, w_s[:valid], None if w_t is None else w_t[:valid], kind=cfg.divergence, beta=cfg.jsd_beta,
        temperature=cfg.distill_temperature, clip=cfg.distill_clip, weights=token_weights,
        reduction="sum", process_group=group, chunk_size=cfg.loss_chunk_size or None)


def _materialised_loss(h_s, h_t, w_s, w_t, valid, token_weights, cfg, rollout_ids, group):
    z_s = _masked_logits(h_s, w_s, valid)
    with torch.no_grad():
        z_t = _masked_logits(h_t, w_s if w_t is None else w_t, valid)
        if cfg.teacher_top_k:
            z_t = _teacher_top_k(z_t, cfg.teacher_top_k, group)
    if cfg.divergence != "sampled_token":
        return divergence_loss(z_s, z_t, kind=cfg.divergence, beta=cfg.jsd_beta,
                               temperature=cfg.distill_temperature, clip=cfg.distill_clip,
                               weights=token_weights, reduction="sum", process_group=group)
    if rollout_ids is None:
        raise ValueError("sampled_token divergence needs the rollout token ids")
    lp_s = token_log_probs(z_s / cfg.distill_temperature, rollout_ids)
    with torch.no_grad():
        lp_t = token_log_probs(z_t / cfg.distill_temperature, rollout_ids)
        advantage = lp_t - lp_s.detach()
    return -(token_weights * advantage * lp_s).sum()


def _teacher_top_k(z_t: torch.Tensor, k: int, group) -> torch.Tensor:
    """Keep the teacher's global top-k logits per token (renormalised by the softmax)."""
    local = torch.topk(z_t, min(k, z_t.shape[-1]), dim=-1).values
    if group is not None:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, dim=-1)
    kth = torch.topk(local, k, dim=-1).values[..., -1:]
    return z_t.masked_fill(z_t < kth, _MASKED_LOGIT)


def token_log_probs(local_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) from vocab-sharded logits [R, V_local] (megatron's vocab-parallel CE; exact)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if local_logits.dtype in (torch.float16, torch.bfloat16):
        local_logits = local_logits.float()
    ce = vocab_parallel_cross_entropy(local_logits.unsqueeze(0).contiguous(), ids.unsqueeze(0))
    return -ce.squeeze(0)


@torch.no_grad()
def rollout_statistics(h_s: torch.Tensor, h_t: torch.Tensor, w_s: torch.Tensor,
                       w_t: torch.Tensor | None, valid: int,
                       max_tokens: int = 128) -> dict[str, torch.Tensor]:
    """Sums over (up to max_tokens evenly spaced) rollout tokens, for the controller state and logs:
    forward KL(p_T || p_S) at temperature 1, top-1 disagreement, student max-prob; and the count."""
    group = _tp_group()
    r = h_s.shape[0]
    if r == 0:
        z = torch.zeros((), dtype=torch.float64, device=h_s.device)
        return {"kl": z, "top1_disagree": z.clone(), "confidence": z.clone(), "count": z.clone()}
    idx = torch.linspace(0, r - 1, min(r, max_tokens), device=h_s.device).round().long()
    z_s = _masked_logits(h_s.detach()[idx], w_s, valid).float()  # casts h to w's dtype
    z_t = _masked_logits(h_t[idx], w_s if w_t is None else w_t, valid).float()
    lse_s, max_s, arg_s = _vp_stats(z_s, group)
    lse_t, _, arg_t = _vp_stats(z_t, group)
    lp_s, lp_t = z_s - lse_s[:, None], z_t - lse_t[:, None]
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)
    if group is not None:
        dist.all_reduce(kl, group=group)
    return {"kl": kl.double().sum(), "top1_disagree": (arg_s != arg_t).double().sum(),
            "confidence": (max_s - lse_s).exp().double().sum(),
            "count": torch.tensor(float(len(idx)), dtype=torch.float64, device=h_s.device)}


def _vp_stats(z: torch.Tensor, group):
    """Global log-sum-exp, max and argmax (global id) of vocab-sharded logits [n, V_local]."""
    m, arg = z.max(-1)
    if group is not None:
        offset = dist.get_rank(group) * z.shape[-1]  # equal shards (megatron pads the vocab)
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        cand = torch.where(m == gm, arg + offset, torch.full_like(arg, torch.iinfo(arg.dtype).max))
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
        m, arg = gm, cand
    s = (z - m[:, None]).exp().sum(-1)
    if group is not None:
        dist.all_reduce(s, group=group)
    return m + s.log(), m, arg


def target_log_probs(h: torch.Tensor, w: torch.Tensor, valid: int, target_ids: torch.Tensor) -> torch.Tensor:
    """log p(target_n) [R] from hidden states h [R, H] through this rank's output shard w."""
    return token_log_probs(_masked_logits(h, w, valid), target_ids)


def sft_loss(h: torch.Tensor, w: torch.Tensor, valid: int, target_ids: torch.Tensor,
             token_weights: torch.Tensor) -> torch.Tensor:
    """sum_n w_n * cross-entropy(target_n): next-token loss on reference tokens (SFT, warm start)."""
    return -(token_weights * target_log_probs(h, w, valid, target_ids)).sum()


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: (r - mean_group) / (std_group + eps), groups of consecutive rows."""
    r = rewards.double().view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              token_weights: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
    """PPO-clipped policy gradient per token, no KL term (OPSD's GRPO setting):
    -sum_n w_n min(rho_n A_n, clip(rho_n, 1-eps, 1+eps) A_n), rho = exp(logp_new - logp_old)."""
    ratio = (logp_new - logp_old.detach()).exp()
    adv = advantages.to(logp_new.dtype)
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    return -(token_weights * obj).sum()
