"""Layer specs: transformer-engine when it imports (GPU images), megatron's local spec otherwise.

The choice is a ModuleSpec, not branches in model code. A broken transformer-engine install raises
RuntimeError (not ImportError) on import, so any exception means "not available"."""
from __future__ import annotations

import dataclasses
import functools

import torch


@functools.cache
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # broken TE raises RuntimeError, absent TE ImportError
        return False
    return True


def resolve_impl(requested: str) -> str:
    """auto -> transformer_engine when usable, else local."""
    if requested == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if requested == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError("transformer_impl=transformer_engine but transformer_engine.pytorch does not "
                           "import on this machine (it needs CUDA); use transformer_impl=local or auto")
    return requested


def _swap(spec, old, new):
    """Replace every occurrence of module class `old` by `new` inside a (nested) ModuleSpec."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, functools.partial):  # megatron-core 0.19 builds the MLP as a partial
        return functools.partial(_swap(spec.func, old, new), *(_swap(a, old, new) for a in spec.args),
                                 **{k: _swap(v, old, new) for k, v in spec.keywords.items()})
    if isinstance(spec, ModuleSpec):
        spec.module = _swap(spec.module, old, new)
        spec.submodules = _swap(spec.submodules, old, new)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            setattr(spec, f.name, _swap(getattr(spec, f.name), old, new))
    return spec


# Checkpoint keys of separate input/pre-MLP norms under the names of the fused layout (TE's
# LayerNormLinear: linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight), as megatron's local
# spec maps them: every spec (local, TE, TE with unfused norms for LoRA) and import-hf then share
# one checkpoint format. Prefixes, as TransformerLayer applies them (apply_prefix_mapping).
FUSED_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def qwen3_layer_spec(impl: str, sequence_parallel: bool = False, unfused_norms: bool = False):
    """Qwen3 decoder layer: RMSNorm, QK-norm, SwiGLU MLP, no biases (the config sets the rest).

    unfused_norms (TE only): use separate norm modules so LoRA hooks see the normalised input;
    their checkpoint keys stay those of the fused layout (FUSED_NORM_KEYS)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl == "transformer_engine":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        if unfused_norms:
            from megatron.core.extensions import transformer_engine as te

            spec = _swap(spec, te.TELayerNormColumnParallelLinear, te.TEColumnParallelLinear)
            spec.submodules.input_layernorm = te.TENorm
            spec.submodules.pre_mlp_layernorm = te.TENorm
            # A new dict: keep TE's own entries (its op-fuser MLP names), never edit megatron's.
            spec.submodules.sharded_state_dict_keys_map = {
                **spec.submodules.sharded_state_dict_keys_map, **FUSED_NORM_KEYS}
        return spec
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    if sequence_parallel:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from atesd_mc.distributed import SequenceParallelRMSNorm

        spec = _swap(spec, WrappedTorchNorm, SequenceParallelRMSNorm)
    return spec
