"""Config sections of the model itself and how it is laid out over ranks: ModelConfig, ParallelConfig.

Re-exported by atesd_mc.config; field docstrings are the --flag help (atesd_mc.config_io.field_docs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from atesd_mc.config_check import require, require_one_of


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
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (on CPU too: bf16 weights and activations,
    fp32 master weights in the optimizer, as on GPU)."""
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
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(self.vocab_size >= 0, "vocab_size", self.vocab_size, "must be >= 0")
        require(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
                self.num_query_groups, f"must divide num_attention_heads={self.num_attention_heads}")
        require_one_of("params_dtype", self.params_dtype, ("auto", "fp32", "bf16"))
        require_one_of("transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        require_one_of("teacher_mode", self.teacher_mode, ("auto", "lora_off", "frozen_copy", "ema", "live"))
        require(self.lora_rank >= 0, "lora_rank", self.lora_rank, "must be >= 0")
        bad = sorted(set(self.lora_targets) - {"q", "k", "v", "o", "gate", "up", "down"})
        require(not bad, "lora_targets", self.lora_targets, f"unknown targets {bad}")
        require(not (self.teacher_mode == "lora_off" and self.lora_rank == 0), "teacher_mode",
                self.teacher_mode, "lora_off needs lora_rank > 0")
        require(0.0 < self.teacher_ema_decay < 1.0, "teacher_ema_decay", self.teacher_ema_decay,
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
        require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size",
                self.tensor_model_parallel_size, "must be >= 1")
        require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size",
                self.pipeline_model_parallel_size, "must be >= 1")
        require(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
                "sequence_parallel", self.sequence_parallel, "needs tensor_model_parallel_size > 1")
        require_one_of("distributed_backend", self.distributed_backend, ("auto", "nccl", "gloo"))
        require(self.distributed_timeout_minutes > 0, "distributed_timeout_minutes",
                self.distributed_timeout_minutes, "must be > 0")
