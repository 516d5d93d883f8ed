"""DeepSpeed engine construction: config checks, optimizer, LR schedule, `deepspeed.initialize`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.config import ConfigError, TrainConfig


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed JSON that cannot run here; the message names the file and the key."""


def load_deepspeed_config(path: str, train: TrainConfig) -> dict:
    """Read the DeepSpeed JSON and apply the run's batch overrides.

    The returned dict is what `deepspeed.initialize` gets; it is also saved in the run folder.
    """
    file = Path(path)
    if not file.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: line {err.lineno}: {err.msg}") from None
    if train.micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    if train.gradient_accumulation_steps is not None:
        config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    # DeepSpeed's own monitors, switched on from the run config; MetricsSink feeds them every record.
    if train.tensorboard:
        config["tensorboard"] = {"enabled": True, "output_path": train.tensorboard, "job_name": "metrics"}
    if train.csv:
        config["csv_monitor"] = {"enabled": True, "output_path": train.csv, "job_name": "metrics"}
    # train_batch_size is derived by DeepSpeed from micro batch x accumulation x world size;
    # a stale value in the JSON would contradict a command-line override.
    config.pop("train_batch_size", None)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise DeepSpeedConfigError(f"DeepSpeed config {path}: `{key}` must be a positive integer "
                                       f"(or set train.{'micro_batch_size' if key.startswith('train') else key})")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage != 2:
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: zero_optimization.stage is {stage}; this pipeline is "
                                   "built and tested for ZeRO stage 2")
    if "optimizer" in config or "scheduler" in config:
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: remove the `optimizer`/`scheduler` blocks; the optimizer "
                                   "and LR schedule come from the run config's train.* fields (one source of truth)")
    return config


def precision_of(ds_config: dict) -> str:
    if ds_config.get("fp16", {}).get("enabled", False):
        return "fp16"
    if ds_config.get("bf16", {}).get("enabled", False):
        return "bf16"
    return "fp32"


def check_precision_supported(ds_config: dict, config_path: str, allow_cpu_fp16: bool) -> None:
    """Fail at once, in one sentence, where DeepSpeed would fail deep inside initialize()."""
    from deepspeed.accelerator import get_accelerator

    from pipeline.engine.ds_adapter import allow_fp16_on_cpu, check_version

    check_version()
    accelerator = get_accelerator()
    precision = precision_of(ds_config)
    if precision == "fp16" and allow_cpu_fp16 and accelerator.device_name() == "cpu":
        allow_fp16_on_cpu(accelerator)
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise DeepSpeedConfigError(
            f"{config_path} trains in fp16, which the {accelerator.device_name()} accelerator here does not support: "
            "use ds_configs/bf16.json on GPUs without fp16, ds_configs/cpu.json on CPU-only machines instead.")
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise DeepSpeedConfigError(
            f"{config_path} trains in bf16, which the {accelerator.device_name()} accelerator here does not support: "
            "use ds_configs/fp16_stable.json (GPUs before Ampere) or ds_configs/cpu.json instead.")


def initialize(model: torch.nn.Module, ds_config: dict, train: TrainConfig, lr_scheduler=None, plasticity=None):
    """`deepspeed.initialize` with AdamW over the model's own parameter groups.

    `lr_scheduler`: a factory of another LR schedule (a continual schedule's per-task one); default the plain run's
    (pipeline/engine/lr.py).
    `plasticity`: a PlasticityConfig; with `meta` on, the optimizer is `MetaAdamW` (pipeline/plasticity/meta.py)."""
    import deepspeed

    from pipeline.engine.lr import build_lr_scheduler

    groups = model.parameter_groups(train.weight_decay) if hasattr(model, "parameter_groups") else model.parameters()
    # torch's AdamW is on ZeRO's list of supported optimizers; DeepSpeed's fused/CPU Adam would need a
    # compiled op per machine, and the optimizer is never the bottleneck at this model size.
    optimizer_class = torch.optim.AdamW
    if plasticity is not None and plasticity.meta:
        from pipeline.plasticity.meta import MetaAdamW, metaplastic_groups

        # Metaplasticity scales the update inside the optimizer (matrices only: 1-D parameters get meta=0).
        # ZeRO refuses optimizer classes off its list unless told otherwise; recorded in the run's ds_config.json.
        groups, optimizer_class = metaplastic_groups(groups, plasticity.meta_strength), MetaAdamW
        ds_config["zero_allow_untested_optimizer"] = True
    optimizer = optimizer_class(groups, lr=train.lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=lr_scheduler or build_lr_scheduler(train),
                                                   config=ds_config)
    return engine, scheduler


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels; must run before CUDA is initialised (cuBLAS reads its workspace setting once)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def configure_cpu_threads() -> None:
    """Split the cores among the ranks of this node; without it each rank takes every core and they thrash."""
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))
