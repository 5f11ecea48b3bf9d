"""FLOP and memory-traffic accounting for the Qwen3 decoder as this project runs it.

Conventions (tests/test_flops.py checks them against a hand count and against
torch.utils.flop_counter.FlopCounterMode on the real megatron model):

* Only matrix products count; a multiply-add is 2 FLOPs. Norms, RoPE, SiLU, softmax, sampling and
  the divergence's element-wise work are left out (well under 1% at Qwen3 sizes). Embedding lookups
  are 0.
* Per layer and token (forward): QKV 2·h·(n_q·d + 2·n_kv·d) (GQA: n_kv key/value heads), output
  projection 2·(n_q·d)·h, SwiGLU 3 · 2·h·ffn (gate, up, down). LoRA adds 2·r·(in + out) per adapted
  linear. Output layer: 2·h·V per token that gets logits.
* Attention scores (QKᵀ) and values (PV): 4·n_q·d FLOPs per (query, key) pair per layer, with the
  REAL length of each sequence (padding excluded; for a right-padded [b, s_max] batch pass
  [s_max] * b, which is what that batch executes). GQA does not shrink this term: every query head
  attends. **Default: the full s² pairs** (``causal=False``). That is what megatron's local
  DotProductAttention computes (baddbmm over the whole masked score matrix), what FlopCounterMode
  counts, and what Megatron-LM's ``num_floating_point_operations`` uses for its MFU. ``causal=True``
  counts the s·(s+1)/2 pairs that a causal flash kernel (Transformer Engine, FlashAttention)
  actually computes; use it for TE runs if you want "useful" rather than "Megatron" FLOPs.
* ``vocab`` is the size the output layer multiplies: megatron's logits use the padded vocabulary
  (``padded_vocab_size``); the fused divergence uses the real one (it slices ``weight[:valid]``).
* Training: ``train_flops`` is the usual 3 × forward (forward + backward: data and weight
  gradients of every matrix product). ``backward_flops`` / ``step_flops`` count what the step
  EXECUTES: with LoRA the frozen base weights get no weight gradient (backward ≈ 1 × forward for
  them instead of 2 ×), and the first layer computes no input gradient because the frozen
  embedding needs none. Activation recomputation is never counted (the trainer does not use it).

A step of ATESD (``step_flops``): rollout = KV-cache generation (``decode_flops``); teacher = a
forward of the decoder body over [teacher context ; rollout] (its logits are computed inside the
fused divergence, so they are charged to the student stage); student = body forward + backward over
[prompt ; rollout] plus the fused output-layer divergence on the rollout tokens (student logits,
teacher logits, grad of the hidden states, and grad of the output weight when it trains).

Peak numbers for MFU are dense bf16 tensor-core peaks from NVIDIA's data sheets; CPUs have none,
so ``mfu`` returns None there and callers report TFLOP/s only.
"""
from __future__ import annotations

from typing import Sequence

from atesd_mc.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets. Matched as a
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,   # SXM5 ("NVIDIA H100 80GB HBM3")
    "H200": 989.0,   # same compute as H100 SXM, more and faster memory
    "A100": 312.0,
}

# HBM bandwidth, bytes/s (data sheets), same matching rule.
HBM_BYTES_PER_S: dict[str, float] = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # SXM5
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,  # 40 GB parts
}

QKV_TARGETS = ("q", "k", "v")


def device_name(device=None) -> str:
    """The accelerator's name (what the peak tables are keyed on), or "CPU <model> (<n> threads)"."""
    import platform

    import torch

    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def _lookup(table: dict[str, float], device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in table.items():  # insertion order: most specific key first
        if key.lower() in device_name.lower():
            return value
    return None


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the named device, or None (CPU, unknown GPU)."""
    return _lookup(PEAK_TFLOPS, device_name)


def hbm_bandwidth(device_name: str | None) -> float | None:
    """HBM bytes/s of the named device, or None."""
    return _lookup(HBM_BYTES_PER_S, device_name)


def mfu(flops: float, seconds: float, device_name: str | None, n_gpus: int = 1) -> float | None:
    """Model FLOPs utilisation: flops / seconds / n_gpus over the device's bf16 peak (None when the
    device has no peak in PEAK_TFLOPS, e.g. a CPU: report TFLOP/s only)."""
    peak = peak_tflops(device_name)
    if peak is None or seconds <= 0 or n_gpus <= 0:
        return None
    return flops / seconds / n_gpus / (peak * 1e12)


# ---------------------------------------------------------------------------------------------
# Shapes


def _dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """(hidden, ffn, query width n_q·d, key/value width n_kv·d)."""
    return (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads * cfg.kv_channels,
            cfg.num_query_groups * cfg.kv_channels)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each of a layer's projections, by LoRA target name."""
    h, f, q, kv = _dims(cfg)
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, f), "up": (h, f),
            "down": (f, h)}


def param_count(cfg: ModelConfig, vocab: int, *, lora: bool = True) -> int:
    """Parameters of the whole model: embedding, layers (QK-norm and both RMSNorms included), final
    norm, output layer when untied, and LoRA adapters when cfg.lora_rank > 0 and `lora`."""
    h, _, _, _ = _dims(cfg)
    per_layer = sum(i * o for i, o in linear_shapes(cfg).values()) + 2 * h + 2 * cfg.kv_channels
    total = vocab * h + cfg.num_layers * per_layer + h
    if cfg.untie_embeddings_and_output_weights:
        total += vocab * h
    if lora:
        total += lora_param_count(cfg)
    return total


def lora_param_count(cfg: ModelConfig) -> int:
    if not cfg.lora_rank:
        return 0
    shapes = linear_shapes(cfg)
    return cfg.num_layers * sum(cfg.lora_rank * (shapes[t][0] + shapes[t][1]) for t in cfg.lora_targets)


# ---------------------------------------------------------------------------------------------
# Forward pieces


def linear_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one layer's base weight matmuls for one token."""
    return float(sum(2 * i * o for i, o in linear_shapes(cfg).values()))


def lora_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one layer's LoRA adapters for one token (x A^T then (.) B^T)."""
    if not cfg.lora_rank:
        return 0.0
    shapes = linear_shapes(cfg)
    return float(sum(2 * cfg.lora_rank * (shapes[t][0] + shapes[t][1]) for t in cfg.lora_targets))


def attention_pairs(seq_len: int, causal: bool = False) -> float:
    """(query, key) pairs of one sequence: s² (full, default) or s(s+1)/2 (causal)."""
    return seq_len * (seq_len + 1) / 2 if causal else float(seq_len) ** 2


def attention_flops(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Forward FLOPs of one layer's QK^T and PV for one sequence."""
    return 4.0 * cfg.num_attention_heads * cfg.kv_channels * attention_pairs(seq_len, causal)


def forward_flops(cfg: ModelConfig, vocab: int, seq_lens: Sequence[int], *,
                  logit_tokens: int | None = None, lora: bool = True, causal: bool = False) -> float:
    """Forward FLOPs of the model over independent sequences (unpadded lengths, summed).

    logit_tokens: tokens that go through the output layer (None: every token; 0: the decoder body
    only, as forward_hidden). lora: count the adapters when cfg.lora_rank > 0 (False: base weights,
    e.g. the lora_off teacher)."""
    tokens = sum(seq_lens)
    per_token = linear_flops_per_token(cfg) + (lora_flops_per_token(cfg) if lora else 0.0)
    body = cfg.num_layers * (tokens * per_token + sum(attention_flops(cfg, s, causal) for s in seq_lens))
    n_logits = tokens if logit_tokens is None else logit_tokens
    return body + 2.0 * cfg.hidden_size * vocab * n_logits


def train_flops(cfg: ModelConfig, vocab: int, seq_lens: Sequence[int], *, causal: bool = False) -> float:
    """Forward + backward = 3 × forward (the Megatron / PaLM model-FLOPs convention)."""
    return 3.0 * forward_flops(cfg, vocab, seq_lens, causal=causal)


def backward_flops(cfg: ModelConfig, vocab: int, seq_lens: Sequence[int], *,
                   logit_tokens: int | None = None, trainable: str = "auto",
                   causal: bool = False) -> float:
    """Backward FLOPs the step executes.

    trainable="full": every weight trains -> 2 × forward (data + weight gradient of every matmul).
    trainable="lora" (auto when cfg.lora_rank > 0): base weights and embeddings are frozen. Base
    linears and the output layer compute only the data gradient (1 × forward), adapters and
    attention 2 × forward; in the first layer the QKV input needs no gradient (the frozen embedding
    does not ask for one), which saves the base QKV data gradient and the q/k/v adapters' input
    gradient. (This assumes q, k or v is adapted, as in the default targets; with none of them the
    first layer's attention backward would be skipped too, which this does not model.)"""
    if trainable == "auto":
        trainable = "lora" if cfg.lora_rank else "full"
    if trainable == "full":
        return 2.0 * forward_flops(cfg, vocab, seq_lens, logit_tokens=logit_tokens, lora=True, causal=causal)
    if trainable != "lora":
        raise ValueError(f"trainable must be auto, full or lora, got {trainable!r}")
    h, _, q, kv = _dims(cfg)
    tokens = sum(seq_lens)
    n_logits = tokens if logit_tokens is None else logit_tokens
    per_token = linear_flops_per_token(cfg) + 2.0 * lora_flops_per_token(cfg)
    body = cfg.num_layers * (tokens * per_token + 2.0 * sum(attention_flops(cfg, s, causal) for s in seq_lens))
    first_layer_saved = 2.0 * h * (q + 2 * kv)
    if cfg.lora_rank:
        first_layer_saved += sum(2.0 * cfg.lora_rank * h for t in cfg.lora_targets if t in QKV_TARGETS)
    return body - tokens * first_layer_saved + 2.0 * h * vocab * n_logits


# ---------------------------------------------------------------------------------------------
# Generation, the fused loss and a whole step


def decode_flops(cfg: ModelConfig, vocab: int, prompt_lens: Sequence[int], new_lens: Sequence[int], *,
                 lora: bool = True, causal: bool = False) -> float:
    """KV-cache generation of new_lens[i] tokens after prompt_lens[i] (summed over sequences).

    Per sequence: one prefill forward over the prompt with logits at its last position only
    (megatron's static inference context materialises last-token logits), then one single-token
    step per further new token; the token fed at step j (j = 1 .. n-1) attends to its whole prefix,
    p + j keys, none masked. The last sampled token is never fed back. `causal` applies to the
    prefill's score matrix only. With causal=True the total equals a causal forward over the
    p + n - 1 fed tokens with n logit rows: the cache saves exactly the recomputation.

    This is the per-sequence useful work. atesd_mc.generation.generate runs the batch in lockstep,
    so with unequal prompt lengths it also executes single-token steps for rows still inside their
    prompt and keeps stepping finished rows until the longest row is done."""
    if len(prompt_lens) != len(new_lens):
        raise ValueError("prompt_lens and new_lens differ in length")
    per_token = cfg.num_layers * (linear_flops_per_token(cfg) + (lora_flops_per_token(cfg) if lora else 0.0))
    per_pair = cfg.num_layers * 4.0 * cfg.num_attention_heads * cfg.kv_channels
    total = 0.0
    for p, n in zip(prompt_lens, new_lens):
        if n <= 0:
            continue
        total += forward_flops(cfg, vocab, [p], logit_tokens=1, lora=lora, causal=causal)
        steps = n - 1
        total += steps * (per_token + 2.0 * cfg.hidden_size * vocab)
        total += per_pair * (steps * p + steps * (steps + 1) / 2)
    return total


def fused_loss_flops(cfg: ModelConfig, vocab: int, n_tokens: int, *, weight_grad: bool) -> float:
    """atesd_mc.kernels.fused_linear_divergence_loss on n_tokens rows with a [vocab, h] weight:
    student logits, teacher logits and the hidden-state gradient (2·h·V each per token), plus the
    output-weight gradient when that weight trains (full fine-tuning; not with LoRA)."""
    return (3 + int(weight_grad)) * 2.0 * cfg.hidden_size * vocab * n_tokens


def step_flops(cfg: ModelConfig, vocab: int, prompt_lens: Sequence[int], new_lens: Sequence[int],
               teacher_context_lens: Sequence[int], *, padded_vocab: int | None = None,
               teacher_mode: str | None = None, causal: bool = False) -> dict[str, float]:
    """Executed FLOPs of one ATESD step per stage, for the sequences given (one data-parallel
    replica's batch, or the global batch).

    prompt_lens: student prompts; new_lens: rollout lengths; teacher_context_lens: what precedes the
    rollout in the teacher's input (prefix + revealed reference + answer + transition). vocab: the
    real vocabulary (the fused loss); padded_vocab: megatron's padded size (generation logits).
    teacher_mode: cfg.resolved_teacher_mode by default; adapters run in the teacher only for "live".
    The optimizer step is element-wise work: no matmul FLOPs."""
    padded = padded_vocab or vocab
    mode = teacher_mode or cfg.resolved_teacher_mode
    rollout = decode_flops(cfg, padded, prompt_lens, new_lens, causal=causal)
    teacher_lens = [c + n for c, n in zip(teacher_context_lens, new_lens)]
    teacher = forward_flops(cfg, 0, teacher_lens, logit_tokens=0, lora=mode == "live", causal=causal)
    student_lens = [p + n for p, n in zip(prompt_lens, new_lens)]
    body = forward_flops(cfg, 0, student_lens, logit_tokens=0, causal=causal) + \
        backward_flops(cfg, 0, student_lens, logit_tokens=0, causal=causal)
    loss = fused_loss_flops(cfg, vocab, sum(new_lens), weight_grad=not cfg.lora_rank)
    return {"rollout": rollout, "teacher": teacher, "student": body + loss}


# ---------------------------------------------------------------------------------------------
# Decode: memory-bandwidth bound


def decode_step_bytes(cfg: ModelConfig, vocab: int, batch: int, ctx_len: int, bytes_per_param: float,
                      kv_bytes: float | None = None, *, lora: bool = True) -> float:
    """HBM bytes one single-token decode step must read at least: every weight once (the input
    embedding table only when tied, since it is then the output layer; untied, the lookup reads
    `batch` rows, neglected) plus the cached keys and values of `ctx_len` positions per sequence
    (n_kv heads: GQA caches the groups, not the query heads)."""
    weights = param_count(cfg, vocab, lora=lora)
    if cfg.untie_embeddings_and_output_weights:
        weights -= vocab * cfg.hidden_size
    kv = batch * cfg.num_layers * 2 * cfg.num_query_groups * cfg.kv_channels * ctx_len
    return weights * bytes_per_param + kv * (bytes_per_param if kv_bytes is None else kv_bytes)


def decode_bandwidth_bound(cfg: ModelConfig, vocab: int, batch: int, ctx_len: int, bytes_per_param: float,
                           hbm_bytes_per_s: float, *, kv_bytes: float | None = None, lora: bool = True) -> float:
    """Lower bound on the seconds of one decode step: (weights + KV bytes read) / bandwidth.
    Divide the bytes by the TP size for a TP group (each rank reads its shard)."""
    return decode_step_bytes(cfg, vocab, batch, ctx_len, bytes_per_param, kv_bytes, lora=lora) / hbm_bytes_per_s


def rollout_bandwidth_bound(cfg: ModelConfig, vocab: int, batch: int, prompt_len: int, new_tokens: int,
                            bytes_per_param: float, hbm_bytes_per_s: float, *, lora: bool = True) -> float:
    """Sum of decode_bandwidth_bound over the n-1 single-token steps of a lockstep rollout (the
    prefill is compute-bound and not included)."""
    return sum(decode_bandwidth_bound(cfg, vocab, batch, prompt_len + j, bytes_per_param, hbm_bytes_per_s,
                                      lora=lora) for j in range(1, new_tokens))


__all__ = [
    "PEAK_TFLOPS", "HBM_BYTES_PER_S", "peak_tflops", "hbm_bandwidth", "mfu", "linear_shapes", "param_count",
    "lora_param_count", "linear_flops_per_token", "lora_flops_per_token", "attention_pairs", "attention_flops",
    "forward_flops", "train_flops", "backward_flops", "decode_flops", "fused_loss_flops", "step_flops",
    "decode_step_bytes", "decode_bandwidth_bound", "rollout_bandwidth_bound",
]
