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

    def save_checkpoint(self, save_dir, tag, client_state):
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
