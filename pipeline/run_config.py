"""The command line of `launch/train.py`: YAML presets plus `--section.field value` overrides, via jsonargparse."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from pipeline.config import (ConfigError, ContinualConfig, DataConfig, ModelConfig, PlasticityConfig, StabilityConfig,
                             TrainConfig)

set_parsing_settings(docstring_parse_attribute_docstrings=True)


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    stability: StabilityConfig
    deepspeed_config: str
    continual: ContinualConfig = dataclasses.field(default_factory=ContinualConfig)
    plasticity: PlasticityConfig = dataclasses.field(default_factory=PlasticityConfig)

    def __post_init__(self) -> None:
        if self.model.arch != "hybrid" and self.plasticity.stdp != "none":
            raise ConfigError("plasticity.stdp acts on the hybrid's spiking synapses, so it needs model.arch=hybrid")
        # A continual schedule sums its tasks' steps (checked against max_steps when it is resolved at start).
        if not self.continual.enabled and self.train.max_steps <= 0:
            raise ConfigError("train.max_steps must be positive")
        if self.continual.num_tasks and self.train.max_steps < self.continual.num_tasks:
            raise ConfigError(f"train.max_steps ({self.train.max_steps}) must give each of continual.num_tasks="
                              f"{self.continual.num_tasks} tasks at least one step")

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "stability": dataclasses.asdict(self.stability),
                "continual": dataclasses.asdict(self.continual), "plasticity": dataclasses.asdict(self.plasticity),
                "deepspeed_config": self.deepspeed_config}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="launch/train.py", default_env=False,
                            description="Train the hybrid liquid/spiking/Mamba LM with DeepSpeed ZeRO-2.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with model/data/train sections (a preset)")
    parser.add_argument("--deepspeed_config", type=str, default="ds_configs/cpu.json",
                        help="DeepSpeed JSON: precision, ZeRO, clipping, batch sizes")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_class_arguments(ModelConfig, "model")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(TrainConfig, "train")
    parser.add_class_arguments(StabilityConfig, "stability")
    parser.add_class_arguments(ContinualConfig, "continual")
    parser.add_class_arguments(PlasticityConfig, "plasticity")
    return parser


def parse_run_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    built = parser.instantiate(namespace)
    return RunConfig(model=built.model, data=built.data, train=built.train, stability=built.stability,
                     deepspeed_config=built.deepspeed_config, continual=built.continual,
                     plasticity=built.plasticity)


def load_yaml_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Parse a preset exactly as the trainer would (used by tests and tools)."""
    return parse_run_config(["--config", path, *overrides])
