"""Which tensors a Qwen3 ModelConfig implies, by name and shape, on both sides of the conversion:
the HF checkpoint's tensors and one (tp, pp) rank's megatron tensors. No tensor data is touched,
so a checkpoint can be checked from its headers before anything is read or any collective runs.

How the tensors are sliced and joined between the two layouts is in atesd_mc.convert."""
from __future__ import annotations

from typing import Iterable

from atesd_mc.config import ModelConfig
from atesd_mc.hf_files import ConversionError, summarize_names
from atesd_mc.model.qwen3 import padded_vocab_size

# megatron names the same weights differently by layer spec: the local spec has standalone norm
# modules, transformer-engine's fuses the norms into the following linears ("te").
NAME_SETS = ("local", "te")


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, in checkpoint order, with its shape."""
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    f, v = cfg.ffn_hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * hd, h),
            p + "self_attn.k_proj.weight": (ng * hd, h),
            p + "self_attn.v_proj.weight": (ng * hd, h),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "self_attn.o_proj.weight": (h, nh * hd),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    out["model.norm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = (v, h)
    return out


def check_hf_names(names: Iterable[str], cfg: ModelConfig, source: str = "the HF checkpoint") -> None:
    """Missing or unexpected tensors -> ConversionError (a tied model's lm_head copy and rotary
    inv_freq buffers of old checkpoints are tolerated)."""
    have = set(names)
    want = hf_shapes(cfg)
    missing = [n for n in want if n not in have]
    if missing:
        raise ConversionError(f"{source}: {len(missing)} tensor(s) the config implies are missing: "
                              f"{summarize_names(missing)}")
    tolerated = {"lm_head.weight"} if not cfg.untie_embeddings_and_output_weights else set()
    extra = sorted(n for n in have - set(want) - tolerated if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConversionError(f"{source}: {len(extra)} unexpected tensor(s) for a Qwen3 model with "
                              f"this config.json: {summarize_names(extra)}")


def check_hf_checkpoint(reader, cfg: ModelConfig) -> None:
    """Names and shapes of the whole checkpoint against the config, from headers only: every rank
    runs it before any collective, so a bad checkpoint fails everywhere instead of hanging."""
    check_hf_names(reader.keys(), cfg, source=reader.dir)
    for name, want in hf_shapes(cfg).items():
        have = reader.shape(name)
        if have != want:
            raise ConversionError(f"{reader.dir}: tensor {name} has shape {have} but config.json "
                                  f"implies {want}")


def megatron_layer_names(names: str = "local") -> dict[str, str]:
    """Layer-relative megatron parameter names of the given spec, by role."""
    if names not in NAME_SETS:
        raise ValueError(f"names={names!r}: must be one of {', '.join(NAME_SETS)}")
    te = names == "te"
    return {
        "input_norm": "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
        "qkv": "self_attention.linear_qkv.weight",
        "q_norm": "self_attention.q_layernorm.weight",
        "k_norm": "self_attention.k_layernorm.weight",
        "proj": "self_attention.linear_proj.weight",
        "mlp_norm": "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }


def detect_names(keys: Iterable[str]) -> str:
    """'te' when the model's state-dict keys carry fused layer-norm weights, else 'local'."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "local"


def check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    """ConversionError unless TP splits whole query groups, heads and FFN rows, and PP whole
    layers: the slicing in atesd_mc.convert assumes both."""
    for what, n in (("num_query_groups", cfg.num_query_groups),
                    ("num_attention_heads", cfg.num_attention_heads),
                    ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ConversionError(f"{what}={n} is not divisible by tensor_model_parallel_size={tp}")
    if cfg.num_layers % pp:
        raise ConversionError(f"num_layers={cfg.num_layers} is not divisible by "
                              f"pipeline_model_parallel_size={pp}")


def resolve_padded_vocab(cfg: ModelConfig, tp: int, padded_vocab: int | None) -> int:
    """The embedding's row count: `padded_vocab` when given (read off a built model), else the
    size the model builder pads the vocab to, so both sides agree on the zero rows."""
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    if padded_vocab < cfg.vocab_size or padded_vocab % tp:
        raise ConversionError(f"padded vocab {padded_vocab} must be >= vocab_size={cfg.vocab_size} "
                              f"and divisible by tensor_model_parallel_size={tp}")
    return padded_vocab


def megatron_shard_shapes(cfg: ModelConfig, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                          padded_vocab: int | None = None, *, names: str = "local"
                          ) -> dict[str, tuple[int, ...]]:
    """Shapes of one rank's megatron tensors (every TP rank of a stage has the same shapes)."""
    check_layout(cfg, tp, pp)
    vpad = resolve_padded_vocab(cfg, tp, padded_vocab)
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    f = cfg.ffn_hidden_size
    role = megatron_layer_names(names)
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: dict[str, tuple[int, ...]] = {}
    if first:
        out["embedding.word_embeddings.weight"] = (vpad // tp, h)
    for local in range(cfg.num_layers // pp):
        p = f"decoder.layers.{local}."
        out.update({p + role["input_norm"]: (h,), p + role["qkv"]: ((nh + 2 * ng) * hd // tp, h),
                    p + role["q_norm"]: (hd,), p + role["k_norm"]: (hd,),
                    p + role["proj"]: (h, nh * hd // tp), p + role["mlp_norm"]: (h,),
                    p + role["fc1"]: (2 * f // tp, h), p + role["fc2"]: (h, f // tp)})
    if last:
        out["decoder.final_layernorm.weight"] = (h,)
        # with PP > 1 the last stage holds its own copy of a tied embedding as output_layer
        if cfg.untie_embeddings_and_output_weights or pp > 1:
            out["output_layer.weight"] = (vpad // tp, h)
    return out
