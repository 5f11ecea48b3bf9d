"""Plain-torch forward of a whole-model rank (TP = PP = CP = 1) on the GPTModel's own weights.

Why: megatron's TransformerLayer / Attention / inference-context code costs ~5 ms of Python per
decode step on CPU (dozens of small kernel launches on GPU) for ~0.3 MFLOP of work per row of the
tiny default model, and its local attention needs right-padded [b, s] batches, so a quarter of the
warm start's and the student's GEMM work was padding. This module runs the same Qwen3 math
(RMSNorm, fused QKV in megatron's per-group layout, QK-norm, RoPE from the model's own rotary
module, GQA causal attention, SwiGLU, tied or untied output) with ~3x fewer Python calls per
layer, in two layouts:

* `LeanDecoder`: a KV cache of plain tensors for rollouts (generation.py);
* `packed_selected`: a padding-free stream of all rows of a batch for full-sequence passes, with
  or without autograd (teacher forward, probe NLL, the student's and the warm start's forward +
  backward). GEMMs, norms and the MLP see only real tokens; attention alone runs on right-padded
  rows, gathered and scattered by index (its FLOPs are a few percent of the step here).

LoRA adapters are applied through model/lora.py's public `adapted`, so a LoRA student and the
lora_off teacher run as in megatron. The path runs only on settings it is known to implement
(`unsupported`: an allow-list); anything else runs megatron's layers, and atesd_mc/engine.py logs
why. tests/test_lean_model.py compares logits, gradients and sampled tokens with megatron's path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atesd_mc import distributed
from atesd_mc.model.lora import adapted


def _norm_weight(norm_module, fused_linear) -> torch.Tensor:
    """RMSNorm weight of the local spec (a torch norm) or of TE's fused norm+linear."""
    weight = getattr(norm_module, "weight", None)
    if weight is not None:
        return weight
    return fused_linear.layer_norm_weight


# TransformerConfig fields the lean path implements, with the only values it implements.
REQUIRED = {
    "normalization": "RMSNorm", "gated_linear_unit": True, "activation_func": F.silu,
    "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": True,
    "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
}
# Fields the path reads as they are (shapes, epsilon), or that do not change a whole-model rank's
# forward: dtypes, initialisation, fusion switches (the lean path fuses nothing), hooks that DDP and
# the optimizer install, pipeline-schedule settings. Every other field must keep megatron's default:
# a setting this list does not know (a new megatron option included) sends the model to megatron's
# layers instead of being assumed off.
FREE = {
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "layernorm_epsilon", "init_method_std", "init_method", "output_layer_init_method",
    "embedding_init_method", "perform_initialization", "use_cpu_initialization", "params_dtype",
    "pipeline_dtype", "bf16", "fp16", "autocast_dtype", "variable_seq_lengths", "sequence_parallel",
    "moe_token_dispatcher_type", "gradient_accumulation_fusion", "bias_activation_fusion",
    "masked_softmax_fusion", "persist_layer_norm", "apply_rope_fusion", "bias_dropout_fusion",
    "cross_entropy_loss_fusion", "finalize_model_grads_func", "no_sync_func", "grad_sync_func",
    "param_sync_func", "grad_scale_func", "timers", "barrier_with_L1_time",
    "deallocate_pipeline_outputs", "batch_p2p_comm", "batch_p2p_sync", "overlap_p2p_comm",
    "tp_comm_overlap", "defer_embedding_wgrad_compute", "wgrad_deferral_limit",
}


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors or objects without a plain equality
        return a is b


def _config_difference(cfg) -> str | None:
    """The first field of `cfg` outside the allow-list, as 'name=value', or None."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    for name, value in REQUIRED.items():
        if hasattr(cfg, name) and not _same(getattr(cfg, name), value):
            return f"{name}={getattr(cfg, name)!r}"
    # Megatron's defaults for this shape: __post_init__ derives some fields from the shape ones.
    shape = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                          "num_query_groups", "kv_channels", "ffn_hidden_size")}
    reference = TransformerConfig(**shape)
    for f in dataclasses.fields(cfg):
        if f.name in FREE or f.name in REQUIRED:
            continue
        if not _same(getattr(cfg, f.name), getattr(reference, f.name, None)):
            return f"{f.name}={getattr(cfg, f.name)!r}"
    return None


def unsupported(model) -> str | None:
    """None when `model` (an unwrapped GPTModel stage) is a whole Qwen3-shaped model the lean path
    implements; otherwise the reason, e.g. 'tensor_model_parallel_size=2'."""
    from megatron.core import parallel_state as ps

    for name, size in (("tensor_model_parallel_size", ps.get_tensor_model_parallel_world_size()),
                       ("pipeline_model_parallel_size", ps.get_pipeline_model_parallel_world_size()),
                       ("context_parallel_size", ps.get_context_parallel_world_size())):
        if size != 1:
            return f"{name}={size}"
    if not (model.pre_process and model.post_process):
        return "a pipeline stage, not the whole model"
    if model.position_embedding_type != "rope":
        return f"position_embedding_type={model.position_embedding_type!r}"
    rope = model.rotary_pos_emb  # rotary over the whole head (rotary_percent 1), not interleaved
    if getattr(rope, "rotary_interleaved", False) or 2 * rope.inv_freq.numel() != model.config.kv_channels:
        return "interleaved or partial rotary embedding"
    return _config_difference(model.config)


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T plus the module's LoRA adapters, when it has any."""
    return adapted(module, x, x @ module.weight.t())


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rope(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved rotary t * cos + rotate_half(t) * sin, where rotate_half(t) =
    [-t2, t1] = roll(t, d/2) * [-1, 1]: the sign lives in signed_sin (one op instead of four)."""
    return t * cos + t.roll(t.shape[-1] // 2, -1) * signed_sin


def _rope_tables(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [length, 1, 1, head_dim] of the model's own rotary module."""
    freqs = model.rotary_pos_emb(length).reshape(length, 1, 1, -1)
    half = freqs.shape[-1] // 2
    sin = freqs.sin()
    dtype = model.embedding.word_embeddings.weight.dtype  # the dtype q and k are computed in
    return freqs.cos().to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), -1).to(dtype)


def _stack(model, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
    """Every decoder layer and the final norm on x [b, s, h] at rotary tables [s, 1, 1, d].

    attend(layer_index, q [b, s, heads, d], k, v [b, s, groups, d]) -> [b, s, heads * d]."""
    with distributed.plain_torch():  # plain torch ops only: no CPU-shim dispatch per op
        for i, layer in enumerate(model.decoder.layers):
            x = x + _attention(layer.self_attention, layer.input_layernorm, x, cos, sin,
                               lambda q, k, v: attend(i, q, k, v))
            mlp = layer.mlp
            h = _rms(x, _norm_weight(layer.pre_mlp_layernorm, mlp.linear_fc1), model.config.layernorm_epsilon)
            gate, up = _linear(mlp.linear_fc1, h).chunk(2, dim=-1)
            x = x + _linear(mlp.linear_fc2, F.silu(gate) * up)
        return model.decoder.final_layernorm(x)


def _attention(attn, norm, x, cos, sin, attend) -> torch.Tensor:
    cfg = attn.config
    eps, heads, groups, d = cfg.layernorm_epsilon, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    per = heads // groups
    b, s, _ = x.shape
    h = _rms(x, _norm_weight(norm, attn.linear_qkv), eps)
    # megatron's fused QKV rows: per query group [q_1 .. q_per | k | v]; the group's q heads and
    # its k head are adjacent, so QK-norm and RoPE run once over all of them.
    qkv = _linear(attn.linear_qkv, h).view(b, s, groups, per + 2, d)
    qk_weight = torch.cat((attn.q_layernorm.weight.expand(per, d), attn.k_layernorm.weight[None]))
    # Normalise and scale in fp32 and round once to the model's dtype, as torch's RMSNorm (megatron's
    # local q/k_layernorm) does; scaling a rounded bf16 norm would round twice. No-ops in fp32.
    normed = F.rms_norm(qkv[..., :per + 1, :].float(), (d,), None, eps) * qk_weight
    qk = _rope(normed.to(qkv.dtype), cos, sin)
    q, k, v = qk[..., :per, :].reshape(b, s, heads, d), qk[..., per, :], qkv[..., per + 1, :]
    return _linear(attn.linear_proj, attend(q, k, v))


class LeanDecoder:
    """KV-cached forward of an unwrapped GPTModel for `batch` rows and `total` positions."""

    def __init__(self, model, batch: int, total: int):
        cfg = model.config
        self.model = model
        weight = model.embedding.word_embeddings.weight
        dev, dtype = weight.device, weight.dtype
        shape = (len(model.decoder.layers), batch, cfg.num_query_groups, total, cfg.kv_channels)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
        self.cos, self.sin = _rope_tables(model, total)
        self.gqa = cfg.num_query_groups != cfg.num_attention_heads

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
        s = tokens.shape[1]
        end = start + s

        def attend(i, q, k, v):
            self.k_cache[i, :, :, start:end] = k.transpose(1, 2)
            self.v_cache[i, :, :, start:end] = v.transpose(1, 2)
            keys, values = self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end]
            mask = None  # s == 1: one new position sees every cached one
            if s > 1 and start > 0:
                mask = torch.ones(s, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 is_causal=s > 1 and start == 0, enable_gqa=self.gqa)
            return out.transpose(1, 2).flatten(2)

        x = self.model.embedding.word_embeddings(tokens)
        return _stack(self.model, x, self.cos[start:end], self.sin[start:end], attend)


class PackedRows:
    """Right-padded rows [b, width] of real lengths `lengths`, seen as one stream of T tokens."""

    def __init__(self, lengths: torch.Tensor, width: int, device):
        # The total is read before the move: SideBatch keeps lengths on the CPU, so no device sync.
        self.b, self.width, self.total = len(lengths), width, int(lengths.sum())
        lengths = lengths.to(device=device, dtype=torch.long)
        self.starts = torch.cumsum(lengths, 0) - lengths  # [b] first stream index of each row
        row = torch.repeat_interleave(torch.arange(self.b, device=device), lengths)
        self.positions = torch.arange(self.total, device=device) - self.starts[row]  # [T]
        self.flat = row * width + self.positions  # [T] index into the row-major [b * width]

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[1, T, n, d] -> [b, n, width, d], zeros after each row's end."""
        n, d = t.shape[2], t.shape[3]
        out = t.new_zeros(self.b * self.width, n * d).index_copy(0, self.flat, t.reshape(self.total, n * d))
        return out.view(self.b, self.width, n, d).transpose(1, 2)

    def attend(self, i: int, q, k, v) -> torch.Tensor:
        # Causal attention inside each row; padding sits after the real tokens, so no row sees it.
        out = F.scaled_dot_product_attention(self.pad(q), self.pad(k), self.pad(v), is_causal=True,
                                             enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2).reshape(self.b * self.width, -1).index_select(0, self.flat)[None]


def packed_selected(model, tokens: torch.Tensor, lengths: torch.Tensor,
                    predict_index: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [R, h] that predict the response tokens of right-padded `tokens`
    [b, s] with real `lengths` [b]; predict_index [R] indexes megatron's [s, b] layout (s-major),
    as in schedule.selected_hidden. Differentiable. A Float16Module in the wrapper chain upcasts
    to float32, as it does megatron's last-stage output."""
    from megatron.core.transformer.module import Float16Module

    inner, upcast = model, False
    while hasattr(inner, "module"):  # DDP / Float16Module wrappers
        upcast = upcast or isinstance(inner, Float16Module)
        inner = inner.module
    b, s = tokens.shape
    rows = PackedRows(lengths, s, tokens.device)
    x = inner.embedding.word_embeddings(tokens.reshape(-1).index_select(0, rows.flat))[None]
    cos, sin = _rope_tables(inner, s)
    hidden = _stack(inner, x, cos[rows.positions], sin[rows.positions], rows.attend)[0]  # [T, h]
    index = rows.starts[predict_index % b] + torch.div(predict_index, b, rounding_mode="floor")
    selected = hidden.index_select(0, index)
    return selected.float() if upcast else selected
