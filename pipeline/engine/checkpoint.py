"""Checkpoints: DeepSpeed's engine state plus our client state, per-rank RNG, resume and retention."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import comm

log = logging.getLogger(__name__)

TAG_PREFIX = "step"
RNG_FILE = "rng_rank{rank}.pt"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def accelerator_rng_states(accelerator=None) -> dict:
    """The generator state of every accelerator device this process sees (dropout on GPU draws from these).

    On DeepSpeed's CPU accelerator the device generator is torch's CPU generator, saved as `torch`.
    """
    accelerator = accelerator or _accelerator()
    name = accelerator.device_name()
    if name == "cpu":
        return {"device": name, "states": []}
    return {"device": name, "states": [accelerator.get_rng_state(i) for i in range(accelerator.device_count())]}


def set_accelerator_rng_states(saved: dict, accelerator=None) -> None:
    accelerator = accelerator or _accelerator()
    states = saved.get("states", [])
    if not states:
        return
    if saved.get("device") != accelerator.device_name():
        log.warning("the checkpoint's accelerator RNG states are from %s devices, this process runs on %s: "
                    "they are not restored", saved.get("device"), accelerator.device_name())
        return
    count = accelerator.device_count()
    if count != len(states):
        log.warning("the checkpoint holds RNG states of %d %s devices, this process sees %d: restoring the first %d",
                    len(states), saved["device"], count, min(count, len(states)))
    for index, state in enumerate(states[:count]):
        accelerator.set_rng_state(state, index)


def rng_state(accelerator=None) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": accelerator_rng_states(accelerator)}


def set_rng_state(state: dict, accelerator=None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        set_accelerator_rng_states(state["accelerator"], accelerator)


class ClientState:
    """The registry of everything a checkpoint carries besides DeepSpeed's engine state.

    Each component (data reader, stability counters, task schedule, ...) is registered once under a
    name and must have `state_dict()` and `load_state_dict(state)`; saving, loading and resuming all
    walk this one list, so adding state to the run is one `register` call.
    """

    def __init__(self):
        self._components: dict[str, object] = {}

    def register(self, name: str, component) -> None:
        if name in self._components:
            raise ValueError(f"checkpoint state {name!r} is registered twice")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(component, method, None)):
                raise TypeError(f"checkpoint state {name!r} ({type(component).__name__}) has no {method}()")
        self._components[name] = component

    def names(self) -> list[str]:
        return list(self._components)

    def state_dict(self) -> dict:
        return {name: component.state_dict() for name, component in self._components.items()}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        missing = [name for name in self._components if name not in state]
        if missing:
            raise KeyError(f"{source} holds no state for {', '.join(missing)}: it was written by another version "
                           "of the trainer or another kind of run")
        for name, component in self._components.items():
            component.load_state_dict(state[name])


class RunConfigRecord:
    """The run config, saved in every checkpoint (`load_for_inference` rebuilds the model from it).

    On resume it notes which settings differ from the checkpoint's, for the log."""

    def __init__(self, config: dict):
        self.config = config
        self.changed: list[str] = []

    def state_dict(self) -> dict:
        return self.config

    def load_state_dict(self, saved: dict) -> None:
        self.changed = sorted(f"{section}.{key}" for section, values in self.config.items() if isinstance(values, dict)
                              for key, value in values.items()
                              if isinstance(saved.get(section), dict) and saved[section].get(key, value) != value)


class Checkpointer:
    """Saves to `<run_dir>/checkpoints/<tag>/`, keeps the newest `keep`, finds what to resume from.

    The engine state (module, ZeRO optimizer partitions, LR scheduler, loss scaler, step counters) is
    DeepSpeed's own `save_checkpoint`; everything else that changes during training is the registered
    `states`, saved as DeepSpeed's client state, and each rank's RNG state goes in a file of its own,
    since ranks draw different dropout.
    """

    def __init__(self, run_dir: str | Path, states: Optional[ClientState] = None, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.states = states if states is not None else ClientState()
        self.keep = keep

    def latest_tag(self) -> Optional[str]:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, step: int) -> Path:
        tag = tag_for_step(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=self.states.state_dict())
        torch.save(rng_state(), self.dir / tag / RNG_FILE.format(rank=engine.global_rank))
        comm.barrier()
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

    def load(self, engine, resume: str) -> Optional[Path]:
        """Restore the engine, every registered state and this rank's RNG; return the folder (None: fresh start)."""
        target = self.resolve(resume)
        if target is None:
            return None
        load_dir, tag = target
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        folder = Path(load_dir) / tag
        self.states.load_state_dict(client_state or {}, source=str(folder))
        rng_file = folder / RNG_FILE.format(rank=engine.global_rank)
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s is missing (different world size?): this rank's RNG starts afresh", rng_file)
        return folder


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
