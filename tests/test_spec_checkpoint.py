"""One checkpoint format for every layer spec (issue 18, item 1).

The local spec (CPU), the transformer-engine spec (GPU) and the TE spec with separate norms (GPU,
LoRA) must save the same sharded keys, so a checkpoint moves between them: import-hf and a CPU run
write linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight, and a LoRA run on a TE GPU
--finetunes from them. TE modules also save `_extra_state` (fp8 metadata) that other specs lack.

transformer-engine cannot be installed here (docs/PLATFORM.md), so its module classes are replaced
by stand-ins where megatron looks them up (extensions.transformer_engine and the TE spec provider):
the same constructor arguments, parameter names, TP sharding and `_extra_state` as megatron's TE
wrappers, and the same math as the local spec's modules, so a model built from megatron's own TE
spec computes what the local model computes."""
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from harness import run_distributed

from atesd_mc import checkpoint as ckpt

VOCAB = 300
SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, kv_channels=16, seq_length=32, params_dtype="fp32")
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
# (transformer_impl, lora_rank): the spec each builds (qwen3_layer_spec: unfused norms with LoRA)
VARIANTS = {"local": ("local", 0), "te": ("transformer_engine", 0),
            "te_unfused": ("transformer_engine", 4), "local_lora": ("local", 4)}


# ---------------------------------------------------------------------------------------------
# transformer-engine stand-ins


class _ExtraState:
    """TE modules' fp8 metadata: a uint8 tensor in the state dict (TE 2.x), None accepted on load
    (what megatron's own linears save). `restored` records what a load gave the module."""

    restored = "nothing"  # set_extra_state never called

    def get_extra_state(self):
        return torch.tensor([7, 1, 2], dtype=torch.uint8)

    def set_extra_state(self, state):
        self.restored = state


def _te_load_hooks(module):
    """Megatron's linears fill a missing `_extra_state` with None before loading; TE's modules do
    not, so a missing one stays missing for load_state_dict (what this file tests)."""
    module._load_state_dict_pre_hooks.clear()


class FakeTERMSNorm(_ExtraState, torch.nn.RMSNorm):
    pass


class FakeTENorm:
    """megatron's TENorm: a factory for TE's RMSNorm (parameter `weight`)."""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        return FakeTERMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)


def _linears():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    class FakeTEColumnParallelLinear(_ExtraState, ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _te_load_hooks(self)

    class FakeTELayerNormColumnParallelLinear(FakeTEColumnParallelLinear):
        """TE's LayerNormLinear: the norm's weight is `layer_norm_weight`, replicated over TP."""

        def __init__(self, input_size, *args, **kwargs):
            super().__init__(input_size, *args, **kwargs)
            self.eps = kwargs["config"].layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(
                torch.ones(input_size, dtype=kwargs["config"].params_dtype))

        def forward(self, x, *args, **kwargs):
            x = F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    class FakeTERowParallelLinear(_ExtraState, RowParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _te_load_hooks(self)

    return FakeTELayerNormColumnParallelLinear, FakeTEColumnParallelLinear, FakeTERowParallelLinear


def _attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class FakeTEDotProductAttention(_ExtraState, DotProductAttention):
        """TE's attention has fp8 metadata in its state dict but none in its sharded state dict."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type="p2p",
                     pg_collection=None):
            super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                             softmax_scale, cp_comm_type, pg_collection)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return {}

    return FakeTEDotProductAttention


@contextlib.contextmanager
def stub_transformer_engine():
    """Megatron's TE spec, built from the stand-ins: the names megatron's TE spec provider and our
    spec.py read, TE's final norm in the block, and "TE imports" for spec.resolve_impl."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block

    from atesd_mc.model import spec

    ln_linear, column, row = _linears()
    classes = dict(TELayerNormColumnParallelLinear=ln_linear, TEColumnParallelLinear=column,
                   TERowParallelLinear=row, TENorm=FakeTENorm, TEDotProductAttention=_attention())
    with contextlib.ExitStack() as stack:
        for module in (te, provider):
            for name, cls in classes.items():
                stack.enter_context(mock.patch.object(module, name, cls))
        stack.enter_context(mock.patch.object(provider, "is_te_min_version", lambda *a, **k: True))
        # gpt_layer_specs imports TESpecProvider only when TE imports
        stack.enter_context(mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider,
                                              create=True))
        stack.enter_context(mock.patch.object(transformer_block, "LayerNormImpl", FakeTENorm))
        stack.enter_context(mock.patch.object(spec, "transformer_engine_available", lambda: True))
        yield


# ---------------------------------------------------------------------------------------------
# rank functions (module level: forked ranks)


def _build(variant, adapters=False):
    """The model of `variant` (TE ones from the stand-ins), all weights random and distinct (norms
    too, so a norm loaded into the wrong place shows), with LoRA adapters if asked."""
    from atesd_mc.config import ModelConfig, ParallelConfig
    from atesd_mc.model.lora import add_lora
    from atesd_mc.model.qwen3 import build_stage

    impl, rank = VARIANTS[variant]
    cfg = ModelConfig(**SHAPE, transformer_impl=impl, lora_rank=rank)
    with stub_transformer_engine() if impl == "transformer_engine" else contextlib.nullcontext():
        model = build_stage(cfg, ParallelConfig(), VOCAB)
    if adapters:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.2)
    return model.eval()


def _sharded_keys(model):
    """{checkpoint key: global shape or "object"} of the model's sharded state dict, and the
    (key, offset) pairs claimed by more than one module (a norm both separate and fused; factories,
    the SwiGLU fc1 weight, carry no offset until built: not checked)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out, seen, twice = {}, set(), []
    for v in nested_values(model.sharded_state_dict()):
        if isinstance(v, ShardedObject):
            out[v.key], place = "object", (v.key, tuple(v.global_offset))
        elif isinstance(v, ShardedTensor):
            out[v.key], place = tuple(v.global_shape), (v.key, tuple(v.global_offset))
        else:
            out[v.key], place = tuple(v.data.shape), None
        if place is not None and place in seen:
            twice.append(place)
        seen.add(place)
    return out, twice


def _keys_of_every_spec():
    return {name: _sharded_keys(_build(name, adapters=name in ("te_unfused", "local_lora")))
            for name in VARIANTS}


def _by_key(model):
    """{checkpoint key: tensor} of the model's weights (its sharded state dict, no _extra_state)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {v.key: v.data.detach().clone() for v in nested_values(model.sharded_state_dict())
            if isinstance(v, ShardedTensor)}


def _logits(model):
    from atesd_mc.model.qwen3 import full_logits

    with torch.no_grad():
        return full_logits(model, TOKENS)


def _round_trip(source, target, path, adapters=False, unmapped=False):
    """Save `source`, load it with model_io.load_weights into `target`: (its weights by key,
    target's weights and logits after the load, the source's logits, what the load gave the
    extra states of the first layer's norms and qkv)."""
    from atesd_mc.model_io import load_weights

    model = _build(source, adapters)
    if unmapped:  # the layout the TE spec with unfused norms saved before the keys map
        model.decoder.layers[0].submodules_config.sharded_state_dict_keys_map = {}
    ckpt.save_sharded(model.sharded_state_dict(), path)
    saved, want = _by_key(model), _logits(model)
    into = _build(target, adapters)
    load_weights(into, root=path, path=path)
    layer = into.decoder.layers[0]
    restored = {name: getattr(layer.get_submodule(name), "restored", "-") for name in
                ("input_layernorm", "self_attention.q_layernorm", "self_attention.linear_qkv")}
    return saved, _by_key(into), want, _logits(into), restored


# ---------------------------------------------------------------------------------------------
# tests


def _weights(keys):
    return {k: v for k, v in keys.items() if not k.endswith("_extra_state")}


def test_every_spec_saves_the_same_keys():
    built = run_distributed(_keys_of_every_spec, world=1)[0]
    assert {name: twice for name, (_, twice) in built.items() if twice} == {}
    keys = {name: k for name, (k, _) in built.items()}
    local = _weights(keys["local"])
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in local
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in local
    assert _weights(keys["te"]) == local
    base = {k: v for k, v in _weights(keys["te_unfused"]).items() if not k.startswith("lora.")}
    assert base == local  # before the keys map: decoder.layers.input_layernorm.weight
    assert any(k.startswith("lora.") for k in keys["te_unfused"])
    assert _weights(keys["te_unfused"]) == _weights(keys["local_lora"])
    # the TE models do hold fp8 metadata that the local model lacks (what the load must tolerate)
    assert set(keys["te_unfused"]) - set(keys["local_lora"]) >= {
        "decoder.layers.self_attention.q_layernorm._extra_state",
        "decoder.layers.self_attention.linear_qkv.layer_norm__extra_state"}


@pytest.mark.parametrize("source,target,adapters", [
    ("local", "te_unfused", False),  # --finetune of a LoRA run on a TE GPU from a CPU checkpoint
    ("te_unfused", "local_lora", True),  # and its LoRA checkpoint back on CPU
    ("te", "te_unfused", False),  # a TE run's checkpoint into a TE LoRA run
])
def test_checkpoint_moves_between_specs(tmp_path, source, target, adapters):
    saved, loaded, want, got, restored = run_distributed(
        _round_trip, world=1, args=(source, target, str(tmp_path / "ckpt"), adapters))[0]
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(got, want)  # same math: every weight is where the source had it
    if target == "te_unfused":
        # Absent from the checkpoint: a module keeps its own metadata (the separate input norm
        # always; the QK norms from a local checkpoint). Present: the module gets what was saved
        # (None from megatron's local linears, TE's bytes from a TE module).
        te_bytes = torch.tensor([7, 1, 2], dtype=torch.uint8)
        assert restored["input_layernorm"] == "nothing"
        q_norm, qkv = restored["self_attention.q_layernorm"], restored["self_attention.linear_qkv"]
        if source == "local":
            assert q_norm == "nothing" and qkv is None
        else:
            assert torch.equal(q_norm, te_bytes) and torch.equal(qkv, te_bytes)


def test_checkpoint_without_fused_norm_keys_is_refused(tmp_path):
    """A layer saving its norms as input_layernorm.weight (no keys map) does not load silently:
    the load is strict for weights, only `_extra_state` may be absent."""
    with pytest.raises(RuntimeError) as err:
        run_distributed(_round_trip, world=1, args=("local", "local", str(tmp_path / "ckpt"), False, True))
    assert "CheckpointError" in str(err.value)
    assert "layer_norm_weight" in str(err.value)


def test_module_load_tolerates_only_missing_extra_state():
    class Layer(_ExtraState, torch.nn.Linear):
        pass

    module = torch.nn.Sequential(Layer(3, 2), torch.nn.RMSNorm(2))
    state = {k: v.clone() + 1 for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    ckpt.load_module_state(module, state, "ckpt")
    assert torch.equal(module[0].weight, state["0.weight"]) and module[0].restored == "nothing"
    for drop, extra in (("1.weight", {}), (None, {"2.weight": torch.ones(2)})):
        broken = {**{k: v for k, v in state.items() if k != drop}, **extra}
        with pytest.raises(ckpt.CheckpointError, match="ckpt: does not fit the model"):
            ckpt.load_module_state(module, broken, "ckpt")
