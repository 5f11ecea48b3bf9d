"""Hugging Face Qwen3 <-> megatron-core tensor mapping (no I/O policy, no process groups).

Mapping (HF name -> megatron name, per layer ``L``, local layer index ``l`` on its pipeline stage):

* ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight``: zero rows pad the vocab to
  the padded size, then rows split over TP. With tied embeddings and PP > 1 the last stage also
  holds the same shard as ``output_layer.weight``.
* ``lm_head.weight`` (untied only) -> ``output_layer.weight`` (last stage), padded and split the same.
* ``model.norm.weight`` -> ``decoder.final_layernorm.weight`` (last stage).
* ``q_proj``/``k_proj``/``v_proj`` -> ``self_attention.linear_qkv.weight``: per query group ``g`` the
  rows are ``[q heads of g; k_g; v_g]``; TP splits along whole groups.
* ``o_proj`` -> ``self_attention.linear_proj.weight`` (columns split over TP).
* ``gate_proj``/``up_proj`` -> ``mlp.linear_fc1.weight`` = ``[gate_r; up_r]`` per TP rank r.
* ``down_proj`` -> ``mlp.linear_fc2.weight`` (columns split over TP).
* ``q_norm``/``k_norm`` -> ``self_attention.q_layernorm.weight``/``k_layernorm.weight``.
* ``input_layernorm``/``post_attention_layernorm`` -> ``input_layernorm.weight``/
  ``pre_mlp_layernorm.weight`` (local spec) or ``self_attention.linear_qkv.layer_norm_weight``/
  ``mlp.linear_fc1.layer_norm_weight`` (transformer-engine spec, norms fused into the linears).

Both directions stream: :func:`iter_hf_to_megatron_shard` asks its getter for one HF tensor at a
time and yields that rank's slices of it; :func:`megatron_to_hf` asks for the shards of one HF
tensor at a time and yields it. Nothing here holds more than one HF tensor (plus its pieces).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch

from atesd_mc.config import ConfigError, ModelConfig

HF_ARCHITECTURE = "Qwen3ForCausalLM"
HF_MODEL_TYPE = "qwen3"
NAME_SETS = ("local", "te")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json")
_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp32"}  # fp16 widens losslessly
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ConversionError(ValueError):
    """The HF or megatron checkpoint cannot be converted; the message says what and where."""


# ---------------------------------------------------------------------------------------------
# Configuration


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


def model_config_from_hf(config: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """Our ModelConfig for a HF Qwen3ForCausalLM config.json dict (v4 or v5 layout).

    Refuses other architectures and features the megatron model does not implement (attention
    bias, rope scaling, sliding-window attention, quantized weights). `overrides` go to
    ModelConfig (e.g. params_dtype, seq_length)."""
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


def torch_dtype(cfg: ModelConfig) -> torch.dtype | None:
    return _TORCH_DTYPES.get(cfg.params_dtype)


# ---------------------------------------------------------------------------------------------
# Names and shapes


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
                              f"{_few(missing)}")
    tolerated = {"lm_head.weight"} if not cfg.untie_embeddings_and_output_weights else set()
    extra = sorted(n for n in have - set(want) - tolerated if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConversionError(f"{source}: {len(extra)} unexpected tensor(s) for a Qwen3 model with "
                              f"this config.json: {_few(extra)}")


def _few(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


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


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    for what, n in (("num_query_groups", cfg.num_query_groups),
                    ("num_attention_heads", cfg.num_attention_heads),
                    ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ConversionError(f"{what}={n} is not divisible by tensor_model_parallel_size={tp}")
    if cfg.num_layers % pp:
        raise ConversionError(f"num_layers={cfg.num_layers} is not divisible by "
                              f"pipeline_model_parallel_size={pp}")


def _padded_vocab(cfg: ModelConfig, tp: int, padded_vocab: int | None) -> int:
    from atesd_mc.model.qwen3 import padded_vocab_size

    if padded_vocab is None:
        padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    if padded_vocab < cfg.vocab_size or padded_vocab % tp:
        raise ConversionError(f"padded vocab {padded_vocab} must be >= vocab_size={cfg.vocab_size} "
                              f"and divisible by tensor_model_parallel_size={tp}")
    return padded_vocab


# ---------------------------------------------------------------------------------------------
# HF -> megatron


def _getter(get_tensor: Callable[[str], torch.Tensor], source: str):
    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = get_tensor(name)
        except KeyError:
            raise ConversionError(f"{source}: tensor {name} is missing") from None
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{source}: tensor {name} has shape {tuple(t.shape)} but the config "
                                  f"implies {tuple(shape)}")
        return t
    return get


def iter_hf_to_megatron_shard(get_tensor: Callable[[str], torch.Tensor], cfg: ModelConfig,
                              tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                              padded_vocab: int | None = None, *, names: str = "local",
                              source: str = "the HF checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for the (tp_rank, pp_rank) shard, one HF tensor read at a time.

    Layer indices are local to the stage. Yielded tensors may be views of the HF tensor (copy them
    into the model's parameters; do not keep them). get_tensor(name) raises KeyError when absent."""
    _check_layout(cfg, tp, pp)
    vpad = _padded_vocab(cfg, tp, padded_vocab)
    shapes = hf_shapes(cfg)
    get = _getter(get_tensor, source)
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group = nh // ng
    groups = slice(tp_rank * ng // tp, (tp_rank + 1) * ng // tp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.untie_embeddings_and_output_weights

    def vocab_shard(t: torch.Tensor) -> torch.Tensor:
        rows = vpad // tp
        start = tp_rank * rows
        stop = min(start + rows, cfg.vocab_size)
        out = t.new_zeros(rows, t.shape[1])
        if stop > start:
            out[: stop - start] = t[start:stop]
        return out

    if first or (last and tied and pp > 1):
        emb = vocab_shard(get("model.embed_tokens.weight", shapes["model.embed_tokens.weight"]))
        if first:
            yield "embedding.word_embeddings.weight", emb
        if last and tied and pp > 1:
            yield "output_layer.weight", emb  # the last stage's copy of the tied embedding
        del emb
    per_stage = cfg.num_layers // pp
    role = megatron_layer_names(names)
    for local in range(per_stage):
        layer = pp_rank * per_stage + local
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{local}."

        def hf(n):
            return get(src + n, shapes[src + n])

        yield dst + role["input_norm"], hf("input_layernorm.weight")
        q = hf("self_attn.q_proj.weight").view(ng, per_group * hd, h)[groups]
        k = hf("self_attn.k_proj.weight").view(ng, hd, h)[groups]
        v = hf("self_attn.v_proj.weight").view(ng, hd, h)[groups]
        yield dst + role["qkv"], torch.cat([q, k, v], dim=1).reshape(-1, h)
        del q, k, v
        yield dst + role["q_norm"], hf("self_attn.q_norm.weight")
        yield dst + role["k_norm"], hf("self_attn.k_norm.weight")
        yield dst + role["proj"], hf("self_attn.o_proj.weight").chunk(tp, dim=1)[tp_rank]
        yield dst + role["mlp_norm"], hf("post_attention_layernorm.weight")
        gate = hf("mlp.gate_proj.weight").chunk(tp, dim=0)[tp_rank]
        up = hf("mlp.up_proj.weight").chunk(tp, dim=0)[tp_rank]
        yield dst + role["fc1"], torch.cat([gate, up], dim=0)
        del gate, up
        yield dst + role["fc2"], hf("mlp.down_proj.weight").chunk(tp, dim=1)[tp_rank]
    if last:
        yield "decoder.final_layernorm.weight", get("model.norm.weight", shapes["model.norm.weight"])
        if not tied:
            yield "output_layer.weight", vocab_shard(get("lm_head.weight", shapes["lm_head.weight"]))


def hf_to_megatron_shard(get_tensor: Callable[[str], torch.Tensor], cfg: ModelConfig, tp: int = 1,
                         tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                         padded_vocab: int | None = None, *, names: str = "local",
                         source: str = "the HF checkpoint") -> dict[str, torch.Tensor]:
    """The megatron state dict (local layer indices, padded vocab) of one (tp, pp) rank.

    Holds one copy of the shard: slices of HF tensors are copied so the full tensors are freed."""
    out = {}
    for name, t in iter_hf_to_megatron_shard(get_tensor, cfg, tp, tp_rank, pp, pp_rank, padded_vocab,
                                             names=names, source=source):
        out[name] = t.clone() if t.untyped_storage().nbytes() > t.nbytes else t
    return out


def megatron_shard_shapes(cfg: ModelConfig, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                          padded_vocab: int | None = None, *, names: str = "local"
                          ) -> dict[str, tuple[int, ...]]:
    """Shapes of one rank's megatron tensors (every TP rank of a stage has the same shapes)."""
    _check_layout(cfg, tp, pp)
    vpad = _padded_vocab(cfg, tp, padded_vocab)
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
        if cfg.untie_embeddings_and_output_weights or pp > 1:
            out["output_layer.weight"] = (vpad // tp, h)
    return out


# ---------------------------------------------------------------------------------------------
# megatron -> HF


def megatron_to_hf(get_tensor: Callable[[str, int, int], torch.Tensor], cfg: ModelConfig,
                   tp: int = 1, pp: int = 1, padded_vocab: int | None = None, *,
                   names: str = "local", source: str = "the megatron checkpoint"
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, contiguous tensor) in HF order, gathering TP shards and PP stages.

    get_tensor(megatron name, tp_rank, pp_rank) returns that rank's tensor (local layer index) and
    raises KeyError when absent. Vocab padding is dropped; a tied model yields no lm_head."""
    _check_layout(cfg, tp, pp)
    vpad = _padded_vocab(cfg, tp, padded_vocab)
    shapes = [megatron_shard_shapes(cfg, tp, pp, r, vpad, names=names) for r in range(pp)]
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group, per_stage = nh // ng, cfg.num_layers // pp

    def shards(name: str, pp_rank: int) -> list[torch.Tensor]:
        out = []
        for r in range(tp):
            try:
                t = get_tensor(name, r, pp_rank)
            except KeyError:
                raise ConversionError(f"{source}: tensor {name} of tensor-parallel rank {r}, pipeline "
                                      f"stage {pp_rank} is missing") from None
            want = shapes[pp_rank][name]
            if tuple(t.shape) != want:
                raise ConversionError(f"{source}: tensor {name} (tp rank {r}, pp stage {pp_rank}) has "
                                      f"shape {tuple(t.shape)} but the config implies {want}")
            out.append(t)
        return out

    def one(name: str, pp_rank: int) -> torch.Tensor:
        return shards(name, pp_rank)[0].contiguous()  # replicated over TP: rank 0's copy

    yield "model.embed_tokens.weight", torch.cat(shards("embedding.word_embeddings.weight", 0))[
        : cfg.vocab_size].contiguous()
    role = megatron_layer_names(names)
    for layer in range(cfg.num_layers):
        stage, local = divmod(layer, per_stage)
        src, dst = f"decoder.layers.{local}.", f"model.layers.{layer}."
        yield dst + "input_layernorm.weight", one(src + role["input_norm"], stage)
        qkv = torch.cat([s.view(ng // tp, (per_group + 2) * hd, h) for s in shards(src + role["qkv"], stage)])
        q, k, v = qkv.split([per_group * hd, hd, hd], dim=1)
        yield dst + "self_attn.q_proj.weight", q.reshape(nh * hd, h).contiguous()
        yield dst + "self_attn.k_proj.weight", k.reshape(ng * hd, h).contiguous()
        yield dst + "self_attn.v_proj.weight", v.reshape(ng * hd, h).contiguous()
        del qkv, q, k, v
        yield dst + "self_attn.q_norm.weight", one(src + role["q_norm"], stage)
        yield dst + "self_attn.k_norm.weight", one(src + role["k_norm"], stage)
        yield dst + "self_attn.o_proj.weight", torch.cat(shards(src + role["proj"], stage), dim=1)
        yield dst + "post_attention_layernorm.weight", one(src + role["mlp_norm"], stage)
        halves = [s.chunk(2, dim=0) for s in shards(src + role["fc1"], stage)]
        yield dst + "mlp.gate_proj.weight", torch.cat([g for g, _ in halves]).contiguous()
        yield dst + "mlp.up_proj.weight", torch.cat([u for _, u in halves]).contiguous()
        del halves
        yield dst + "mlp.down_proj.weight", torch.cat(shards(src + role["fc2"], stage), dim=1)
    yield "model.norm.weight", one("decoder.final_layernorm.weight", pp - 1)
    if cfg.untie_embeddings_and_output_weights:
        yield "lm_head.weight", torch.cat(shards("output_layer.weight", pp - 1))[
            : cfg.vocab_size].contiguous()


def check_hf_checkpoint(reader, cfg: ModelConfig) -> None:
    """Names and shapes of the whole checkpoint against the config, from headers only: every rank
    runs it before any collective, so a bad checkpoint fails everywhere instead of hanging."""
    check_hf_names(reader.keys(), cfg, source=reader.dir)
    for name, want in hf_shapes(cfg).items():
        have = reader.shape(name)
        if have != want:
            raise ConversionError(f"{reader.dir}: tensor {name} has shape {have} but config.json "
                                  f"implies {want}")


# ---------------------------------------------------------------------------------------------
# Live megatron models


def _model_tensors(model) -> dict[str, torch.Tensor]:
    from atesd_mc.model.qwen3 import unwrap

    return {k: v for k, v in unwrap(model).state_dict(keep_vars=True).items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def load_hf_into_stage(model, get_tensor: Callable[[str], torch.Tensor], cfg: ModelConfig,
                       tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0, *,
                       source: str = "the HF checkpoint") -> str:
    """Copy this rank's shard into a built megatron stage, one HF tensor at a time (peak extra
    host memory: one HF tensor). Every parameter must be filled. Returns the name set used."""
    own = _model_tensors(model)
    names = detect_names(own)
    vocab_rows = [t.shape[0] for k, t in own.items()
                  if k in ("embedding.word_embeddings.weight", "output_layer.weight")]
    vpad = vocab_rows[0] * tp if vocab_rows else None  # a middle stage holds neither
    filled = set()
    with torch.no_grad():
        for name, t in iter_hf_to_megatron_shard(get_tensor, cfg, tp, tp_rank, pp, pp_rank, vpad,
                                                 names=names, source=source):
            if name not in own:
                raise ConversionError(f"the megatron model has no parameter {name} ({names} spec "
                                      f"names, tp rank {tp_rank}, pp stage {pp_rank})")
            if own[name].shape != t.shape:
                raise ConversionError(f"megatron parameter {name} has shape {tuple(own[name].shape)} "
                                      f"but {source} gives {tuple(t.shape)}")
            own[name].copy_(t)
            filled.add(name)
    left = sorted(set(own) - filled)
    if left:
        raise ConversionError(f"megatron parameters not set from {source}: {_few(left)} (LoRA or "
                              "another addition the converter does not know)")
    return names


def stage_getter(model) -> tuple[Callable[[str, int, int], torch.Tensor], str]:
    """(get_tensor for megatron_to_hf, name set) over a TP=1, PP=1 model."""
    own = _model_tensors(model)
    return (lambda name, tp_rank, pp_rank: own[name].detach().cpu()), detect_names(own)


def __getattr__(name: str):
    """The file reader/writer moved to atesd_mc.hf_files; these names stay importable from here."""
    if name in ("HFCheckpoint", "parse_size", "write_safetensors"):
        from atesd_mc import hf_files

        return getattr(hf_files, name)
    raise AttributeError(f"module 'atesd_mc.convert' has no attribute {name!r}")
