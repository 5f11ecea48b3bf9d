"""LoRA adapters on megatron's column/row-parallel linears, attached by forward hooks.

Hooks keep the base model's modules and state-dict keys untouched (a LoRA run loads a plain
checkpoint) and keep the adapters in one container, `model.lora`, saved and loaded on its own.

Tensor parallelism (y = x W^T + s * B A x):
* column-parallel (qkv, gate|up): A [r, in] is replicated, B [out/tp, r] sharded like W. The rank-r
  activation goes through copy_to_tensor_model_parallel_region (identity forward, all-reduce
  backward) so dA sums every shard's contribution; with sequence parallelism the input is a
  sequence slice and the activation is all-gathered instead.
* row-parallel (o, down): A [r, in/tp] sharded like W's input dim, B [out, r] replicated; the
  partial rank-r activation is all-reduced (or reduce-scattered over the sequence with SP) before B.
Adapters are initialised from full-size tensors drawn from a seed of their own, then sliced, so a
model is the same at any TP size."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

# target -> (module path inside a TransformerLayer, kind)
_TARGETS = {
    "q": ("self_attention.linear_qkv", "column"), "k": ("self_attention.linear_qkv", "column"),
    "v": ("self_attention.linear_qkv", "column"), "o": ("self_attention.linear_proj", "row"),
    "gate": ("mlp.linear_fc1", "column"), "up": ("mlp.linear_fc1", "column"),
    "down": ("mlp.linear_fc2", "row"),
}


def _full_sizes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each target's full (unsharded) weight."""
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = cfg.num_query_groups * cfg.kv_channels
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (f, h), "up": (f, h),
            "down": (h, f)}


class LoRAAdapter(nn.Module):
    """A (rank x in) and B (out x rank) for one target, already sliced for this TP rank."""

    def __init__(self, target: str, out_full: int, in_full: int, rank: int, tp: int, tp_rank: int,
                 seed: int, dtype: torch.dtype, sequence_parallel: bool):
        super().__init__()
        kind = _TARGETS[target][1]
        gen = torch.Generator().manual_seed(seed)
        a_full = torch.empty(rank, in_full, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_full)  # kaiming-uniform(a=sqrt(5)) bound for fan_in=in_full
        a_full.uniform_(-bound, bound, generator=gen)
        if kind == "column":
            a = a_full
            b = torch.zeros(out_full // tp, rank)
        else:
            a = a_full.chunk(tp, dim=1)[tp_rank]
            b = torch.zeros(out_full, rank)
        dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        self.A = nn.Parameter(a.to(device=dev, dtype=dtype).contiguous())
        self.B = nn.Parameter(b.to(device=dev, dtype=dtype).contiguous())
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        # Sharded params count once per shard in grad-norm; replicated ones once overall.
        if kind == "column":
            set_tensor_model_parallel_attributes(self.B, True, 0, 1)
            self.A.sequence_parallel = sequence_parallel  # partial grads per sequence slice
        else:
            set_tensor_model_parallel_attributes(self.A, True, 1, 1)
            self.B.sequence_parallel = sequence_parallel


class LoRAAdapters(nn.Module):
    """All adapters of one pipeline stage, keyed "<global layer>_<target>"."""

    def __init__(self, scale: float):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.scale = scale
        self.enabled = True
        self.hooks: list = []  # forward-hook handles, so remove_lora can detach the adapters

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP-sharded params split along their partition dim; keys carry global layer numbers,
        so no pipeline offset applies (a checkpoint reshards across TP and PP)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axes = {k: p.partition_dim for k, p in state.items() if getattr(p, "tensor_model_parallel", False)}
        return make_sharded_tensors_for_checkpoint(state, prefix, axes)


def _column_delta(x, adapters: dict[str, LoRAAdapter], names: list[str], layout, sp: bool):
    from megatron.core.tensor_parallel import mappings

    parts = {}
    for name in names:
        ad = adapters[name]
        h = x @ ad.A.t()
        h = mappings.gather_from_sequence_parallel_region(h) if sp else \
            mappings.copy_to_tensor_model_parallel_region(h)
        parts[name] = h @ ad.B.t()
    return layout(parts)


def _row_delta(x, ad: LoRAAdapter, sp: bool):
    from megatron.core.tensor_parallel import mappings

    h = x @ ad.A.t()
    h = mappings.reduce_scatter_to_sequence_parallel_region(h) if sp else \
        mappings.reduce_from_tensor_model_parallel_region(h)
    return h @ ad.B.t()


def _qkv_layout(cfg, tp: int):
    """Megatron's fused QKV output is interleaved per local query group: [q.. | k | v]."""
    groups = cfg.num_query_groups // tp
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups * cfg.kv_channels
    sizes = {"q": q_per_group, "k": cfg.kv_channels, "v": cfg.kv_channels}

    def layout(parts):
        ref = next(iter(parts.values()))
        lead = ref.shape[:-1]
        chunks = []
        for name in ("q", "k", "v"):
            t = parts.get(name)
            if t is None:
                t = ref.new_zeros(*lead, groups * sizes[name])
            chunks.append(t.reshape(*lead, groups, sizes[name]))
        return torch.cat(chunks, dim=-1).reshape(*lead, -1)

    return layout


def _fc1_layout(cfg, tp: int):
    """Megatron's fc1 shard is [gate_local ; up_local]."""
    f_local = cfg.ffn_hidden_size // tp

    def layout(parts):
        ref = next(iter(parts.values()))
        zeros = ref.new_zeros(*ref.shape[:-1], f_local)
        return torch.cat([parts.get("gate", zeros), parts.get("up", zeros)], dim=-1)

    return layout


def add_lora(model, rank: int, alpha: float, targets: list[str], seed: int) -> LoRAAdapters:
    """Freeze the base weights of a GPTModel stage and attach adapters on `targets`."""
    from megatron.core import parallel_state as ps

    cfg = model.config
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sp = cfg.sequence_parallel
    for p in model.parameters():
        p.requires_grad_(False)
    container = LoRAAdapters(scale=alpha / rank)
    sizes = _full_sizes(cfg)
    for layer in model.decoder.layers:
        by_module: dict[str, list[str]] = {}
        for t in targets:
            by_module.setdefault(_TARGETS[t][0], []).append(t)
        for path, names in by_module.items():
            module = layer.get_submodule(path)
            local = {}
            for t in names:
                key = f"{layer.layer_number}.{t}"
                ad = LoRAAdapter(t, *sizes[t], rank, tp, tp_rank,
                                 seed=seed * 1000003 + layer.layer_number * 31 + list(_TARGETS).index(t),
                                 dtype=cfg.params_dtype, sequence_parallel=sp)
                container.adapters[key.replace(".", "_")] = ad
                local[t] = ad
            module.lora_delta = _make_delta(container, local, names, cfg, tp, sp)
            container.hooks.append(module.register_forward_hook(_hook))
    model.lora = container
    return container


def _make_delta(container, local, names, cfg, tp, sp):
    """y -> y + scale * (B A x) for one linear module's adapters (y unchanged while disabled)."""
    kind = _TARGETS[names[0]][1]
    if kind == "column":
        layout = _qkv_layout(cfg, tp) if names[0] in ("q", "k", "v") else _fc1_layout(cfg, tp)

    def delta(x, y):
        if not container.enabled:
            return y
        if kind == "column":
            d = _column_delta(x, local, names, layout, sp)
        else:
            d = _row_delta(x, local[names[0]], sp)
        return y + container.scale * d.to(y.dtype)

    return delta


def adapted(module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The output y = x W^T of a linear `module` plus its LoRA adapters' contribution: the public
    way for code that runs a module's weight itself (model/lean.py) to apply the adapters."""
    delta = getattr(module, "lora_delta", None)
    return y if delta is None else delta(x, y)


def weight_deltas(model) -> dict[str, torch.Tensor]:
    """The adapters as weights: for each adapted linear of a GPTModel stage, the fp32 tensor
    scale * B A laid out like its local weight shard, so that W + delta gives what the hooks
    compute (x W^T + scale * B A x), keyed by that weight's parameter name in unwrap(model).
    Column-parallel: this rank's rows, i.e. its B shard, in megatron's fused layout ([q.. | k | v]
    per local group, [gate ; up]); row-parallel: B times this rank's A shard (its input columns).
    Empty when the model has no adapters or they are disabled (the forward adds nothing then)."""
    from megatron.core import parallel_state as ps

    from atesd_mc.model.qwen3 import unwrap

    container = lora_of(model)
    if container is None or not container.enabled:
        return {}
    model = unwrap(model)
    cfg, tp = model.config, ps.get_tensor_model_parallel_world_size()
    names = {id(p): n for n, p in model.named_parameters()}
    by_layer: dict[int, dict[str, dict[str, LoRAAdapter]]] = {}
    for key, ad in container.adapters.items():  # keys "<global layer>_<target>"
        number, target = key.split("_", 1)
        by_layer.setdefault(int(number), {}).setdefault(_TARGETS[target][0], {})[target] = ad
    out = {}
    for layer in model.decoder.layers:
        for path, local in by_layer.get(layer.layer_number, {}).items():
            weight = layer.get_submodule(path).weight
            out[names[id(weight)]] = container.scale * _weight_delta(local, cfg, tp)
    return out


def _weight_delta(local: dict[str, LoRAAdapter], cfg, tp: int) -> torch.Tensor:
    """B A of one linear's adapters in fp32, [out_local, in_local] like its weight."""
    first = next(iter(local))
    if _TARGETS[first][1] == "row":
        return local[first].B.float() @ local[first].A.float()
    layout = _qkv_layout(cfg, tp) if first in ("q", "k", "v") else _fc1_layout(cfg, tp)
    # The layouts place each target's outputs along the last dim, as in the forward delta
    # (x A^T B^T); with x = I that is W^T's columns, hence the transposes.
    return layout({t: (ad.B.float() @ ad.A.float()).t() for t, ad in local.items()}).t()


def _hook(module, args, output):
    """Megatron's linears return (output, bias): the adapters add to the output."""
    out, bias = output
    return adapted(module, args[0], out), bias


def lora_of(model) -> LoRAAdapters | None:
    from atesd_mc.model.qwen3 import unwrap

    return getattr(unwrap(model), "lora", None)


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base weights (theta_0 for a LoRA run): the OPSD fixed teacher."""
    container = lora_of(model)
    if container is None:
        yield
        return
    saved = container.enabled
    container.enabled = False
    try:
        yield
    finally:
        container.enabled = saved


def iter_adapters(model):
    """(global layer number, target, LoRAAdapter) of every adapter of this stage, in layer order
    and in the order of _TARGETS (q, k, v, o, gate, up, down)."""
    container = lora_of(model)
    if container is None:
        return
    for layer in sorted({int(key.split("_")[0]) for key in container.adapters}):
        for target in _TARGETS:
            key = f"{layer}_{target}"
            if key in container.adapters:
                yield layer, target, container.adapters[key]


def merge_lora(model) -> int:
    """W <- W + scale * B A for every adapted linear of this stage (weight_deltas: this rank's
    shard, summed in fp32, then cast to W's dtype), then switch the adapters off: the model
    computes from its base weights alone what it computed with the adapters on (what an export
    writes). Returns the number of adapters merged (0 when none, or when they were disabled)."""
    from atesd_mc.model.qwen3 import unwrap

    container = lora_of(model)
    if container is None or not container.enabled:
        return 0
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, delta in weight_deltas(model).items():
            weight = params[name]
            weight.copy_((weight.float() + delta).to(weight.dtype))
    container.enabled = False
    return len(container.adapters)


def remove_lora(model) -> None:
    """Detach the adapters (hooks, deltas and the `lora` container): the plain model again, e.g.
    after merge_lora, so fresh adapters can be attached."""
    from atesd_mc.model.qwen3 import unwrap

    container = lora_of(model)
    if container is None:
        return
    for handle in container.hooks:
        handle.remove()
    stage = unwrap(model)
    for module in stage.modules():
        if hasattr(module, "lora_delta"):
            del module.lora_delta
    del stage.lora
