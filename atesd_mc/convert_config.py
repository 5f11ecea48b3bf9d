"""Hugging Face Qwen3 config.json <-> our ModelConfig (no tensors, no files).

Only what the megatron model implements is accepted: a config asking for attention biases, rope
scaling, sliding-window attention or quantized weights is refused with a ConversionError rather
than converted into a model that would compute something else. The tensor names and shapes a
config implies live in atesd_mc.convert_layout; moving the tensors, in atesd_mc.convert."""
from __future__ import annotations

from typing import Any

from atesd_mc.config import ConfigError, ModelConfig
from atesd_mc.hf_files import ConversionError

HF_ARCHITECTURE = "Qwen3ForCausalLM"
HF_MODEL_TYPE = "qwen3"
_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp32"}  # fp16 widens losslessly


def _field(config: dict, name: str, source: str) -> Any:
    if name not in config or config[name] is None:
        raise ConversionError(f"{source}: required field {name!r} is missing")
    return config[name]


def _rope_theta(config: dict, source: str) -> float:
    """v5 ``rope_parameters.rope_theta`` or v4 ``rope_theta``; only the default rope type."""
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConversionError(f"{source}: rope_parameters={params!r} must be a mapping")
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]  # per-layer-type form
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ConversionError(f"{source}: rope_parameters.rope_type={kind!r} is not supported "
                                  "(only 'default' RoPE; no rope scaling)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"{source}: rope_parameters.partial_rotary_factor="
                                  f"{params['partial_rotary_factor']!r} is not supported (only 1.0)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    scaling = config.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise ConversionError(f"{source}: rope_scaling={scaling!r} is not supported "
                                  "(must be null: no rope scaling)")
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    return 10000.0  # transformers' Qwen3Config default


def _refuse_unsupported(config: dict, source: str) -> None:
    """ConversionError for another architecture or a feature the megatron model lacks."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if archs and HF_ARCHITECTURE not in archs:
        raise ConversionError(f"{source}: architectures={archs!r} is not supported; this converter "
                              f"handles {HF_ARCHITECTURE} (model_type {HF_MODEL_TYPE!r}) only")
    if model_type != HF_MODEL_TYPE:
        raise ConversionError(f"{source}: model_type={model_type!r} is not supported; this converter "
                              f"handles model_type {HF_MODEL_TYPE!r} ({HF_ARCHITECTURE}) only")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act={config['hidden_act']!r} is not supported (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{source}: {flag}={config[flag]!r} is not supported (no biases)")
    if config.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window={config['use_sliding_window']!r} is not "
                              "supported (full attention only)")
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ConversionError(f"{source}: layer_types={sorted(set(layer_types))!r} is not supported "
                              "(full_attention only)")
    if config.get("quantization_config"):
        raise ConversionError(f"{source}: quantization_config is set; quantized weights are not "
                              "supported")


def model_config_from_hf(config: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """Our ModelConfig for a HF Qwen3ForCausalLM config.json dict (v4 or v5 layout).

    Refuses other architectures and features the megatron model does not implement (attention
    bias, rope scaling, sliding-window attention, quantized weights). `overrides` go to
    ModelConfig (e.g. params_dtype, seq_length)."""
    _refuse_unsupported(config, source)
    heads = int(_field(config, "num_attention_heads", source))
    dtype = config.get("dtype", config.get("torch_dtype"))
    kwargs = dict(
        num_layers=int(_field(config, "num_hidden_layers", source)),
        hidden_size=int(_field(config, "hidden_size", source)),
        ffn_hidden_size=int(_field(config, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or 128),  # transformers' Qwen3Config default
        vocab_size=int(_field(config, "vocab_size", source)),
        seq_length=int(config.get("max_position_embeddings") or 32768),
        rotary_base=_rope_theta(config, source),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not bool(config.get("tie_word_embeddings", False)),
        params_dtype=_DTYPES.get(str(dtype), "auto") if dtype is not None else "auto",
    )
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ConfigError as err:
        raise ConversionError(f"{source}: {err}") from None


def hf_config_from_model(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A Qwen3ForCausalLM config.json dict for `cfg`; `base` (the original config.json) keeps its
    other fields (token ids, ...). Writes both rope forms so v4 and v5 readers agree."""
    out = dict(base or {})
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(cfg.params_dtype, out.get("dtype", "float32"))
    out.update({
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.kv_channels,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_length,
        "rms_norm_eps": cfg.norm_epsilon, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "use_sliding_window": False, "sliding_window": None,
    })
    theta = cfg.rotary_base
    if "rope_theta" in out or base is None:
        out["rope_theta"] = theta
    if "rope_parameters" in out or base is None:
        out["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if "layer_types" in out or base is None:
        out["layer_types"] = ["full_attention"] * cfg.num_layers
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    out["dtype"] = dtype
    return out


# our LoRA target -> the HF Qwen3 module it adapts (PEFT's target_modules names)
HF_LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def peft_adapter_config(cfg: ModelConfig, base_model: str | None = None) -> dict:
    """adapter_config.json of the model's LoRA adapters for peft (LoraConfig fields): the same
    rank and alpha, so peft's scale lora_alpha / r is ours; no dropout, no bias, plain LoRA."""
    if not cfg.lora_rank:
        raise ConversionError("the checkpoint has no LoRA adapters (lora_rank 0): nothing to write "
                              "in the PEFT layout")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(HF_LORA_MODULES[t] for t in cfg.lora_targets),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
