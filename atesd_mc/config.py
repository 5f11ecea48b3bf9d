"""Run configuration: one dataclass per concern, loaded from YAML and overridden by flags.

Every field becomes a Megatron-style ``--kebab-case`` flag and a YAML key; the parsing lives in
atesd_mc.config_io, which imports this module (never the reverse).
Validation happens in ``__post_init__`` of each section and in :meth:`RunConfig.validate_world`
for rules that need the world size; every error names the field and the offending value.

The sections live in three modules by concern (config_model: the model and its parallel layout;
config_method: rollouts, loss, exposure, controller; config_train: data, optimisation, checkpoints,
logging) and the shared validation helpers in config_check; every name is importable from here.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from atesd_mc.config_check import ConfigError, require
from atesd_mc.config_method import ControllerConfig, ExposureConfig, GenerationConfig, LossConfig
from atesd_mc.config_model import ModelConfig, ParallelConfig
from atesd_mc.config_train import CheckpointConfig, DataConfig, LoggingConfig, TrainConfig

__all__ = [
    "ConfigError", "SECTIONS", "RunConfig", "ModelConfig", "ParallelConfig", "DataConfig",
    "GenerationConfig", "LossConfig", "ExposureConfig", "ControllerConfig", "TrainConfig",
    "CheckpointConfig", "LoggingConfig",
]


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
    "generation": GenerationConfig, "loss": LossConfig, "exposure": ExposureConfig,
    "controller": ControllerConfig, "train": TrainConfig, "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The whole run: one instance of each section."""

    name: str = "tiny_arith"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> str:
        return self.checkpoint.save or os.path.join("runs", self.name)

    def validate_world(self, world_size: int) -> int:
        """Checks that need the world size; returns the data-parallel size."""
        p, m = self.parallel, self.model
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        require(world_size % (tp * pp) == 0, "tensor_model_parallel_size", tp,
                f"tensor_model_parallel_size*pipeline_model_parallel_size={tp * pp} must divide the "
                f"world size {world_size}")
        require(m.num_attention_heads % tp == 0, "tensor_model_parallel_size", tp,
                f"must divide num_attention_heads={m.num_attention_heads}")
        require(m.num_query_groups % tp == 0, "tensor_model_parallel_size", tp,
                f"must divide num_query_groups={m.num_query_groups}")
        require(m.ffn_hidden_size % tp == 0, "tensor_model_parallel_size", tp,
                f"must divide ffn_hidden_size={m.ffn_hidden_size}")
        require(m.num_layers % pp == 0, "pipeline_model_parallel_size", pp,
                f"must divide num_layers={m.num_layers}")
        dp = world_size // (tp * pp)
        t = self.train
        require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "global_batch_size",
                t.global_batch_size, f"must be a multiple of micro_batch_size*data_parallel_size="
                f"{t.micro_batch_size * dp}")
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
