"""Open a saved model for inference: a training checkpoint or an imported HF checkpoint.

Every checkpoint directory iter_XXXXXXX/ carries the model description, model_config.json: our
ModelConfig with the real vocabulary size (the embedding is padded beyond it), the LoRA rank, alpha
and targets, and the dtype the weights were stored in. The trainer (atesd_mc.run_state) and
import-hf (tools/convert_checkpoint.py) write it inside the temporary directory that the rename
publishes, so it is never missing from, or out of step with, the weights beside it. Imports made
before this also have it at the root, which model_description reads second.

A training checkpoint has trainer_state.pt with the run config, and its dist checkpoint nests the
model under "model"; an import has the model at the top level. Both are Megatron layouts with a
tracker file, and dist_checkpointing reshards them to the current TP/PP layout."""
from __future__ import annotations

import dataclasses
import json
import os

from atesd_mc import checkpoint as ckpt
from atesd_mc.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from atesd_mc.config_io import config_from_dict

DESCRIPTION = "model_config.json"


def describe_model(cfg: ModelConfig, vocab: int) -> dict:
    """The model description of a model built from cfg with `vocab` real tokens: ModelConfig's
    fields, vocab_size the real size, params_dtype the dtype the weights are stored in."""
    import torch

    from atesd_mc.model.qwen3 import params_dtype

    stored = "bf16" if params_dtype(cfg) == torch.bfloat16 else "fp32"
    return {**dataclasses.asdict(cfg), "vocab_size": int(vocab), "params_dtype": stored}


def write_model_description(directory: str, cfg: ModelConfig, vocab: int) -> None:
    """directory/model_config.json (a checkpoint's temporary directory, before its rename)."""
    ckpt.save_text(os.path.join(directory, DESCRIPTION),
                   json.dumps(describe_model(cfg, vocab), indent=2) + "\n")


def checkpoint_dir(root: str) -> str:
    """The directory of the checkpoint the tracker under root names."""
    step = ckpt.latest_step(root)
    if step is None:
        raise ckpt.CheckpointError(f"{root}: no {ckpt.TRACKER} (not a checkpoint directory)")
    return ckpt.iter_dir(root, step)


def model_description(root: str, path: str | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, the file it came from) of the checkpoint `path` (default: the latest under
    root): path/model_config.json, else root/model_config.json (an import made before checkpoints
    carried it). CheckpointError when neither exists or it does not make a ModelConfig."""
    path = path or checkpoint_dir(root)
    for candidate in (os.path.join(path, DESCRIPTION), os.path.join(root, DESCRIPTION)):
        if os.path.isfile(candidate):
            break
    else:
        raise ckpt.CheckpointError(f"{path}: no {DESCRIPTION} here or in {root}: nothing says what "
                                   "model this checkpoint holds")
    try:
        with open(candidate) as f:
            return ModelConfig(**json.load(f)), candidate
    except (TypeError, ValueError, ConfigError) as e:  # JSONDecodeError is a ValueError
        raise ckpt.CheckpointError(f"{candidate}: {e}") from None


def saved_configs(root: str) -> tuple[ModelConfig, RunConfig | None]:
    """The model (its description) and, for a training checkpoint, the run config saved under
    root. A training run's model keeps its configured params_dtype ("auto" resolves on the device
    that loads it); older training checkpoints without a description use the run config's model."""
    path = checkpoint_dir(root)
    state_file = os.path.join(path, "trainer_state.pt")
    if not os.path.exists(state_file):
        return model_description(root, path)[0], None
    raw = ckpt.load_torch(state_file)["config"]
    run = config_from_dict({k: v for k, v in raw.items() if k != "name"}, name=raw.get("name", "run"))
    if not os.path.isfile(os.path.join(path, DESCRIPTION)):
        return run.model, run
    model = model_description(root, path)[0]
    return dataclasses.replace(model, params_dtype=run.model.params_dtype), run


def saved_adapters(path: str) -> bool:
    """Whether the dist checkpoint at path holds LoRA adapters (from its metadata, no tensor read)."""
    from megatron.core import dist_checkpointing

    try:
        keys = dist_checkpointing.load_tensors_metadata(path).keys()
    except Exception as e:  # noqa: BLE001 - unreadable metadata: say which checkpoint
        raise ckpt.CheckpointError(f"{path}: cannot read the checkpoint metadata ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return any(k.startswith("lora.") for k in keys)


def _load_stage(model, path: str) -> None:
    nested = os.path.exists(os.path.join(path, "trainer_state.pt"))
    sd = model.sharded_state_dict()
    loaded = ckpt.load_sharded_checked({"model": sd} if nested else sd, path)
    # Strict for every weight; an `_extra_state` (TE's fp8 metadata) may be missing (checkpoint.py)
    ckpt.load_module_state(model, loaded["model"] if nested else loaded, path)


def load_weights(model, root: str, path: str | None = None) -> None:
    """Load the model weights of checkpoint `path` (default: the latest under root; a training
    run's, nested under "model", or an import's, at the top level) into a built stage, resharded
    to its layout. Every tensor the model has must be in the checkpoint, LoRA adapters included.
    Adapters in the checkpoint that the model lacks (--finetune from a LoRA run) are part of the
    weights that were trained: they are merged into the base weights, never dropped."""
    from atesd_mc.model.lora import add_lora, lora_of, merge_lora, remove_lora

    path = path or checkpoint_dir(root)
    has = saved_adapters(path)
    wants = lora_of(model) is not None
    if wants and not has:
        raise ckpt.CheckpointError(f"{path}: holds no LoRA adapters, but the model to load it into "
                                   "has them")
    if has and not wants:
        saved, source = model_description(root, path)
        if not saved.lora_rank:
            raise ckpt.CheckpointError(f"{path}: holds LoRA adapters but {source} says lora_rank 0")
        add_lora(model, saved.lora_rank, saved.lora_alpha, saved.lora_targets, 0)
        _load_stage(model, path)
        merge_lora(model)
        remove_lora(model)
        return
    _load_stage(model, path)


def load_model(root: str, model_cfg: ModelConfig, parallel: ParallelConfig, vocab: int):
    """Build this rank's stage (with the LoRA adapters model_cfg names) and load the latest
    checkpoint under root into it."""
    from atesd_mc.model.lora import add_lora
    from atesd_mc.model.qwen3 import build_stage

    model = build_stage(model_cfg, parallel, vocab)
    if model_cfg.lora_rank:
        add_lora(model, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_targets, 0)
    load_weights(model, root)
    model.eval()
    return model


def tokenizer_for(root: str, run: RunConfig | None, override: str = ""):
    """--tokenizer, else tokenizer files saved beside the checkpoint, else the run's tokenizer
    (the synthetic task's cached one is rebuilt from the run config when missing)."""
    from atesd_mc.data.tokenizer import load_tokenizer

    if override:
        return load_tokenizer(override)
    if any(os.path.exists(os.path.join(root, n)) for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return load_tokenizer(root)
    if run is not None and run.data.tokenizer:
        return load_tokenizer(run.data.tokenizer)
    if run is not None:
        from atesd_mc.tasks import build_synthetic

        return load_tokenizer(os.path.join(build_synthetic(run), "tokenizer.model"))
    raise ckpt.CheckpointError(f"{root}: no tokenizer files here; pass --tokenizer")
