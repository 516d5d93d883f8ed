"""Checkpoints: DeepSpeed's engine state plus our client state, per-rank RNG, resume and retention."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_PREFIX = "step"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    """Saves to `<run_dir>/checkpoints/<tag>/`, keeps the newest `keep`, finds what to resume from.

    The engine state (module, ZeRO optimizer partitions, LR scheduler, loss scaler, step counters) is
    DeepSpeed's own `save_checkpoint`; everything else that changes during training goes in
    `client_state`, and each rank's RNG state in a file of its own, since ranks draw different dropout.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest_tag(self) -> Optional[str]:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = tag_for_step(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state)
        torch.save(rng_state(), self.dir / tag / f"rng_rank{engine.global_rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        if engine.global_rank == 0:
            self._prune()
        return self.dir / tag

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p for p in self.dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Optional[tuple[Path, str]]:
        """Map `train.resume` to (load_dir, tag), or None to start fresh."""
        if resume == "none":
            return None
        if resume == "auto":
            tag = self.latest_tag()
            return (self.dir, tag) if tag else None
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume={resume}: no such checkpoint folder")
        if (path / "latest").is_file():
            return path, (path / "latest").read_text().strip()
        return path.parent, path.name

    def load(self, engine, resume: str) -> Optional[dict]:
        """Restore the engine and this rank's RNG; return the client state (None: fresh start)."""
        target = self.resolve(resume)
        if target is None:
            return None
        load_dir, tag = target
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        rng_file = Path(load_dir) / tag / f"rng_rank{engine.global_rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s is missing (different world size?): this rank's RNG starts afresh", rng_file)
        client_state = dict(client_state or {})
        client_state["_loaded_from"] = str(Path(load_dir) / tag)
        return client_state


def load_for_inference(run_dir: str, tag: Optional[str] = None):
    """Rebuild the trained model in fp32 from a run folder, without DeepSpeed's engine.

    Returns (model in eval mode, ModelConfig, tokenizer model path).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.config import ModelConfig
    from pipeline.model import HybridLM

    checkpoints = Checkpointer(run_dir)
    tag = tag or checkpoints.latest_tag()
    if tag is None:
        raise FileNotFoundError(f"{checkpoints.dir} holds no checkpoint (no `latest` file)")
    model_states = checkpoints.dir / tag / "mp_rank_00_model_states.pt"
    saved = torch.load(model_states, map_location="cpu", weights_only=False)
    run_config = saved["run_config"]
    model_config = ModelConfig(**run_config["model"])
    model = HybridLM(model_config)
    # The fp32 master weights live in the ZeRO optimizer partitions; the module copy may be fp16/bf16.
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints.dir), tag=tag)
    model.load_state_dict(state)
    model.float().eval()
    tokenizer = Path(run_dir) / "tokenizer.model"
    return model, model_config, str(tokenizer)
