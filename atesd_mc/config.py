"""Run configuration: one dataclass per concern, loaded from YAML and overridden by flags.

Every field becomes a Megatron-style ``--kebab-case`` flag and a YAML key (atesd_mc.config_io).
Validation happens in ``__post_init__`` of each section and in :meth:`RunConfig.validate_world`
for rules that need the world size; every error names the field and the offending value.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (and file, when known)."""


def _require(cond: bool, field_name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config: {field_name}={value!r}: {why}")


def _choice(field_name: str, value: Any, choices: tuple) -> None:
    _require(value in choices, field_name, value, f"must be one of {', '.join(map(str, choices))}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Qwen3-architecture decoder. Defaults are the embedded tiny CPU model."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 192
    """SwiGLU inner width (per gate/up branch)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups)."""
    kv_channels: int = 16
    """Head dimension (Qwen3 sets it explicitly; it need not be hidden/heads)."""
    vocab_size: int = 0
    """Tokenizer vocabulary size; 0 = take it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Vocab is padded to a multiple of this times the TP size (Megatron convention)."""
    seq_length: int = 256
    """Maximum sequence length (teacher context + rollout) and RoPE table size."""
    rotary_base: float = 1_000_000.0
    """RoPE base (Qwen3: 1e6)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon (Qwen3: 1e-6)."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output layer (Qwen3-8B); tied for 0.6B/1.7B/4B."""
    params_dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16."""
    transformer_impl: str = "auto"
    """auto (transformer_engine spec when it imports, else local) | local | transformer_engine."""
    lora_rank: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Linears that receive adapters."""
    teacher_mode: str = "auto"
    """auto (lora_off with LoRA, frozen_copy otherwise) | lora_off | frozen_copy | ema | live."""
    teacher_ema_decay: float = 0.99
    """EMA decay for teacher_mode=ema."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "seq_length", "make_vocab_size_divisible_by"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        _require(self.vocab_size >= 0, "vocab_size", self.vocab_size, "must be >= 0")
        _require(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                 self.num_query_groups, f"must divide num_attention_heads={self.num_attention_heads}")
        _choice("params_dtype", self.params_dtype, ("auto", "fp32", "bf16"))
        _choice("transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _choice("teacher_mode", self.teacher_mode, ("auto", "lora_off", "frozen_copy", "ema", "live"))
        _require(self.lora_rank >= 0, "lora_rank", self.lora_rank, "must be >= 0")
        bad = sorted(set(self.lora_targets) - {"q", "k", "v", "o", "gate", "up", "down"})
        _require(not bad, "lora_targets", self.lora_targets, f"unknown targets {bad}")
        _require(not (self.teacher_mode == "lora_off" and self.lora_rank == 0), "teacher_mode",
                 self.teacher_mode, "lora_off needs lora_rank > 0")
        _require(0.0 < self.teacher_ema_decay < 1.0, "teacher_ema_decay", self.teacher_ema_decay,
                 "must be in (0, 1)")

    @property
    def resolved_teacher_mode(self) -> str:
        if self.teacher_mode != "auto":
            return self.teacher_mode
        return "lora_off" if self.lora_rank > 0 else "frozen_copy"


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Model parallel layout; data parallel size is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    """TP size."""
    pipeline_model_parallel_size: int = 1
    """PP size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks."""
    distributed_backend: str = "auto"
    """auto (nccl with CUDA, gloo otherwise) | nccl | gloo."""
    distributed_timeout_minutes: float = 10.0
    """Collective timeout; a dead rank makes the others fail after this, not hang."""

    def __post_init__(self) -> None:
        _require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size",
                 self.tensor_model_parallel_size, "must be >= 1")
        _require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size",
                 self.pipeline_model_parallel_size, "must be >= 1")
        _require(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
                 "sequence_parallel", self.sequence_parallel, "needs tensor_model_parallel_size > 1")
        _choice("distributed_backend", self.distributed_backend, ("auto", "nccl", "gloo"))
        _require(self.distributed_timeout_minutes > 0, "distributed_timeout_minutes",
                 self.distributed_timeout_minutes, "must be > 0")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where problems come from."""

    data_path: str = ""
    """Problem store directory (tools/preprocess_data.py); empty = the embedded synthetic task."""
    tokenizer: str = ""
    """Tokenizer directory or sentencepiece model; empty = the synthetic task's own tokenizer."""
    eval_data_path: str = ""
    """Held-out problem store for in-training accuracy (the synthetic task has its own split)."""
    synthetic_vocab_size: int = 512
    """Synthetic task: sentencepiece vocabulary size (512: template words become single tokens)."""
    synthetic_train_size: int = 20000
    """Synthetic task: training problems."""
    synthetic_eval_size: int = 200
    """Synthetic task: held-out evaluation problems."""
    synthetic_min_steps: int = 2
    """Synthetic task: fewest reasoning steps per problem."""
    synthetic_max_steps: int = 3
    """Synthetic task: most reasoning steps per problem."""
    probe_size: int = 32
    """Training pairs held out of the batch stream for the probe NLL (controller state)."""
    max_prompt_length: int = 160
    """Teacher prompts longer than this (tokens) are cut from the left of the reference."""
    cache_dir: str = ".cache/atesd"
    """Where derived artefacts (tokenizer, warm start) are cached."""

    def __post_init__(self) -> None:
        for name in ("synthetic_train_size", "synthetic_eval_size", "synthetic_min_steps",
                     "max_prompt_length"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        _require(self.synthetic_max_steps >= self.synthetic_min_steps, "synthetic_max_steps",
                 self.synthetic_max_steps, f"must be >= synthetic_min_steps={self.synthetic_min_steps}")
        _require(self.probe_size >= 0, "probe_size", self.probe_size, "must be >= 0")


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
    """auto | megatron: with auto, rollouts and forward-only passes (teacher, probe NLL) run the
    plain-torch path of atesd_mc/lean_decode.py when a rank holds the whole model (TP = PP = 1),
    megatron's layers otherwise; megatron always uses megatron's layers (same numbers to 1e-5)."""

    def __post_init__(self) -> None:
        _choice("inference_engine", self.inference_engine, ("auto", "megatron"))
        _require(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be > 0")
        _require(self.rollout_temperature >= 0, "rollout_temperature", self.rollout_temperature,
                 "must be >= 0 (0 = greedy)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0")
        _require(self.rollouts_per_prompt >= 1, "rollouts_per_prompt", self.rollouts_per_prompt,
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
        _choice("divergence", self.divergence, ("forward_kl", "reverse_kl", "jsd", "sampled_token"))
        _require(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", self.jsd_beta, "must be in [0, 1]")
        _require(self.distill_temperature > 0, "distill_temperature", self.distill_temperature,
                 "must be > 0")
        _require(self.distill_clip is None or self.distill_clip > 0, "distill_clip",
                 self.distill_clip, "must be > 0 or null")
        _require(self.teacher_top_k >= 0, "teacher_top_k", self.teacher_top_k, "must be >= 0")
        _require(self.loss_chunk_size >= 0, "loss_chunk_size", self.loss_chunk_size, "must be >= 0")


@dataclass(kw_only=True, slots=True)
class ExposureConfig:
    """How much of the reference reasoning the teacher sees (the reveal ratio alpha)."""

    atesd_exposure: str = "adaptive"
    """adaptive (learned Beta policy) | fixed (--reveal-ratio) | random (uniform per window)."""
    reveal_ratio: float = 1.0
    """Alpha for fixed exposure; 1.0 is OPSD."""
    reveal_unit: str = "segment"
    """segment (paragraphs, then lines, then sentences) | token."""
    alpha_min: float = 0.05
    """Lower clip of the sampled alpha."""
    alpha_max: float = 1.0
    """Upper clip of the sampled alpha."""

    def __post_init__(self) -> None:
        _choice("atesd_exposure", self.atesd_exposure, ("adaptive", "fixed", "random"))
        _require(0.0 <= self.reveal_ratio <= 1.0, "reveal_ratio", self.reveal_ratio, "must be in [0, 1]")
        _choice("reveal_unit", self.reveal_unit, ("segment", "token"))
        _require(0.0 <= self.alpha_min < self.alpha_max <= 1.0, "alpha_min", self.alpha_min,
                 f"need 0 <= alpha_min < alpha_max={self.alpha_max} <= 1")


@dataclass(kw_only=True, slots=True)
class ControllerConfig:
    """Beta-policy controller of alpha (ATESD_SPEC section 3)."""

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
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(0 < self.controller_init_mean < 1, "controller_init_mean", self.controller_init_mean,
                 "must be in (0, 1)")
        _require(self.controller_init_concentration > 2, "controller_init_concentration",
                 self.controller_init_concentration, "must be > 2 (a, b > 1)")
        _require(0 < self.reward_gamma <= 1, "reward_gamma", self.reward_gamma, "must be in (0, 1]")
        _require(self.reward_lambda_gt >= 0, "reward_lambda_gt", self.reward_lambda_gt, "must be >= 0")
        _choice("reward_signal", self.reward_signal, ("probe_nll", "distill_loss"))
        _choice("reward_variant", self.reward_variant, ("full", "lp_only", "one_step"))
        _choice("reward_gt_norm", self.reward_gt_norm, ("batch", "running"))
        m, c = self.controller_init_mean, self.controller_init_concentration
        _require(m * c > 1 and (1 - m) * c > 1, "controller_init_concentration", c,
                 f"with controller_init_mean={m} the initial Beta needs a, b > 1")
        _require(self.controller_lr > 0, "controller_lr", self.controller_lr, "must be > 0")
        _require(0 < self.state_ema_decay < 1, "state_ema_decay", self.state_ema_decay, "must be in (0, 1)")
        _choice("mismatch_metric", self.mismatch_metric, ("kl", "top1"))


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimisation and schedule."""

    atesd_algorithm: str = "atesd"
    """atesd | opsd (fixed alpha = 1) | sft | grpo | lm (plain next-token loss on references)."""
    train_iters: int = 50
    """Student updates."""
    micro_batch_size: int = 8
    """Prompts per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Prompts per step across data-parallel ranks and micro-batches."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed of weights, data order and sampling."""
    warm_start_iters: int = 0
    """SFT steps on student+teacher formats before distillation (cached); 0 = none."""
    warm_start_lr: float = 3e-3
    """Learning rate of the warm start."""
    warm_start_batch_size: int = 0
    """Examples per warm-start step (all ranks); 0 = global_batch_size."""
    eval_interval: int = 0
    """Evaluate held-out accuracy every N steps (0 = only before and after)."""
    warm_start_teacher_fraction: float = 0.75
    """Warm start: share of teacher-format examples (random number of revealed segments)."""
    train_engine: str = "auto"
    """auto | lean | megatron: the forward of training passes (student, SFT, GRPO, warm start).
    lean: the padding-free plain-torch path of atesd_mc/lean_decode.py when a rank holds the whole
    model (TP = PP = 1), megatron's layers otherwise; megatron: always megatron's layers (TE's fused
    kernels when installed). auto: lean on CPU, where it measured 1.6x faster, megatron on GPU until
    tools/gpu_check.sh has measured both. Megatron's schedule, DDP and optimizer run either way
    (same gradients to float rounding)."""
    eval_samples: int = 4
    """k of the held-out Avg@k (sampled at the rollout temperature); greedy accuracy is separate."""
    eval_max_new_tokens: int = 0
    """Held-out evaluation rollout cap; 0 = generation.max_new_tokens."""
    max_skipped_steps: int = 10
    """Stop with an error after this many consecutive steps skipped for a NaN/Inf loss or gradient."""
    inject_nan_steps: list[int] = field(default_factory=list)
    """Testing hook: make the loss NaN at these steps (1-based)."""
    inject_fault_at: str = ""
    """Testing hook: "RANK:STEP" makes that rank raise at that step."""

    def __post_init__(self) -> None:
        _choice("atesd_algorithm", self.atesd_algorithm, ("atesd", "opsd", "sft", "grpo", "lm"))
        _choice("train_engine", self.train_engine, ("auto", "lean", "megatron"))
        for name in ("train_iters", "micro_batch_size", "global_batch_size"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
                 self.global_batch_size, f"must be a multiple of micro_batch_size={self.micro_batch_size}")
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        for name in ("lr_warmup_iters", "warm_start_iters", "eval_interval", "warm_start_batch_size"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        _require(self.clip_grad >= 0, "clip_grad", self.clip_grad, "must be >= 0")
        _require(0 < self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in (0, 1)")
        _require(0 <= self.warm_start_teacher_fraction <= 1, "warm_start_teacher_fraction",
                 self.warm_start_teacher_fraction, "must be in [0, 1]")
        _require(self.eval_max_new_tokens >= 0, "eval_max_new_tokens", self.eval_max_new_tokens,
                 "must be >= 0")
        _require(self.eval_samples >= 1, "eval_samples", self.eval_samples, "must be >= 1")
        _require(self.max_skipped_steps >= 1, "max_skipped_steps", self.max_skipped_steps, "must be >= 1")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming (megatron dist_checkpointing, torch_dist)."""

    save: str = ""
    """Run directory: metrics.jsonl, eval.json, checkpoints; empty = runs/<config name>."""
    load: str = ""
    """Checkpoint directory to resume from (auto-resume uses --save when it has a checkpoint)."""
    save_interval: int = 0
    """Save every N steps; 0 = only at the end."""
    no_load_optim: bool = False
    """Do not restore the optimizer state."""
    no_load_rng: bool = False
    """Do not restore RNG states."""
    finetune: bool = False
    """Load weights only and start at step 0."""
    exit_signal_handler: bool = True
    """SIGTERM/SIGINT: finish the step, save, exit 0."""
    exit_duration_in_mins: float = 0.0
    """Save and exit once the run has lasted this long (0 = no limit)."""
    exit_interval: int = 0
    """Save and exit when the step count is a multiple of this (0 = never)."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, "save_interval", self.save_interval, "must be >= 0")
        _require(self.exit_duration_in_mins >= 0, "exit_duration_in_mins", self.exit_duration_in_mins,
                 "must be >= 0")
        _require(self.exit_interval >= 0, "exit_interval", self.exit_interval, "must be >= 0")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """What the run prints and writes."""

    log_interval: int = 1
    """Print the Megatron log line every N steps."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    progress_bar: bool = True
    """Show a progress bar when stdout is a terminal."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "log_interval", self.log_interval, "must be >= 1")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
    "generation": GenerationConfig, "loss": LossConfig, "exposure": ExposureConfig,
    "controller": ControllerConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The whole run: one instance of each section."""

    name: str = "tiny_arith"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> str:
        return self.checkpoint.save or os.path.join("runs", self.name)

    def validate_world(self, world_size: int) -> int:
        """Checks that need the world size; returns the data-parallel size."""
        p, m = self.parallel, self.model
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        _require(world_size % (tp * pp) == 0, "tensor_model_parallel_size", tp,
                 f"tensor_model_parallel_size*pipeline_model_parallel_size={tp * pp} must divide the "
                 f"world size {world_size}")
        _require(m.num_attention_heads % tp == 0, "tensor_model_parallel_size", tp,
                 f"must divide num_attention_heads={m.num_attention_heads}")
        _require(m.num_query_groups % tp == 0, "tensor_model_parallel_size", tp,
                 f"must divide num_query_groups={m.num_query_groups}")
        _require(m.ffn_hidden_size % tp == 0, "tensor_model_parallel_size", tp,
                 f"must divide ffn_hidden_size={m.ffn_hidden_size}")
        _require(m.num_layers % pp == 0, "pipeline_model_parallel_size", pp,
                 f"must divide num_layers={m.num_layers}")
        dp = world_size // (tp * pp)
        t = self.train
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "global_batch_size",
                 t.global_batch_size, f"must be a multiple of micro_batch_size*data_parallel_size="
                 f"{t.micro_batch_size * dp}")
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def __getattr__(name: str):
    """YAML/flag parsing lives in atesd_mc.config_io; these names stay importable from here."""
    if name in ("parse_config", "config_from_dict", "build_arg_parser", "load_yaml", "field_docs"):
        from atesd_mc import config_io

        return getattr(config_io, name)
    raise AttributeError(f"module 'atesd_mc.config' has no attribute {name!r}")

