"""Config sections of the run around the method: where problems come from (DataConfig), the
optimisation schedule (TrainConfig), saving and resuming (CheckpointConfig), what is logged (LoggingConfig).

Re-exported by atesd_mc.config; field docstrings are the --flag help (atesd_mc.config_io.field_docs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from atesd_mc.config_check import require, require_one_of


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where problems come from."""

    data_path: str = ""
    """Problem store directory (tools/preprocess_data.py); empty = the embedded synthetic task."""
    tokenizer: str = ""
    """Tokenizer directory or sentencepiece model; empty = the synthetic task's own tokenizer."""
    eval_data_path: str = ""
    """Held-out problem store for in-training accuracy (tools/preprocess_data.py; an answer-only
    store, e.g. --preset aime, will do). Empty: none with --data-path; the synthetic task uses its
    own held-out split."""
    eval_size: int = 0
    """Held-out problems evaluated during training: the first N of --eval-data-path (or of the
    synthetic task's held-out split); 0 = all of them."""
    synthetic_vocab_size: int = 512
    """Synthetic task: sentencepiece vocabulary size (512: template words become single tokens)."""
    synthetic_train_size: int = 20000
    """Synthetic task: training problems."""
    synthetic_eval_size: int = 200
    """Synthetic task: size of its generated held-out split (--eval-size chooses how many are
    evaluated)."""
    synthetic_val_size: int = 0
    """Synthetic task: size of a validation split, evaluated before and after training beside the
    held-out (test) split; a study makes every choice on it (0 = none)."""
    synthetic_prior_size: int = 0
    """Synthetic task: size of a prior-skill split (known facts only, which the warm start teaches),
    evaluated before and after training: retention (0 = none)."""
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
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(self.synthetic_max_steps >= self.synthetic_min_steps, "synthetic_max_steps",
                self.synthetic_max_steps, f"must be >= synthetic_min_steps={self.synthetic_min_steps}")
        require(self.probe_size >= 0, "probe_size", self.probe_size, "must be >= 0")
        require(self.eval_size >= 0, "eval_size", self.eval_size, "must be >= 0 (0 = all)")
        for name in ("synthetic_val_size", "synthetic_prior_size"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0 (0 = none)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimisation and schedule."""

    atesd_algorithm: str = "atesd"
    """atesd | opsd (fixed alpha = 1) | sft (plain next-token loss on the references) | grpo."""
    train_iters: int = 50
    """Student updates."""
    micro_batch_size: int = 8
    """Prompts per micro-batch per data-parallel rank."""
    global_batch_size: int = 16
    """Prompts per step across data-parallel ranks and micro-batches."""
    micro_batch_tokens: int = 0
    """Token budget per micro-batch (0 = fixed micro-batches of micro_batch_size prompts). Once
    the rollouts exist, distillation moves whole samples between data-parallel replicas so each
    holds about the same [prompt ; response] tokens, and every rank packs its sequences into
    micro-batches of at most this many tokens (first-fit-decreasing, native packer; a longer
    sequence takes a micro-batch of its own); SFT, GRPO and warm start keep fixed micro-batches.
    The loss is a mean of per-sequence means, so neither changes the loss or gradients beyond float
    rounding; they even out the work of heavy-tailed rollout lengths."""
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
    """auto | lean | megatron: the layers of every full-sequence pass: the student's forward and
    backward and the teacher's forward (always the same engine, so their mismatch holds no engine
    difference), probe NLL, teacher score, SFT, GRPO, warm start. lean: the padding-free
    plain-torch path of atesd_mc/model/lean.py when the model is on its allow-list and a rank holds
    all of it (TP = PP = 1), megatron's layers otherwise; megatron: always megatron's layers (TE's
    fused kernels when installed). auto: lean on CPU, where it measured 1.6x faster, megatron on GPU
    until tools/gpu_check.sh has measured both. Megatron's schedule, DDP and optimizer run either
    way (same gradients to float rounding)."""
    eval_samples: int = 4
    """k of the held-out Avg@k (sampled at the rollout temperature); greedy accuracy is separate; 0 = greedy only."""
    eval_max_new_tokens: int = 0
    """Held-out evaluation rollout cap; 0 = generation.max_new_tokens."""
    max_skipped_steps: int = 10
    """Stop with an error after this many consecutive steps skipped for a NaN/Inf loss or gradient."""
    inject_nan_steps: list[int] = field(default_factory=list)
    """Testing hook: make the loss NaN at these steps (1-based)."""
    inject_fault_at: str = ""
    """Testing hook: "RANK:STEP" makes that rank raise at that step."""

    def __post_init__(self) -> None:
        require_one_of("atesd_algorithm", self.atesd_algorithm, ("atesd", "opsd", "sft", "grpo"))
        require_one_of("train_engine", self.train_engine, ("auto", "lean", "megatron"))
        for name in ("train_iters", "micro_batch_size", "global_batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
                self.global_batch_size, f"must be a multiple of micro_batch_size={self.micro_batch_size}")
        require(self.micro_batch_tokens >= 0, "micro_batch_tokens", self.micro_batch_tokens, "must be >= 0")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        for name in ("lr_warmup_iters", "warm_start_iters", "eval_interval", "warm_start_batch_size"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.clip_grad >= 0, "clip_grad", self.clip_grad, "must be >= 0")
        require(0 < self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "must be in (0, 1)")
        require(0 <= self.warm_start_teacher_fraction <= 1, "warm_start_teacher_fraction",
                self.warm_start_teacher_fraction, "must be in [0, 1]")
        require(self.eval_max_new_tokens >= 0, "eval_max_new_tokens", self.eval_max_new_tokens,
                "must be >= 0")
        require(self.eval_samples >= 0, "eval_samples", self.eval_samples, "must be >= 0 (0: greedy only)")
        require(self.max_skipped_steps >= 1, "max_skipped_steps", self.max_skipped_steps, "must be >= 1")


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
        require(self.save_interval >= 0, "save_interval", self.save_interval, "must be >= 0")
        require(self.exit_duration_in_mins >= 0, "exit_duration_in_mins", self.exit_duration_in_mins,
                "must be >= 0")
        require(self.exit_interval >= 0, "exit_interval", self.exit_interval, "must be >= 0")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """What the run prints and writes."""

    log_interval: int = 1
    """Print the Megatron log line every N steps."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    progress_bar: bool = True
    """Show the training progress bar when stdout is a terminal, and each held-out evaluation's
    progress (problems done, tokens/s, ETA) on stderr: redrawn on a terminal, plain lines in logs."""

    def __post_init__(self) -> None:
        require(self.log_interval >= 1, "log_interval", self.log_interval, "must be >= 1")
