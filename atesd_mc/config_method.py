"""Config sections of the distillation method: rollouts (GenerationConfig), the divergence
(LossConfig), the reveal ratio alpha (ExposureConfig) and its Beta-policy controller (ControllerConfig).

Re-exported by atesd_mc.config; field docstrings are the --flag help (atesd_mc.config_io.field_docs).
"""
from __future__ import annotations

from dataclasses import dataclass

from atesd_mc.config_check import require, require_one_of


@dataclass(kw_only=True, slots=True)
class GenerationConfig:
    """On-policy rollout sampling (OPSD defaults)."""

    max_new_tokens: int = 64
    """Rollout length cap."""
    rollout_temperature: float = 1.1
    """Sampling temperature (OPSD: 1.1)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    top_k: int = 20
    """Top-k cut; 0 disables."""
    rollouts_per_prompt: int = 1
    """Rollouts per prompt (GRPO group size)."""
    inference_engine: str = "auto"
    """auto | megatron: the layers that decode rollouts and evaluation samples. auto: the KV-cached
    plain-torch path of atesd_mc/model/lean.py when the model is on its allow-list and a rank holds
    all of it (TP = PP = 1), megatron's layers otherwise; megatron: always megatron's layers (same
    tokens). atesd_mc/engine.py resolves it once and logs the reason for a fallback."""

    def __post_init__(self) -> None:
        require_one_of("inference_engine", self.inference_engine, ("auto", "megatron"))
        require(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        require(self.rollout_temperature >= 0, "rollout_temperature", self.rollout_temperature,
                "must be >= 0 (0 = greedy)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0")
        require(self.rollouts_per_prompt >= 1, "rollouts_per_prompt", self.rollouts_per_prompt,
                "must be >= 1")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Distillation divergence between teacher and student over the full vocabulary."""

    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | sampled_token."""
    jsd_beta: float = 0.5
    """Generalised JSD beta (0 = forward KL, 1 = reverse KL; TRL convention)."""
    distill_temperature: float = 1.1
    """Both logit sets are divided by this (OPSD: 1.1)."""
    distill_clip: float | None = 0.05
    """Per-token per-vocab clip of the divergence terms (OPSD v3); null disables."""
    teacher_top_k: int = 0
    """Restrict the teacher to its top-k tokens (renormalised); 0 = full vocabulary."""
    loss_chunk_size: int = 0
    """Tokens per chunk in the fused output-layer divergence; 0 = automatic."""

    def __post_init__(self) -> None:
        require_one_of("divergence", self.divergence, ("forward_kl", "reverse_kl", "jsd", "sampled_token"))
        require(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "must be in [0, 1]")
        require(self.distill_temperature > 0, "distill_temperature", self.distill_temperature,
                "must be > 0")
        require(self.distill_clip is None or self.distill_clip > 0, "distill_clip",
                self.distill_clip, "must be > 0 or null")
        require(self.teacher_top_k >= 0, "teacher_top_k", self.teacher_top_k, "must be >= 0")
        require(self.loss_chunk_size >= 0, "loss_chunk_size", self.loss_chunk_size, "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ExposureConfig:
    """How much of the reference reasoning the teacher sees (the reveal ratio alpha)."""

    atesd_exposure: str = "adaptive"
    """adaptive (learned Beta policy) | fixed (--reveal-ratio) | random (uniform per window) |
    ramp (linear from --ramp-start at step 0 to --ramp-end at the last step)."""
    reveal_ratio: float = 1.0
    """Alpha for fixed exposure; 1.0 is OPSD."""
    reveal_unit: str = "segment"
    """segment (paragraphs, then lines, then sentences) | token."""
    alpha_min: float = 0.05
    """Lower clip of the sampled alpha."""
    alpha_max: float = 1.0
    """Upper clip of the sampled alpha."""
    ramp_start: float = 0.5
    """Alpha of the ramp schedule at step 0."""
    ramp_end: float = 0.8
    """Alpha of the ramp schedule at the last step (train_iters - 1)."""

    def __post_init__(self) -> None:
        require_one_of("atesd_exposure", self.atesd_exposure, ("adaptive", "fixed", "random", "ramp"))
        require(0.0 <= self.reveal_ratio <= 1.0, "reveal_ratio", self.reveal_ratio, "must be in [0, 1]")
        require_one_of("reveal_unit", self.reveal_unit, ("segment", "token"))
        require(0.0 <= self.alpha_min < self.alpha_max <= 1.0, "alpha_min", self.alpha_min,
                f"need 0 <= alpha_min < alpha_max={self.alpha_max} <= 1")
        for name in ("ramp_start", "ramp_end"):
            require(0.0 <= getattr(self, name) <= 1.0, name, getattr(self, name), "must be in [0, 1]")


@dataclass(kw_only=True, slots=True)
class ControllerConfig:
    """Beta-policy controller of alpha (docs/METHOD.md, Controller)."""

    controller_hidden: int = 64
    """MLP width."""
    controller_layers: int = 2
    """MLP hidden layers."""
    controller_init_mean: float = 0.6
    """Initial Beta mean (set through the output bias)."""
    controller_init_concentration: float = 4.0
    """Initial a+b."""
    hold_steps: int = 5
    """H: student updates a decision is held for."""
    lookahead_steps: int = 10
    """L: steps of learning progress that score a decision."""
    decisions_per_update: int = 4
    """B: completed decisions per REINFORCE update."""
    reward_gamma: float = 0.9
    """Discount of the learning-progress reward."""
    reward_lambda_gt: float = 0.2
    """Weight of the z-scored teacher-grounded term."""
    reward_signal: str = "probe_nll"
    """probe_nll (alpha-independent) | distill_loss: the loss whose decrease is progress."""
    reward_variant: str = "full"
    """full (G_lp + lambda_gt z(G_gt)) | lp_only | one_step (the paper's ablations)."""
    reward_gt_norm: str = "batch"
    """Where G_gt is z-scored: batch (over the B decisions of an update) | running."""
    advantage_baseline: str = "batch"
    """batch (the paper): the advantage is the z-score of the rewards over the B decisions of
    one REINFORCE update | detrended: first remove the trend over training time, a least-squares
    line R ~ a + b t through every decision scored so far (t = its first step), then z-score the
    residuals over the B decisions (batch z-scores until 3 decisions are scored)."""
    controller_lr: float = 1e-3
    """Adam learning rate of the policy."""
    entropy_coef: float = 0.1
    """c of the one-sided entropy penalty."""
    entropy_target: float | None = None
    """H_target; null = entropy of Beta(2, 2)."""
    state_ema_decay: float = 0.9
    """EMA decay of the state features."""
    mismatch_metric: str = "kl"
    """kl (mean per-token KL) | top1 (top-1 disagreement rate)."""

    def __post_init__(self) -> None:
        for name in ("controller_hidden", "controller_layers", "hold_steps", "lookahead_steps",
                     "decisions_per_update"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(0 < self.controller_init_mean < 1, "controller_init_mean", self.controller_init_mean,
                "must be in (0, 1)")
        require(self.controller_init_concentration > 2, "controller_init_concentration",
                self.controller_init_concentration, "must be > 2 (a, b > 1)")
        require(0 < self.reward_gamma <= 1, "reward_gamma", self.reward_gamma, "must be in (0, 1]")
        require(self.reward_lambda_gt >= 0, "reward_lambda_gt", self.reward_lambda_gt, "must be >= 0")
        require_one_of("reward_signal", self.reward_signal, ("probe_nll", "distill_loss"))
        require_one_of("reward_variant", self.reward_variant, ("full", "lp_only", "one_step"))
        require_one_of("reward_gt_norm", self.reward_gt_norm, ("batch", "running"))
        require_one_of("advantage_baseline", self.advantage_baseline, ("batch", "detrended"))
        m, c = self.controller_init_mean, self.controller_init_concentration
        require(m * c > 1 and (1 - m) * c > 1, "controller_init_concentration", c,
                f"with controller_init_mean={m} the initial Beta needs a, b > 1")
        require(self.controller_lr > 0, "controller_lr", self.controller_lr, "must be > 0")
        require(0 < self.state_ema_decay < 1, "state_ema_decay", self.state_ema_decay, "must be in (0, 1)")
        require_one_of("mismatch_metric", self.mismatch_metric, ("kl", "top1"))
