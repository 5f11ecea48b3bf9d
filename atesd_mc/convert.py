"""Hugging Face Qwen3 <-> megatron-core tensors: slicing HF tensors into one rank's shards, and
joining every rank's shards back into HF tensors (no I/O policy, no process groups).

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

The names and shapes each side must have are in atesd_mc.convert_layout, config.json translation
in atesd_mc.convert_config, and the checkpoint files and ConversionError in atesd_mc.hf_files.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from atesd_mc.config import ModelConfig
from atesd_mc.convert_layout import (check_layout, detect_names, hf_shapes, megatron_layer_names,
                                     megatron_shard_shapes, resolve_padded_vocab)
from atesd_mc.hf_files import ConversionError, summarize_names
from atesd_mc.model.qwen3 import unwrap


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


def _vocab_shard(t: torch.Tensor, vocab_size: int, vpad: int, tp: int, tp_rank: int) -> torch.Tensor:
    """Rank tp_rank's rows of the vocab padded to vpad rows; the padding rows are zero."""
    rows = vpad // tp
    start = tp_rank * rows
    stop = min(start + rows, vocab_size)
    out = t.new_zeros(rows, t.shape[1])
    if stop > start:
        out[: stop - start] = t[start:stop]
    return out


def _layer_to_megatron(hf: Callable[[str], torch.Tensor], dst: str, role: dict[str, str],
                       cfg: ModelConfig, tp: int, tp_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's megatron tensors for tp_rank; hf(name) reads the layer's HF tensor by
    its layer-relative name, and dst prefixes the megatron names."""
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group = nh // ng
    groups = slice(tp_rank * ng // tp, (tp_rank + 1) * ng // tp)
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


def iter_hf_to_megatron_shard(get_tensor: Callable[[str], torch.Tensor], cfg: ModelConfig,
                              tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                              padded_vocab: int | None = None, *, names: str = "local",
                              source: str = "the HF checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for the (tp_rank, pp_rank) shard, one HF tensor read at a time.

    Layer indices are local to the stage. Yielded tensors may be views of the HF tensor (copy them
    into the model's parameters; do not keep them). get_tensor(name) raises KeyError when absent."""
    check_layout(cfg, tp, pp)
    vpad = resolve_padded_vocab(cfg, tp, padded_vocab)
    shapes = hf_shapes(cfg)
    get = _getter(get_tensor, source)
    first, last = pp_rank == 0, pp_rank == pp - 1
    tied = not cfg.untie_embeddings_and_output_weights
    if first or (last and tied and pp > 1):
        emb = _vocab_shard(get("model.embed_tokens.weight", shapes["model.embed_tokens.weight"]),
                           cfg.vocab_size, vpad, tp, tp_rank)
        if first:
            yield "embedding.word_embeddings.weight", emb
        if last and tied and pp > 1:
            yield "output_layer.weight", emb  # the last stage's copy of the tied embedding
        del emb
    per_stage = cfg.num_layers // pp
    role = megatron_layer_names(names)
    for local in range(per_stage):
        src = f"model.layers.{pp_rank * per_stage + local}."
        yield from _layer_to_megatron(lambda n: get(src + n, shapes[src + n]),
                                      f"decoder.layers.{local}.", role, cfg, tp, tp_rank)
    if last:
        yield "decoder.final_layernorm.weight", get("model.norm.weight", shapes["model.norm.weight"])
        if not tied:
            yield "output_layer.weight", _vocab_shard(get("lm_head.weight", shapes["lm_head.weight"]),
                                                      cfg.vocab_size, vpad, tp, tp_rank)


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


# ---------------------------------------------------------------------------------------------
# megatron -> HF


def _shard_reader(get_tensor: Callable[[str, int, int], torch.Tensor],
                  shapes: list[dict[str, tuple[int, ...]]], tp: int, source: str):
    """shards(name, pp_rank): the tensor of every TP rank of that stage, each checked against the
    shape the config implies, so a wrong checkpoint fails by name instead of inside a cat."""
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
    return shards


def _layer_to_hf(shards: Callable[[str], list[torch.Tensor]], src: str, dst: str,
                 role: dict[str, str], cfg: ModelConfig, tp: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's HF tensors from its stage's TP shards; shards(name) reads them by full
    megatron name, src/dst prefix the megatron and HF names."""
    h, hd, nh, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    per_group = nh // ng

    def one(name: str) -> torch.Tensor:
        return shards(name)[0].contiguous()  # replicated over TP: rank 0's copy

    yield dst + "input_layernorm.weight", one(src + role["input_norm"])
    qkv = torch.cat([s.view(ng // tp, (per_group + 2) * hd, h) for s in shards(src + role["qkv"])])
    q, k, v = qkv.split([per_group * hd, hd, hd], dim=1)
    yield dst + "self_attn.q_proj.weight", q.reshape(nh * hd, h).contiguous()
    yield dst + "self_attn.k_proj.weight", k.reshape(ng * hd, h).contiguous()
    yield dst + "self_attn.v_proj.weight", v.reshape(ng * hd, h).contiguous()
    del qkv, q, k, v
    yield dst + "self_attn.q_norm.weight", one(src + role["q_norm"])
    yield dst + "self_attn.k_norm.weight", one(src + role["k_norm"])
    yield dst + "self_attn.o_proj.weight", torch.cat(shards(src + role["proj"]), dim=1)
    yield dst + "post_attention_layernorm.weight", one(src + role["mlp_norm"])
    halves = [s.chunk(2, dim=0) for s in shards(src + role["fc1"])]
    yield dst + "mlp.gate_proj.weight", torch.cat([g for g, _ in halves]).contiguous()
    yield dst + "mlp.up_proj.weight", torch.cat([u for _, u in halves]).contiguous()
    del halves
    yield dst + "mlp.down_proj.weight", torch.cat(shards(src + role["fc2"]), dim=1)


def megatron_to_hf(get_tensor: Callable[[str, int, int], torch.Tensor], cfg: ModelConfig,
                   tp: int = 1, pp: int = 1, padded_vocab: int | None = None, *,
                   names: str = "local", source: str = "the megatron checkpoint"
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, contiguous tensor) in HF order, gathering TP shards and PP stages.

    get_tensor(megatron name, tp_rank, pp_rank) returns that rank's tensor (local layer index) and
    raises KeyError when absent. Vocab padding is dropped; a tied model yields no lm_head."""
    check_layout(cfg, tp, pp)
    vpad = resolve_padded_vocab(cfg, tp, padded_vocab)
    shapes = [megatron_shard_shapes(cfg, tp, pp, r, vpad, names=names) for r in range(pp)]
    shards = _shard_reader(get_tensor, shapes, tp, source)
    per_stage = cfg.num_layers // pp
    yield "model.embed_tokens.weight", torch.cat(shards("embedding.word_embeddings.weight", 0))[
        : cfg.vocab_size].contiguous()
    role = megatron_layer_names(names)
    for layer in range(cfg.num_layers):
        stage, local = divmod(layer, per_stage)
        yield from _layer_to_hf(lambda name: shards(name, stage), f"decoder.layers.{local}.",
                                f"model.layers.{layer}.", role, cfg, tp)
    # replicated over TP: rank 0's copy
    yield "model.norm.weight", shards("decoder.final_layernorm.weight", pp - 1)[0].contiguous()
    if cfg.untie_embeddings_and_output_weights:
        yield "lm_head.weight", torch.cat(shards("output_layer.weight", pp - 1))[
            : cfg.vocab_size].contiguous()


# ---------------------------------------------------------------------------------------------
# Live megatron models


def _model_tensors(model) -> dict[str, torch.Tensor]:
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
        raise ConversionError(f"megatron parameters not set from {source}: "
                              f"{summarize_names(left)} (LoRA or another addition the converter "
                              "does not know)")
    return names


def stage_getter(model) -> tuple[Callable[[str, int, int], torch.Tensor], str]:
    """(get_tensor for megatron_to_hf, name set) over a TP=1, PP=1 model."""
    own = _model_tensors(model)
    return (lambda name, tp_rank, pp_rank: own[name].detach().cpu()), detect_names(own)


def lora_to_peft(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The LoRA adapters of a TP=1, PP=1 model under PEFT's names for a Qwen3ForCausalLM
    (base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...). Each target has
    its own adapter, and it maps as it is: A [r, in] and B [out, r] act on the HF module's own
    input and output, because B's rows are in HF order (q by query group, then head, as
    atesd_mc.model.lora._qkv_layout reads them; gate and up whole) and A's columns are the HF
    input (o_proj's heads in HF order, down_proj's FFN rows)."""
    from atesd_mc.convert_config import HF_LORA_MODULES
    from atesd_mc.model.lora import iter_adapters

    block = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
             "gate": "mlp", "up": "mlp", "down": "mlp"}
    for layer, target, ad in iter_adapters(model):
        name = f"base_model.model.model.layers.{layer - 1}.{block[target]}.{HF_LORA_MODULES[target]}"
        yield name + ".lora_A.weight", ad.A.detach().cpu().contiguous()
        yield name + ".lora_B.weight", ad.B.detach().cpu().contiguous()
