"""The stability components on their own, in one process (the distributed behaviour is in test_stability.py)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, StabilityConfig
from pipeline.engine.stability import BatchGuard, Drill, RunAborted


class WindowIsSample:
    """Stands in for the reader's global sample -> stream window mapping."""

    def window_of(self, sample: int) -> int:
        return sample % 100

    def sample_documents(self, sample: int) -> list[str]:
        return [f"doc{sample % 100}"]


def guard(tmp_path, **options) -> BatchGuard:
    return BatchGuard(StabilityConfig(**options), tmp_path, WindowIsSample())


def check(g: BatchGuard, loss: float, samples=(0, 1), step: int = 1):
    return g.check(torch.tensor(loss), torch.tensor(samples), step, 0)


def test_loss_spike_is_skipped_only_once_the_window_is_full(tmp_path):
    g = guard(tmp_path, skip_loss_spikes=True, spike_factor=3.0, spike_window=4)
    assert check(g, 50.0) is None, "no judgement before the window is full"
    for loss in (2.0, 2.2, 1.9):
        assert check(g, loss) is None
    assert check(g, 9.0, samples=(7, 8)) == "spike"  # > 3 x median(50, 2, 2.2, 1.9) = 6.3
    assert check(g, 6.0) is None
    records = [json.loads(line) for line in (tmp_path / "skipped_batches.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["samples"], r["documents"]) for r in records] == [("spike", [7, 8], ["doc7", "doc8"])]
    assert g.counts["spike"] == 1 and g.accepted == 5


def test_non_finite_loss_is_skipped_and_counted_towards_the_limit(tmp_path):
    g = guard(tmp_path, max_consecutive_skips=3)
    assert check(g, float("nan"), (0, 1)) == "nan" and check(g, float("inf"), (2, 3)) == "nan"
    assert check(g, 1.0, (4, 5)) is None and g.consecutive == 0
    assert check(g, 1.0, (0, 9)) == "quarantined", "data found bad is skipped when met again in the same run"
    check(g, float("nan"), (10, 11)), check(g, float("nan"), (12, 13))
    with pytest.raises(RunAborted, match="3 consecutive micro-batches"):
        check(g, float("nan"), (14, 15))


def test_quarantine_survives_a_restart_and_does_not_count_towards_the_limit(tmp_path):
    first = guard(tmp_path)
    assert check(first, float("nan"), samples=(5, 6)) == "nan"
    again = guard(tmp_path, max_consecutive_skips=1)
    assert check(again, 1.0, samples=(105, 7)) == "quarantined"  # window 5, met in a later epoch
    assert check(again, 1.0, samples=(7, 8)) is None
    state = again.state_dict()
    restored = guard(tmp_path)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_a_broken_quarantine_record_is_skipped_with_a_warning_naming_its_line(tmp_path, caplog):
    """A record cut short by a kill must not fail every restart of the job: the rest still counts."""
    (tmp_path / "skipped_batches.jsonl").write_text('{"reason": "nan", "windows": [1]}\nnot json\n'
                                                    '{"reason": "spike"}\n{"reason": "nan", "windows": [7]}\n{"reas')
    with caplog.at_level("WARNING"):
        g = guard(tmp_path)
    assert g.quarantined == {1, 7} and g.malformed_records == 3
    assert "3 malformed quarantine record(s)" in caplog.text and "skipped_batches.jsonl:2" in caplog.text


def test_drills_are_deterministic_and_validated():
    cfg = StabilityConfig(drill_nan_loss=["3@0", "4@*"], drill_nan_fraction=0.05, drill_seed=1)
    drill = Drill(cfg)
    assert drill.poisons_loss(3, 0) and drill.poisons_loss(4, 0)
    draws = [drill.poisons_loss(step, attempt) for step in range(10, 2010) for attempt in range(2)]
    assert draws == [Drill(cfg).poisons_loss(step, attempt) for step in range(10, 2010) for attempt in range(2)]
    assert 0.03 < sum(draws) / len(draws) < 0.07
    with pytest.raises(ConfigError, match="STEP@RANK"):
        StabilityConfig(drill_nan_loss=["3:1"])
