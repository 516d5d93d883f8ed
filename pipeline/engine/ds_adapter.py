"""The one module that reads or writes anything private of DeepSpeed (tests/test_ds_adapter.py proves each
accessor against the pinned version; a static test there fails on such access anywhere else).

Private here means: not in DeepSpeed's documented API, so a release may rename or drop it without notice.
`check_version()` fails at start, in one sentence, on a DeepSpeed this was not tested with.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from typing import Optional

from pipeline.config import ConfigError

TESTED_VERSIONS = ("0.19.8",)  # requirements.txt pins the first


def check_version(version: Optional[str] = None) -> None:
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if version.split("+")[0] not in TESTED_VERSIONS:
        raise ConfigError(f"DeepSpeed {version} is installed, but this pipeline reaches into DeepSpeed internals "
                          f"(pipeline/engine/ds_adapter.py) tested only with {', '.join(TESTED_VERSIONS)}: install "
                          f"deepspeed=={TESTED_VERSIONS[0]} (requirements.txt)")


# ---- the fp16 loss scaler (ZeRO's DynamicLossScaler) -----------------------------------------------
class LossScaler:
    """The engine's dynamic fp16 loss scaler, or `None` from `of(engine)` when there is none (bf16, fp32, static)."""

    def __init__(self, scaler):
        self._s = scaler

    @classmethod
    def of(cls, engine) -> Optional["LossScaler"]:
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        return cls(scaler) if getattr(scaler, "dynamic", False) else None

    @property
    def scale(self) -> float:
        return float(self._s.cur_scale)

    @property
    def hysteresis(self) -> int:
        return int(self._s.cur_hysteresis)

    @property
    def minimum(self) -> float:
        return self._s.min_scale

    def at_minimum(self, scale_before: float, hysteresis_before: int) -> bool:
        """An overflow from this state leaves the scale where it is: DeepSpeed's point of no progress."""
        return scale_before <= self._s.min_scale and (self._s.delayed_shift == 1 or hysteresis_before == 1)

    def raise_at_min_scale(self, enabled: bool) -> None:
        self._s.raise_error_at_min_scale = enabled

    def reset(self, fp16: dict) -> None:
        """Restart from the DeepSpeed JSON's `fp16` block, as a fresh engine would."""
        s = self._s
        s.cur_scale = float(2 ** fp16.get("initial_scale_power", 16))
        s.scale_window = fp16.get("loss_scale_window", s.scale_window)
        s.min_scale = fp16.get("min_loss_scale", s.min_scale)
        s.delayed_shift = s.cur_hysteresis = fp16.get("hysteresis", s.delayed_shift)
        s.consecutive_hysteresis = fp16.get("consecutive_hysteresis", s.consecutive_hysteresis)
        s.last_overflow_iter = s.cur_iter - 1


def current_loss_scale(engine) -> float:
    """The scale the engine multiplies the loss by now (1.0 without a scaler)."""
    return float(getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", 1.0))


# ---- fp32 master weights under ZeRO-1/2 ----------------------------------------------------------
def has_fp32_master(param) -> bool:
    """Whether `param` is a ZeRO-managed module weight with an fp32 master fragment (`_hp_mapping`)."""
    return hasattr(param, "_hp_mapping")


def get_full_fp32(param):
    """The full fp32 master weight: DeepSpeed's accessor under ZeRO (a collective), else a copy of the weight."""
    if has_fp32_master(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.detach().float().clone()


def set_full_fp32(param, value) -> None:
    """Write `value` into the fp32 master (each rank its own fragment) and into the module weight, so that the two
    agree at once (the master alone reaches the module only at the next step: a one-step lag)."""
    if has_fp32_master(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)
    param.data.copy_(value.to(param.dtype))


def fragment_address(param) -> Optional[tuple]:
    """(optimizer group index, start, numel) of this rank's slice of `param` in its group's flat fp32 partition."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.hp_fragment_address
    return mapping.param_group_index, address.start, address.numel


def inner_optimizer(engine):
    """The torch optimizer that ZeRO wraps (it calls its `step` on the flat fp32 partitions)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


# ---- checkpoints ---------------------------------------------------------------------------------
@contextlib.contextmanager
def loading_universal(engine, enabled: bool = True):
    """DeepSpeed reads `checkpoint.load_universal` from its JSON at initialize(); a resume decides later, for one load."""
    if enabled:
        engine._config.load_universal_checkpoint = True
    try:
        yield
    finally:
        if enabled:
            engine._config.load_universal_checkpoint = False


def ds_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's `ds_to_universal` script, in this process and quiet."""
    from deepspeed.checkpoint import ds_to_universal as script

    # inject_missing_state: our checkpoints carry no Megatron-style universal_checkpoint_info (nothing to
    # merge across tensor-parallel ranks); one worker each: no process pool forked from a training rank.
    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report would land in the middle of our log
        script.main(args)


# ---- accelerator and communication ---------------------------------------------------------------
def allow_fp16_on_cpu(accelerator) -> None:
    """DeepSpeed's ZeRO-2 fp16 optimizer and loss scaler run on CPU once the accelerator admits fp16; the fp16
    arithmetic itself is emulated (slow), which is fine for drills."""
    accelerator.is_fp16_supported = lambda: True


def shm_buffer_path(rank: int) -> str:
    """The /dev/shm file of DeepSpeed's CPU shared-memory allreduce for `rank` (named after master address and port)."""
    return os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                                    f"{os.environ.get('MASTER_PORT')}_{rank}")
