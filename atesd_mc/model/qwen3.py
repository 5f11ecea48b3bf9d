"""Qwen3-architecture decoder on megatron-core's GPTModel.

Qwen3 = RMSNorm (eps 1e-6), SwiGLU, RoPE (base 1e6), QK-norm, GQA, explicit head_dim, no biases,
tied embeddings for 0.6B/1.7B/4B. This module knows nothing of parallel training loops: it maps
our ModelConfig onto a TransformerConfig and a layer spec, and exposes hidden states."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from atesd_mc.config import ModelConfig, ParallelConfig
from atesd_mc.model.spec import qwen3_layer_spec, resolve_impl


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad to a multiple of divisible_by * TP so every shard is equal."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def params_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.params_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.params_dtype]


def transformer_config(cfg: ModelConfig, par: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(cfg)
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        # Full weights are built on CPU then split: the same seed gives the same model at any TP.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Teacher/student sequences differ in length from step to step: tell the PP schedule.
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",  # (dense model; satisfies a check)
        # The fused kernels need apex/TE CUDA code; megatron's defaults are off, keep them so.
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        bias_dropout_fusion=False, cross_entropy_loss_fusion=False,
    )


def build_model(cfg: ModelConfig, par: ParallelConfig, vocab_size: int, *, pre_process: bool = True,
                post_process: bool = True):
    """A GPTModel stage (pre/post_process from its pipeline position) on the current device."""
    from megatron.core.models.gpt import GPTModel

    impl = resolve_impl(cfg.transformer_impl)
    spec = qwen3_layer_spec(impl, sequence_parallel=par.sequence_parallel,
                            unfused_norms=cfg.lora_rank > 0)
    model = GPTModel(
        config=transformer_config(cfg, par), transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by,
                                     par.tensor_model_parallel_size),
        max_sequence_length=cfg.seq_length, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_base=int(cfg.rotary_base), parallel_output=True)
    model.real_vocab_size = vocab_size  # logits past this index are padding
    if model.config.bf16:
        # Megatron's torch norms (the local spec's WrappedTorchNorm) ignore params_dtype and hold
        # fp32 weights, so a bf16 model mixed dtypes: its RMSNorm outputs came out fp32 beside bf16
        # values (attention refused the mix). Float16Module casts the student the same way; doing
        # it here also covers every model never wrapped (the teacher's copy, evaluation). Norm
        # weights start at ones, exact in bf16.
        model.bfloat16()
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_stage(cfg: ModelConfig, par: ParallelConfig, vocab_size: int):
    """The model stage of this rank in the pipeline (megatron parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps

    return build_model(cfg, par, vocab_size, pre_process=ps.is_pipeline_first_stage(),
                       post_process=ps.is_pipeline_last_stage())


def unwrap(model):
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def _hidden_output(model):
    """GPTModel returns the final-norm hidden states instead of logits while active."""
    inner = unwrap(model)
    saved = inner.post_process
    inner.post_process = False
    try:
        yield
    finally:
        inner.post_process = saved


def forward_hidden(model, tokens: torch.Tensor, position_ids: torch.Tensor | None = None):
    """Hidden states after the final norm, [s, b, h] (sequence-parallel: the local s/tp slice).

    On an intermediate pipeline stage this is that stage's output. Right-padded batches need no
    attention mask: causal attention keeps padding from reaching real tokens."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with _hidden_output(model):
        return model(tokens, position_ids, None)


def output_weight(model) -> torch.Tensor:
    """The output layer's local vocab shard [V_local, h] (the embedding when tied)."""
    inner = unwrap(model)
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def local_vocab_range(model, tp_rank: int, tp: int) -> tuple[int, int, int]:
    """(start, end, valid) of this rank's vocab shard; rows past `valid` (local) are padding."""
    inner = unwrap(model)
    v_local = output_weight(model).shape[0]
    start = tp_rank * v_local
    valid = max(0, min(v_local, inner.real_vocab_size - start))
    return start, start + v_local, valid


def tp_input(hidden: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce over TP backward: every vocab shard's partial d(hidden) sums.
    Any product of full hidden states with a vocab shard must go through this."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(hidden)


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Local-shard logits [s, b, V_local] with padded-vocab columns at -inf."""
    from megatron.core import parallel_state as ps

    logits = tp_input(hidden) @ output_weight(model).t()
    _, _, valid = local_vocab_range(model, ps.get_tensor_model_parallel_rank(),
                                    ps.get_tensor_model_parallel_world_size())
    if valid < logits.shape[-1]:
        logits[..., valid:] = float("-inf")
    return logits


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab shards along the last dim (inference, tests)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def full_logits(model, tokens, position_ids=None) -> torch.Tensor:
    """[b, s, V_real] logits gathered over TP (last pipeline stage only)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    hidden = forward_hidden(model, tokens, position_ids)
    if unwrap(model).config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden)
    logits = gather_vocab(logits_from_hidden(model, hidden))
    return logits[..., : unwrap(model).real_vocab_size].transpose(0, 1).contiguous()
