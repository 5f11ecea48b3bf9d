"""Rollout forward for one model-parallel rank (TP = PP = 1): the GPTModel's own weights, plain torch.

Why: a decode step of the tiny default model is ~0.3 MFLOP per row, but a step through megatron's
TransformerLayer / Attention / inference-context code costs ~5 ms of Python per call on CPU (and
launches dozens of small kernels on GPU). Rollouts were 57% of a CPU training step. This module runs
the same Qwen3 math (RMSNorm, fused QKV in megatron's per-group layout, QK-norm, RoPE from the
model's own rotary module, GQA causal attention, SwiGLU, tied or untied output) on the model's
parameters with a KV cache of plain tensors: about 3x fewer Python calls per layer.

Forward hooks on the linear modules (LoRA adapters, see model/lora.py) are honoured, so a LoRA
student and the lora_off teacher decode as in megatron. Anything else falls back to megatron's
path (see `supports`); tests compare logits and tokens with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm_weight(norm_module, fused_linear) -> torch.Tensor:
    """RMSNorm weight of the local spec (a torch norm) or of TE's fused norm+linear."""
    weight = getattr(norm_module, "weight", None)
    if weight is not None:
        return weight
    return fused_linear.layer_norm_weight


def supports(model) -> bool:
    """True when `model` (unwrapped GPTModel) is a whole Qwen3-shaped model on one rank."""
    from megatron.core import parallel_state as ps

    cfg = model.config
    if (ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1
            or ps.get_context_parallel_world_size() != 1):
        return False
    if not (model.pre_process and model.post_process) or model.position_embedding_type != "rope":
        return False
    if (cfg.normalization != "RMSNorm" or not cfg.gated_linear_unit or cfg.add_bias_linear
            or cfg.add_qkv_bias or not cfg.qk_layernorm or cfg.num_moe_experts
            or cfg.multi_latent_attention or getattr(cfg, "attention_output_gate", False)):
        return False
    if (getattr(cfg, "softmax_scale", None) is not None or getattr(cfg, "window_size", None) is not None
            or getattr(cfg, "apply_query_key_layer_scaling", False)):
        return False
    rope = model.rotary_pos_emb  # rotary over the whole head (rotary_percent 1), not interleaved
    return (getattr(rope, "rotary_interleaved", False) is False and 2 * rope.inv_freq.numel() == cfg.kv_channels
            and cfg.activation_func is F.silu)


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T plus whatever the module's forward hooks add (LoRA)."""
    y = x @ module.weight.t()
    for hook in module._forward_hooks.values():
        out = hook(module, (x,), (y, None))
        if out is not None:
            y = out[0]
    return y


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved rotary: t * cos + rotate_half(t) * sin; t [b, heads, s, d]."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


class LeanDecoder:
    """KV-cached forward of an unwrapped GPTModel for `batch` rows and `total` positions."""

    def __init__(self, model, batch: int, total: int, *, cache: bool = True):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.eps = cfg.layernorm_epsilon
        self.heads, self.groups, self.head_dim = (cfg.num_attention_heads, cfg.num_query_groups,
                                                  cfg.kv_channels)
        dev, dtype = model.embedding.word_embeddings.weight.device, cfg.params_dtype
        shape = (len(model.decoder.layers), batch, self.groups, total, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=dev) if cache else None
        self.v_cache = torch.zeros(shape, dtype=dtype, device=dev) if cache else None
        freqs = model.rotary_pos_emb(total).reshape(total, -1)  # [total, head_dim], the model's own
        self.cos, self.sin = freqs.cos().to(dtype), freqs.sin().to(dtype)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [b, V_padded] of the last position after feeding tokens [b, s] at start.."""
        model = self.model
        weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                  else model.output_layer.weight)
        return self.hidden(tokens, start)[:, -1] @ weight.t()

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Final-norm hidden states [b, s, h] of tokens [b, s] fed at positions start.."""
        model = self.model
        b, s = tokens.shape
        x = model.embedding.word_embeddings(tokens)  # [b, s, h]
        cos, sin = self.cos[start:start + s], self.sin[start:start + s]
        for i, layer in enumerate(model.decoder.layers):
            x = x + self._attention(i, layer, x, start, cos, sin)
            mlp = layer.mlp
            h = _rms(x, _norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1), self.eps)
            gate, up = _linear(mlp.linear_fc1, h).chunk(2, dim=-1)
            x = x + _linear(mlp.linear_fc2, F.silu(gate) * up)
        return model.decoder.final_layernorm(x)

    def _attention(self, i: int, layer, x, start: int, cos, sin) -> torch.Tensor:
        attn = layer.self_attention
        b, s, _ = x.shape
        g, d = self.groups, self.head_dim
        per_group = self.heads // g
        h = _rms(x, _norm_weight(layer.input_layernorm, attn.linear_qkv), self.eps)
        # megatron's fused QKV rows: per query group [q_1 .. q_{heads/groups} | k | v]
        qkv = _linear(attn.linear_qkv, h).view(b, s, g, (per_group + 2) * d)
        q, k, v = qkv.split([per_group * d, d, d], dim=-1)
        q = _rms(q.reshape(b, s, self.heads, d), attn.q_layernorm.weight, self.eps)
        k = _rms(k, attn.k_layernorm.weight, self.eps)
        q = _rope(q.transpose(1, 2), cos, sin)  # [b, heads, s, d]
        k = _rope(k.transpose(1, 2), cos, sin)  # [b, groups, s, d]
        end = start + s
        if self.k_cache is None:  # one whole-sequence pass: attend to this chunk only
            keys, values = k, v.transpose(1, 2)
        else:
            self.k_cache[i, :, :, start:end] = k
            self.v_cache[i, :, :, start:end] = v.transpose(1, 2)
            keys, values = self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end]
        mask, causal = None, False
        if s > 1 and keys.shape[2] == s:
            causal = True  # the chunk attends to itself only: SDPA's fused causal kernel
        elif s > 1:
            mask = torch.ones(s, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        # (s == 1: one new position sees every cached one)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=g != self.heads)
        return _linear(attn.linear_proj, out.transpose(1, 2).reshape(b, s, self.heads * d))


def full_hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    """Forward-only final-norm hidden states [s, b, h] of right-padded tokens [b, s], the layout
    megatron's forward_hidden returns (causal attention keeps padding out of real positions)."""
    from atesd_mc.model.qwen3 import unwrap

    inner = unwrap(model)
    return LeanDecoder(inner, *tokens.shape, cache=False).hidden(tokens, 0).transpose(0, 1).contiguous()
