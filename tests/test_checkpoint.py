"""Checkpoint state: one registry of components, and every RNG a resumed run needs (the accelerator's too)."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch

from pipeline.engine.checkpoint import (Checkpointer, ClientState, RunConfigRecord, rng_state, set_rng_state)


class Counter:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class FakeEngine:
    """DeepSpeed's save/load_checkpoint contract: client_state saved as given, returned by load."""

    global_rank = 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        torch.save(client_state, f"{save_dir}/{tag}/client.pt")
        with open(f"{save_dir}/latest", "w") as f:
            f.write(tag)

    def load_checkpoint(self, load_dir, tag):
        return f"{load_dir}/{tag}", torch.load(f"{load_dir}/{tag}/client.pt", weights_only=False)


def test_registered_components_round_trip_through_a_checkpoint(tmp_path):
    states = ClientState()
    reader, guard = Counter(), Counter()
    states.register("reader", reader)
    states.register("guard", guard)
    checkpointer = Checkpointer(tmp_path, states)
    reader.value, guard.value = 7, 3
    folder = checkpointer.save(FakeEngine(), step=5)
    assert folder.name == "step00000005"
    reader.value, guard.value = 100, 100
    assert checkpointer.load(FakeEngine(), "auto") == folder
    assert (reader.value, guard.value) == (7, 3)
    assert Checkpointer(tmp_path / "elsewhere", states).load(FakeEngine(), "auto") is None  # fresh start


def test_registry_refuses_duplicates_and_non_components():
    states = ClientState()
    states.register("reader", Counter())
    with pytest.raises(ValueError, match="twice"):
        states.register("reader", Counter())
    with pytest.raises(TypeError, match="has no state_dict"):
        states.register("broken", object())


def test_a_checkpoint_without_a_registered_state_is_refused_by_name():
    states = ClientState()
    states.register("reader", Counter())
    states.register("schedule", Counter())
    with pytest.raises(KeyError, match="schedule"):
        states.load_state_dict({"reader": {"value": 1}}, source="ckpt/step00000001")


def test_run_config_record_names_changed_settings():
    record = RunConfigRecord({"train": {"lr": 1e-3, "max_steps": 10}, "model": {"hidden_dim": 64}})
    record.load_state_dict({"train": {"lr": 1e-3, "max_steps": 5}, "model": {"hidden_dim": 64}})
    assert record.changed == ["train.max_steps"]


class FakeAccelerator:
    """Two devices with generators of their own, with DeepSpeed's accelerator RNG interface."""

    def __init__(self, count=2, name="cuda"):
        self.generators = [torch.Generator().manual_seed(10 + i) for i in range(count)]
        self.name = name

    def device_name(self):
        return self.name

    def device_count(self):
        return len(self.generators)

    def get_rng_state(self, device_index=None):
        return self.generators[device_index].get_state()

    def set_rng_state(self, new_state, device_index=None):
        self.generators[device_index].set_state(new_state)

    def draw(self):
        return [torch.rand(3, generator=g) for g in self.generators]


def test_every_accelerator_device_rng_is_saved_and_restored():
    accelerator = FakeAccelerator()
    saved = rng_state(accelerator)
    assert saved["accelerator"]["device"] == "cuda" and len(saved["accelerator"]["states"]) == 2
    first = (random.random(), np.random.rand(), torch.rand(2), accelerator.draw())
    set_rng_state(saved, accelerator)
    again = (random.random(), np.random.rand(), torch.rand(2), accelerator.draw())
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    for a, b in zip(first[3], again[3]):
        assert torch.equal(a, b)


def test_accelerator_rng_with_fewer_devices_restores_what_fits_and_says_so(caplog):
    saved = rng_state(FakeAccelerator(count=2))
    one = FakeAccelerator(count=1)
    expected = torch.rand(3, generator=torch.Generator().set_state(saved["accelerator"]["states"][0]))
    with caplog.at_level(logging.WARNING):
        set_rng_state(saved, one)
    assert "this process sees 1" in caplog.text
    assert torch.equal(one.draw()[0], expected)


def test_accelerator_rng_from_another_device_kind_is_not_applied(caplog):
    saved = rng_state(FakeAccelerator(name="cuda"))
    other = FakeAccelerator(name="xpu")
    before = [g.get_state() for g in other.generators]
    with caplog.at_level(logging.WARNING):
        set_rng_state(saved, other)
    assert "not restored" in caplog.text
    assert all(torch.equal(a, g.get_state()) for a, g in zip(before, other.generators))


def test_cpu_accelerator_rng_is_torchs_own():
    saved = rng_state()
    assert saved["accelerator"] == {"device": "cpu", "states": []}
    set_rng_state(saved)


# ---- checksums and the fallback from a damaged checkpoint ----------------------------------------

def _three_checkpoints(tmp_path):
    from pipeline.engine.checkpoint import CHECKSUM_FILE

    states = ClientState()
    counter = Counter()
    states.register("counter", counter)
    checkpointer = Checkpointer(tmp_path, states, keep=0)
    for step in (1, 2, 3):
        counter.value = step
        folder = checkpointer.save(FakeEngine(), step)
        listed = json_load(folder / CHECKSUM_FILE)["files"]
        assert set(listed) == {"client.pt", "rng_rank0.pt"}
    return checkpointer, counter


def json_load(path):
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize("damage, words", [("truncate", "truncated"), ("flip", "sha256"), ("delete", "is missing"),
                                           ("unfinished", "checksums.json is missing")])
def test_damaged_newest_checkpoint_falls_back_with_a_warning_naming_it(tmp_path, caplog, damage, words):
    checkpointer, counter = _three_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step00000003"
    target = newest / ("checksums.json" if damage == "unfinished" else "client.pt")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        target.unlink()
    counter.value = 0
    with caplog.at_level(logging.WARNING):
        folder = checkpointer.load(FakeEngine(), "auto")
    assert folder.name == "step00000002" and counter.value == 2
    assert "step00000003" in caplog.text and words in caplog.text
    assert (tmp_path / "checkpoints" / "corrupt-step00000003").is_dir() and not newest.exists()
    assert checkpointer.latest_tag() == "step00000002"


def test_no_intact_checkpoint_or_a_damaged_named_one_is_an_error(tmp_path):
    from pipeline.engine.checkpoint import CheckpointError

    checkpointer, _ = _three_checkpoints(tmp_path)
    named = tmp_path / "checkpoints" / "step00000002"
    (named / "client.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="step00000002.*truncated"):
        checkpointer.load(FakeEngine(), str(named))
    for step in (1, 3):
        (tmp_path / "checkpoints" / f"step{step:08d}" / "client.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpointer.load(FakeEngine(), "auto")


def test_checkpoints_from_before_checksums_still_resume(tmp_path):
    checkpointer, counter = _three_checkpoints(tmp_path)
    for folder in (tmp_path / "checkpoints").glob("step*"):
        (folder / "checksums.json").unlink()
    counter.value = 0
    assert checkpointer.load(FakeEngine(), "auto").name == "step00000003" and counter.value == 3


def test_auto_resume_does_not_go_past_latest(tmp_path):
    """Steps above `latest` are left over from a run resumed from an older checkpoint: not the present."""
    checkpointer, counter = _three_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step00000002")
    counter.value = 0
    assert checkpointer.load(FakeEngine(), "auto").name == "step00000002" and counter.value == 2


def test_optional_state_may_be_missing_from_older_checkpoints():
    states = ClientState()
    reader, best = Counter(), Counter()
    states.register("reader", reader)
    states.register("best", best, optional=True)
    best.value = 4
    states.load_state_dict({"reader": {"value": 2}})
    assert (reader.value, best.value) == (2, 4)


def test_best_checkpoint_tracks_the_lowest_validation_loss_after_step_0():
    from pipeline.engine.checkpoint import BestCheckpoint

    best = BestCheckpoint()
    assert not best.improved(0, 1.0), "the untrained model is not worth a checkpoint"
    assert best.improved(10, 5.0) and not best.improved(20, 5.5) and best.improved(30, 4.0)
    restored = BestCheckpoint()
    restored.load_state_dict(best.state_dict())
    assert (restored.step, restored.loss) == (30, 4.0) and not restored.improved(40, 4.5)


def test_a_tagged_checkpoint_is_neither_latest_nor_pruned(tmp_path):
    class Engine(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
            os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
            torch.save(client_state, f"{save_dir}/{tag}/client.pt")
            if save_latest:
                with open(f"{save_dir}/latest", "w") as f:
                    f.write(tag)

    checkpointer = Checkpointer(tmp_path, ClientState(), keep=1)
    checkpointer.save(Engine(), 1)
    checkpointer.save(Engine(), 1, tag="best")
    checkpointer.save(Engine(), 2)
    checkpointer.save(Engine(), 3)
    assert checkpointer.latest_tag() == "step00000003"
    assert sorted(p.name for p in checkpointer.dir.iterdir() if p.is_dir()) == ["best", "step00000003"]


# ---- rollback, restarts and `best` (faults issue, items 1, 2 and 8) ------------------------------

class StepEngine(FakeEngine):
    """FakeEngine with DeepSpeed's step counter restored by load and `latest` only for step tags."""

    def __init__(self):
        self.global_steps = 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        torch.save({**client_state, "step": self.global_steps}, f"{save_dir}/{tag}/client.pt")
        if save_latest:
            with open(f"{save_dir}/latest", "w") as f:
                f.write(tag)

    def load_checkpoint(self, load_dir, tag):
        state = torch.load(f"{load_dir}/{tag}/client.pt", weights_only=False)
        self.global_steps = state.pop("step")
        return f"{load_dir}/{tag}", state


def _train(checkpointer, engine, steps):
    for step in steps:
        engine.global_steps = step
        checkpointer.save(engine, step)


def test_after_an_explicit_rollback_new_checkpoints_survive_and_auto_resumes_the_new_trajectory(tmp_path, caplog):
    checkpointer, engine = Checkpointer(tmp_path, ClientState(), keep=2), StepEngine()
    _train(checkpointer, engine, range(1, 11))  # keeps 9 and 10
    old = tmp_path / "copy-of-step9"
    import shutil
    shutil.copytree(checkpointer.dir / "step00000009", old)
    engine = StepEngine()
    with caplog.at_level(logging.WARNING):
        assert checkpointer.load(engine, str(old)) == old and engine.global_steps == 9
    assert "step00000010" in caplog.text and "set aside" in caplog.text
    _train(checkpointer, engine, (10, 11))  # the new trajectory's step 10 is not the old one's
    names = sorted(p.name for p in checkpointer.dir.iterdir() if p.is_dir())
    assert names == ["abandoned-step00000010", "step00000010", "step00000011"], "nothing new pruned, the old kept aside"
    assert checkpointer.latest_tag() == "step00000011"
    engine = StepEngine()
    assert checkpointer.load(engine, "auto").name == "step00000011"


def test_an_explicit_resume_repeated_by_a_restarted_job_gives_way_to_the_newest_checkpoint(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    checkpointer, engine = Checkpointer(tmp_path, ClientState(), keep=3), StepEngine()
    _train(checkpointer, engine, (1, 2))
    start = str(checkpointer.dir / "step00000001")
    engine = StepEngine()
    assert checkpointer.load(engine, start).name == "step00000001"  # the first time it is honoured
    assert (checkpointer.dir / "abandoned-step00000002").is_dir()
    import time
    time.sleep(0.05)
    _train(checkpointer, engine, (2, 3))
    engine = StepEngine()
    with caplog.at_level(logging.WARNING):
        assert checkpointer.load(engine, start).name == "step00000003"  # the same command again
    assert "was applied before" in caplog.text and "step00000003 was written since" in caplog.text
    # A requeued SLURM job: the newest wins whatever the record says.
    (checkpointer.dir / "resume_applied.json").unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert checkpointer.load(StepEngine(), start).name == "step00000003"


def test_best_is_swapped_in_whole_and_a_rollback_cannot_replace_it_with_a_worse_model(tmp_path):
    from pipeline.engine.checkpoint import BEST_TAG, BestCheckpoint

    states, best = ClientState(), BestCheckpoint()
    states.register("best", best)
    checkpointer, engine = Checkpointer(tmp_path, states, keep=0, best=best), StepEngine()
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
        engine.global_steps = step
        checkpointer.save(engine, step)
        if best.improved(step, loss):
            checkpointer.save(engine, step, tag=BEST_TAG)
    assert json_load(checkpointer.dir / "best" / "best.json") == {"loss": 1.0, "step": 3}
    assert not list(checkpointer.dir.glob("best.*")), "no temporary or old copy left"
    # A crash between the two renames of the next swap: `best.old` is complete, `best` is gone.
    (checkpointer.dir / "best").rename(checkpointer.dir / "best.old")
    (checkpointer.dir / "best.tmp").mkdir()
    engine = StepEngine()
    checkpointer.load(engine, str(checkpointer.dir / "step00000002"))  # roll back to a worse model
    assert (checkpointer.dir / "best" / "best.json").is_file() and not (checkpointer.dir / "best.tmp").exists()
    assert best.loss == 1.0 and best.step == 3, "the better model on disk sets the bar"
    assert not best.improved(3, 1.5)
