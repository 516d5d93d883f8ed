"""Checkpoints: DeepSpeed's engine state plus our client state, per-rank RNG, checksums, resume (at any
world size) and retention."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import comm
from pipeline.engine import ds_adapter

log = logging.getLogger(__name__)

TAG_PREFIX = "step"
RNG_FILE = "rng_rank{rank}.pt"
CHECKSUM_FILE = "checksums.json"
UNIVERSAL_PREFIX = "universal-"  # `<checkpoints>/universal-<tag>/`: a tag converted for another world size
CORRUPT_PREFIX = "corrupt-"  # a tag that failed its checksums, kept for inspection, out of resume's way
# A tag "from the future" of an explicit resume from an older checkpoint: another trajectory, kept for
# inspection, never pruned and never chosen by `resume auto`.
ABANDONED_PREFIX = "abandoned-"
RESUME_RECORD = "resume_applied.json"  # the explicit `--train.resume PATH` this run folder last started from
BEST_RECORD = "best.json"  # inside `best/`: its step and validation loss
ZERO_PARTITIONS = "*_optim_states.pt"  # one per data-parallel rank under ZeRO-1/2


class CheckpointError(RuntimeError):
    """No checkpoint to resume from where one was asked for; the message names the folder and the problem."""


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
        self._optional: set[str] = set()

    def register(self, name: str, component, optional: bool = False) -> None:
        """`optional`: a checkpoint written before this state existed still loads; the component keeps
        its fresh state (only for state whose absence changes no result, such as bookkeeping)."""
        if name in self._components:
            raise ValueError(f"checkpoint state {name!r} is registered twice")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(component, method, None)):
                raise TypeError(f"checkpoint state {name!r} ({type(component).__name__}) has no {method}()")
        self._components[name] = component
        if optional:
            self._optional.add(name)

    def names(self) -> list[str]:
        return list(self._components)

    def state_dict(self) -> dict:
        return {name: component.state_dict() for name, component in self._components.items()}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        missing = [name for name in self._components if name not in state and name not in self._optional]
        if missing:
            raise KeyError(f"{source} holds no state for {', '.join(missing)}: it was written by another version "
                           "of the trainer or another kind of run")
        for name, component in self._components.items():
            if name in state:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_WRITER = re.compile(r"(?:pp_rank_|rng_rank)(\d+)")  # zero_pp_rank_<r>_..._optim_states.pt, rng_rank<r>.pt


def _writer(name: str) -> int:
    """The rank that wrote a checkpoint file: its ZeRO partition and RNG state; rank 0 the shared files."""
    match = _WRITER.search(name)
    return int(match.group(1)) if match else 0


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUM_FILE))


def hash_own_files(folder: Path, rank: int) -> None:
    """Rank `rank`'s part of the checksums: size and sha256 of the files it wrote, in `checksums.json.rank<r>`.

    Each rank hashes its own optimizer partition, so the time is that of one partition, not of all.
    """
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _checkpoint_files(folder) if _writer(p.name) == rank}
    (folder / f"{CHECKSUM_FILE}.rank{rank}").write_text(json.dumps(files))


def write_checksums(folder: Path) -> None:
    """Merge the ranks' parts into `checksums.json`, hashing here whatever no part covers; written last,
    it also marks the save as finished."""
    files: dict = {}
    for part in sorted(folder.glob(f"{CHECKSUM_FILE}.rank*")):
        files.update(json.loads(part.read_text()))
    for path in _checkpoint_files(folder):
        if path.name not in files:
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    tmp = folder / f"{CHECKSUM_FILE}.tmp"
    tmp.write_text(json.dumps({"format": 1, "files": dict(sorted(files.items()))}, indent=1))
    os.replace(tmp, folder / CHECKSUM_FILE)  # complete or absent, never half written
    for part in folder.glob(f"{CHECKSUM_FILE}.rank*"):
        part.unlink()


def verify_checksums(folder: Path) -> Optional[str]:
    """None when every file listed in the folder's checksums.json is intact; otherwise what is wrong, by file."""
    listing = folder / CHECKSUM_FILE
    if not listing.is_file():
        return f"{listing} is missing, so its save did not finish"
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{listing} is unreadable ({err})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes where {expected['bytes']} were written ({'truncated' if size < expected['bytes'] else 'changed'})"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match the sha256 in {CHECKSUM_FILE} (corrupt)"
    return None


def saved_world_size(folder: Path) -> int:
    """Data-parallel ranks that wrote a ZeRO-1/2 checkpoint (its optimizer partitions); 0 if it holds none."""
    return len(list(folder.glob(ZERO_PARTITIONS)))


def convert_to_universal(folder: Path) -> Path:
    """DeepSpeed's `ds_to_universal`, run here, into `<checkpoints>/universal-<tag>/` (reused when present).

    The output cannot live inside the tag folder: DeepSpeed's checkpoint reader walks subfolders.
    """
    out = folder.parent / f"{UNIVERSAL_PREFIX}{folder.name}"
    if (out / "zero" / "optimizer_state.pt").is_file():
        return out
    tmp = folder.parent / f"{UNIVERSAL_PREFIX}{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds_adapter.ds_to_universal(str(folder), str(tmp))
    (folder.parent / "latest_universal").unlink(missing_ok=True)  # it names the .tmp folder; we never read it
    os.replace(tmp, out)  # complete or absent
    return out


BEST_TAG = "best"


class BestCheckpoint:
    """The lowest validation loss so far and its step: the trainer keeps that step's checkpoint as `best`.

    Every rank gets the same all-reduced evaluation loss, so every rank takes the same decision."""

    def __init__(self):
        self.loss = math.inf
        self.step: Optional[int] = None

    def improved(self, step: int, loss: float) -> bool:
        if step > 0 and loss < self.loss:  # step 0 is the untrained model: nothing worth keeping
            self.loss, self.step = loss, step
            return True
        return False

    def state_dict(self) -> dict:
        return {"loss": self.loss, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.step = state["loss"], state["step"]

    def at_least_as_good_as(self, on_disk: Optional[dict]) -> None:
        """After a rollback the restored record may be worse than the `best` folder on disk (written on
        the abandoned trajectory): only a model better than the one kept there may replace it."""
        if on_disk and on_disk.get("loss") is not None and on_disk["loss"] < self.loss:
            self.loss, self.step = on_disk["loss"], on_disk.get("step")


class Checkpointer:
    """Saves to `<run_dir>/checkpoints/<tag>/`, keeps the newest `keep`, finds what to resume from.

    The engine state (module, ZeRO optimizer partitions, LR scheduler, loss scaler, step counters) is
    DeepSpeed's own `save_checkpoint`; everything else that changes during training is the registered
    `states`, saved as DeepSpeed's client state, and each rank's RNG state goes in a file of its own,
    since ranks draw different dropout. Rank 0 then writes `checksums.json` (size and sha256 of every
    file). `load` verifies them: `resume auto` passes over a damaged newest checkpoint to the
    previous one, with a warning naming the file, and a checkpoint written at another world size is
    converted to DeepSpeed's universal format and loaded from it.
    """

    def __init__(self, run_dir: str | Path, states: Optional[ClientState] = None, keep: int = 2,
                 best: Optional[BestCheckpoint] = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.states = states if states is not None else ClientState()
        self.keep = keep
        self.best = best

    def latest_tag(self) -> Optional[str]:
        latest = self.dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def tags(self) -> list[str]:
        """Checkpoint folders, oldest first."""
        return sorted(p.name for p in self.dir.glob(f"{TAG_PREFIX}*")
                      if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit())

    def save(self, engine, step: int, tag: Optional[str] = None) -> Path:
        """A checkpoint of `step` under `step<N>`, or under `tag` (e.g. `best`): such a checkpoint is never
        pruned and never becomes DeepSpeed's `latest`, so `--train.resume auto` does not pick it."""
        final = tag or tag_for_step(step)
        # A named checkpoint (`best`) replaces one that must stay whole until its successor is: it is
        # written beside it and swapped in by renames. A step folder is new, or a failed earlier attempt.
        tag = final if final.startswith(TAG_PREFIX) else f"{final}.tmp"
        folder = self.dir / tag
        if engine.global_rank == 0:
            # The same step saved by an earlier attempt (a crash, a resume from an older checkpoint): its
            # files (another world size's partitions, its conversion) must not mix with these.
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(self.dir / f"{UNIVERSAL_PREFIX}{final}", ignore_errors=True)
        comm.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=self.states.state_dict(),
                               save_latest=tag.startswith(TAG_PREFIX))
        torch.save(rng_state(), folder / RNG_FILE.format(rank=engine.global_rank))
        comm.barrier()  # every file is written
        hash_own_files(folder, engine.global_rank)
        comm.barrier()
        if engine.global_rank == 0:
            # The folder is shared by all ranks (a shared filesystem, as DeepSpeed's own loading assumes).
            write_checksums(folder)
            if tag != final:
                if final == BEST_TAG and self.best is not None:
                    (folder / BEST_RECORD).write_text(json.dumps(self.best.state_dict()))
                folder = self._swap_in(folder, self.dir / final)
            self._prune()
        comm.barrier()  # no rank leaves, or exits on preemption, before the checkpoint is complete
        return self.dir / final

    @staticmethod
    def _swap_in(new: Path, final: Path) -> Path:
        """`new` replaces `final`; at every moment one complete copy exists (`final`, or `final.old`,
        which `_recover_named` puts back after a crash between the two renames)."""
        old = final.with_name(f"{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def _recover_named(self) -> None:
        """Rank 0, before choosing: finish or undo a swap of a named checkpoint cut short by a crash."""
        if not self.dir.is_dir():
            return
        for old in self.dir.glob("*.old"):
            final = old.with_name(old.name[:-len(".old")])
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(final)
        for tmp in self.dir.glob("*.tmp"):
            if not tmp.name.startswith(UNIVERSAL_PREFIX):
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.tags()[:-self.keep]:
            shutil.rmtree(self.dir / old, ignore_errors=True)
            shutil.rmtree(self.dir / f"{UNIVERSAL_PREFIX}{old}", ignore_errors=True)

    def _plan(self, resume: str) -> dict:
        """Rank 0's choice of what to load, for every rank: a JSON-able dict (see `load`)."""
        plan = {"folder": None, "rejected": [], "error": None, "saved_world_size": 0, "explicit": False,
                "note": None, "best_on_disk": None}
        self._recover_named()
        best_record = self.dir / BEST_TAG / BEST_RECORD
        if best_record.is_file():
            plan["best_on_disk"] = json.loads(best_record.read_text())
        if resume == "none":
            return plan
        if resume != "auto":
            newer = self._progress_since(resume)
            if newer:
                # An explicit resume in a batch command is given again on every requeue and restart: once
                # this run has saved on from it, the newest checkpoint wins, or the job would loop.
                plan["note"] = f"train.resume={resume} was applied before and {newer}: resuming from the newest checkpoint"
                resume = "auto"
        if resume == "auto":
            tags = self.tags()
            if not any((self.dir / tag / CHECKSUM_FILE).is_file() for tag in tags):
                # Written before checksums existed (or nothing there): DeepSpeed's `latest`, as always.
                tag = self.latest_tag()
                folder = self.dir / tag if tag else None
            else:
                # Newest first, but not past DeepSpeed's `latest`: a higher step is what a run resumed from
                # an older checkpoint left behind, or a save cut short before it moved `latest`.
                latest = self.latest_tag()
                if latest is not None:
                    tags = [tag for tag in tags if tag <= latest]
                folder = None
                for tag in reversed(tags):
                    problem = verify_checksums(self.dir / tag)
                    if problem is None:
                        folder = self.dir / tag
                        break
                    plan["rejected"].append([tag, problem])
                if folder is None:
                    plan["error"] = (f"no intact checkpoint in {self.dir}: " + "; ".join(p for _, p in plan["rejected"]) +
                                     ". Start over with --train.resume none, or repair and name one with --train.resume")
                    return plan
        else:
            folder = Path(resume)
            if not folder.is_dir():
                plan["error"] = f"train.resume={resume}: no such checkpoint folder"
                return plan
            if (folder / "latest").is_file():  # a run's checkpoints/ folder: its newest
                folder = folder / (folder / "latest").read_text().strip()
            if (folder / CHECKSUM_FILE).is_file():
                problem = verify_checksums(folder)
                if problem is not None:
                    plan["error"] = f"train.resume={resume}: {problem}"
                    return plan
            plan["explicit"] = True
        if folder is not None:
            plan["folder"] = str(folder)
            plan["saved_world_size"] = saved_world_size(folder)
        return plan

    def _progress_since(self, resume: str) -> Optional[str]:
        """Why an explicit resume is stale (None: it is not): this is a restarted SLURM job, or a
        checkpoint was written in this run folder after the same resume was last applied."""
        intact = [tag for tag in self.tags() if (self.dir / tag / CHECKSUM_FILE).is_file()]
        if not intact:
            return None
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        if restarts.isdigit() and int(restarts) > 0:
            return f"this is restart {restarts} of SLURM job {os.environ.get('SLURM_JOB_ID', '?')}"
        record = self.dir / RESUME_RECORD
        if not record.is_file():
            return None
        applied = json.loads(record.read_text())
        if applied.get("resume") != str(Path(resume).resolve()):
            return None
        written = [tag for tag in intact if (self.dir / tag / CHECKSUM_FILE).stat().st_mtime > applied["time"]]
        return f"{written[-1]} was written since" if written else None

    def _set_aside_future(self, step: int, resume: str) -> None:
        """Rank 0, after an explicit resume at `step`: every checkpoint of a later step belongs to the
        abandoned trajectory. Renamed (not deleted) out of pruning's and `resume auto`'s way, so the
        checkpoints this run writes next are the newest."""
        for tag in self.tags():
            if int(tag[len(TAG_PREFIX):]) > step:
                target = self.dir / f"{ABANDONED_PREFIX}{tag}"
                n = 1
                while target.exists():
                    target, n = self.dir / f"{ABANDONED_PREFIX}{tag}.{n}", n + 1
                (self.dir / tag).rename(target)
                shutil.rmtree(self.dir / f"{UNIVERSAL_PREFIX}{tag}", ignore_errors=True)
                log.warning("%s is later than the explicitly resumed step %d: set aside as %s (another trajectory; "
                            "never pruned or resumed automatically)", tag, step, target.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / RESUME_RECORD).write_text(json.dumps({"resume": str(Path(resume).resolve()), "step": step,
                                                          "time": time.time()}))
        own = self.dir / tag_for_step(step)
        if own.is_dir():
            (self.dir / "latest").write_text(own.name)  # for generate.py and zero_to_fp32 until the next save

    def _convert(self, folder: Path, saved: int, world_size: int) -> str:
        """Collective: rank 0 converts `folder` to a universal checkpoint; returns the tag to load.

        ZeRO's optimizer partitions are cut for the world size that saved them; DeepSpeed's universal
        checkpoint holds every parameter's fp32 weights and Adam moments whole, for any world size.
        """
        error = None
        if comm.world()[0] == 0:
            log.info("%s was written by %d ranks, this run has %d: converting it to DeepSpeed's universal "
                     "checkpoint format (ds_to_universal)", folder, saved, world_size)
            try:
                log.info("universal checkpoint: %s", convert_to_universal(folder))
            except Exception as err:  # every rank must hear of it, or the others wait forever
                error = f"converting {folder} to a universal checkpoint failed: {type(err).__name__}: {err}"
        error = comm.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        return f"{UNIVERSAL_PREFIX}{folder.name}"

    def load(self, engine, resume: str) -> Optional[Path]:
        """Restore the engine, every registered state and this rank's RNG; return the folder (None: fresh start).

        Rank 0 verifies and chooses, every rank loads what it chose (one broadcast).
        """
        rank, world_size = comm.world()
        plan = comm.broadcast_object(self._plan(resume) if rank == 0 else None)
        if plan["error"]:
            raise CheckpointError(plan["error"])
        if rank == 0 and plan["note"]:
            log.warning("%s", plan["note"])
        if rank == 0 and plan["rejected"]:
            for tag, problem in plan["rejected"]:
                log.warning("checkpoint %s is damaged: %s. It is moved to %s%s and an older checkpoint is used",
                            tag, problem, CORRUPT_PREFIX, tag)
                shutil.rmtree(self.dir / f"{CORRUPT_PREFIX}{tag}", ignore_errors=True)
                (self.dir / tag).rename(self.dir / f"{CORRUPT_PREFIX}{tag}")
            (self.dir / "latest").write_text(Path(plan["folder"]).name)  # for generate.py and zero_to_fp32
        if plan["folder"] is None:
            return None
        folder = Path(plan["folder"])
        saved = plan["saved_world_size"]
        load_dir, tag = folder.parent, folder.name
        universal = bool(saved) and saved != world_size
        if universal:
            tag = self._convert(folder, saved, world_size)
        with ds_adapter.loading_universal(engine, universal):
            path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        self.states.load_state_dict(client_state or {}, source=str(folder))
        if self.best is not None:
            self.best.at_least_as_good_as(plan["best_on_disk"])
        rng_file = folder / RNG_FILE.format(rank=engine.global_rank)
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s is missing (written by %d ranks): this rank's RNG starts afresh", rng_file, saved)
        if plan["explicit"]:
            if rank == 0:
                self._set_aside_future(self._resumed_step(engine, folder), resume)
            comm.barrier()
        return folder

    @staticmethod
    def _resumed_step(engine, folder: Path) -> int:
        step = getattr(engine, "global_steps", None)
        if step is None and folder.name.startswith(TAG_PREFIX):
            step = int(folder.name[len(TAG_PREFIX):])
        if step is None and (folder / BEST_RECORD).is_file():
            step = json.loads((folder / BEST_RECORD).read_text()).get("step")
        return int(step or 0)


def checkpoint_folder(run_dir: str | Path, tag: Optional[str] = None) -> Path:
    """The checkpoint folder of a run: `tag` is a folder name under `checkpoints/` (`best`, `step00000400`),
    `stepN` (any number of digits), `latest` or None (DeepSpeed's `latest`)."""
    checkpoints = Checkpointer(run_dir)
    if tag in (None, "latest"):
        tag = checkpoints.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{checkpoints.dir} holds no checkpoint (no `latest` file)")
    elif not (checkpoints.dir / tag).is_dir() and re.fullmatch(rf"{TAG_PREFIX}\d+", tag):
        tag = tag_for_step(int(tag[len(TAG_PREFIX):]))
    folder = checkpoints.dir / tag
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in checkpoints.dir.iterdir() if p.is_dir())) if checkpoints.dir.is_dir() else "none"
        raise FileNotFoundError(f"{folder} does not exist (checkpoints there: {known})")
    return folder


def saved_run_config(folder: Path) -> dict:
    """The run config a checkpoint was written with (RunConfigRecord, in rank 0's module-state file)."""
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return saved["run_config"]


def load_for_inference(run_dir: str, tag: Optional[str] = None):
    """Rebuild the trained model in fp32 from a run folder, without DeepSpeed's engine.

    Returns (model in eval mode, ModelConfig, tokenizer model path).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    folder = checkpoint_folder(run_dir, tag)
    model_config = ModelConfig(**saved_run_config(folder)["model"])
    model = build_model(model_config)
    # The fp32 master weights live in the ZeRO optimizer partitions (any number of ranks); the module copy may
    # be fp16/bf16.
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    model.load_state_dict(state)
    model.float().eval()
    tokenizer = Path(run_dir) / "tokenizer.model"
    return model, model_config, str(tokenizer)
