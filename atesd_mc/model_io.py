"""Open a saved model for inference: a training checkpoint or an imported HF checkpoint.

A training checkpoint (atesd_mc.run_state) has trainer_state.pt with the run config, and its
dist checkpoint nests the model under "model"; an import (tools/convert_checkpoint.py import-hf)
has model_config.json and the model at the top level. Both are Megatron layouts with a tracker
file, and dist_checkpointing reshards them to the current TP/PP layout."""
from __future__ import annotations

import json
import os

from atesd_mc import checkpoint as ckpt
from atesd_mc.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from atesd_mc.config_io import config_from_dict


def saved_configs(root: str) -> tuple[ModelConfig, RunConfig | None]:
    """The model config (and the run config, for a training checkpoint) saved under root."""
    step = ckpt.latest_step(root)
    if step is None:
        raise ckpt.CheckpointError(f"{root}: no {ckpt.TRACKER} (not a checkpoint directory)")
    path = ckpt.iter_dir(root, step)
    state_file = os.path.join(path, "trainer_state.pt")
    if os.path.exists(state_file):
        raw = ckpt.load_torch(state_file)["config"]
        run = config_from_dict({k: v for k, v in raw.items() if k != "name"}, name=raw.get("name", "run"))
        return run.model, run
    model_file = os.path.join(root, "model_config.json")
    if not os.path.exists(model_file):
        raise ckpt.CheckpointError(f"{path}: neither trainer_state.pt nor {model_file} says what model this is")
    with open(model_file) as f:
        fields = json.load(f)
    try:
        return ModelConfig(**fields), None
    except (TypeError, ConfigError) as e:
        raise ckpt.CheckpointError(f"{model_file}: {e}") from None


def load_weights(model, root: str) -> None:
    """Load the model weights of the latest checkpoint under root (a training run's, nested under
    "model", or an import's, at the top level) into a built stage; resharded to its layout."""
    path = ckpt.iter_dir(root, ckpt.latest_step(root))
    nested = os.path.exists(os.path.join(path, "trainer_state.pt"))
    sd = model.sharded_state_dict()
    loaded = ckpt.load_sharded_checked({"model": sd} if nested else sd, path)
    model.load_state_dict(loaded["model"] if nested else loaded, strict=False)


def load_model(root: str, model_cfg: ModelConfig, parallel: ParallelConfig, vocab: int):
    """Build this rank's stage and load the latest checkpoint under root into it."""
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
