"""Stability hooks around the DeepSpeed engine.

* `BatchGuard` decides, collectively, whether a micro-batch is skipped (non-finite loss on any rank,
  a loss spike, or samples quarantined by an earlier run) and records every skip.
* `LossScaleWatch` reports fp16 overflow steps (DeepSpeed's own skip) and turns the scaler's
  "already at minimum" death into a checkpoint and a clear exit.
* `Drill` injects NaN losses and infinite gradients so a bad night can be rehearsed.

Why a NaN loss must not reach `engine.backward`: in DeepSpeed a NaN batch is indistinguishable from
an fp16 overflow, so each one burns hysteresis or halves the scale. And why the decision is
all-gathered: one rank skipping backward alone leaves ZeRO-2's gradient reduction waiting forever.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, deque
from pathlib import Path
from statistics import median
from typing import Optional

import numpy as np
import torch

from pipeline import comm
from pipeline.config import StabilityConfig
from pipeline.engine.ds_adapter import LossScaler

log = logging.getLogger(__name__)

PEER = "peer"  # the reason recorded for a rank whose own batch was fine but was skipped with the others
BAD_REASONS = ("nan", "spike", "quarantined")


class RunAborted(RuntimeError):
    """The run cannot go on safely; the trainer saves a checkpoint and exits non-zero with this message."""

    exit_code = 3


class BatchGuard:
    """Collective skip decision for each micro-batch, the quarantine file, and skip counters."""

    def __init__(self, cfg: StabilityConfig, run_dir: Path, reader):
        """`reader` maps global sample ids to stream windows and documents (`window_of`, `sample_documents`);
        the mapping is global, so any rank's reader resolves every rank's samples."""
        self.cfg = cfg
        self.rank, self.world_size = comm.world()
        self.path = Path(run_dir) / cfg.quarantine_file
        self.reader = reader
        self.counts: Counter = Counter()  # skipped micro-batches by reason
        self.consecutive = 0
        self.accepted = 0  # micro-batches that went on to backward
        self.recent_losses: deque = deque(maxlen=cfg.spike_window)
        self.quarantined = self._read_quarantine()

    def _read_quarantine(self) -> set[int]:
        """Stream windows (the same data whatever the epoch) that an earlier run of this folder found bad.

        A line that is not a complete record (a write cut short by a kill, an edit by hand) is skipped
        with a warning naming it: failing here would fail every requeue of the job the same way."""
        windows: set[int] = set()
        if not self.path.is_file():
            return windows
        bad = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record.get("reason") in ("nan", "spike"):
                    windows.update(int(w) for w in record["windows"])
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                bad.append(f"{self.path}:{number} ({type(err).__name__}: {err})")
        if bad:
            log.warning("skipped %d malformed quarantine record(s), first: %s", len(bad), bad[0])
        self.malformed_records = len(bad)
        return windows

    def check(self, loss: torch.Tensor, sample_index: torch.Tensor, step: int, attempt: int) -> Optional[str]:
        """Return the skip reason for this micro-batch (identical on every rank), or None to train on it.

        One all-gather of three numbers per micro-step; its result is needed on the host to branch,
        which is the price of every rank taking the same branch.
        """
        value = loss.detach().reshape(()).double()
        finite = torch.isfinite(value)
        flag_nonfinite = (~finite).double() if self.cfg.skip_nonfinite_loss else torch.zeros_like(value)
        quarantined = float(bool(self.quarantined) and any(self.reader.window_of(s) in self.quarantined
                                                             for s in sample_index.tolist()))
        local = torch.stack([flag_nonfinite, torch.full_like(value, quarantined), torch.where(finite, value, 0.0)])
        table = comm.all_gather(local, out_device="cpu")
        nonfinite_ranks = table[:, 0] > 0
        quarantined_ranks = table[:, 1] > 0
        global_loss = float(table[:, 2].mean())
        reason = None
        if nonfinite_ranks.any():
            reason = "nan"
        elif quarantined_ranks.any():
            reason = "quarantined"
        elif (self.cfg.skip_loss_spikes and len(self.recent_losses) == self.recent_losses.maxlen
              and global_loss > self.cfg.spike_factor * median(self.recent_losses)):
            reason = "spike"
        if reason is None:
            self.recent_losses.append(global_loss)
            self.consecutive = 0
            self.accepted += 1
            return None

        self.counts[reason] += 1
        if reason != "quarantined":  # known-bad samples cost nothing new; the limit is about fresh failures
            self.consecutive += 1
        self._record(step, attempt, reason, table, sample_index)
        if self.cfg.max_consecutive_skips and self.consecutive >= self.cfg.max_consecutive_skips:
            raise RunAborted(f"{self.consecutive} consecutive micro-batches were skipped (last reason: {reason}) "
                             f"at step {step}: the model or the data has gone bad. Skipped batches are listed in "
                             f"{self.path.resolve()}; a checkpoint of the last good step was saved.")
        return reason

    def _record(self, step: int, attempt: int, reason: str, table: torch.Tensor, sample_index: torch.Tensor) -> None:
        indices = comm.all_gather(sample_index.to(torch.int64), out_device="cpu")
        if reason in ("nan", "quarantined"):
            own = (table[:, 0] > 0) if reason == "nan" else (table[:, 1] > 0)
        else:
            own = torch.ones(self.world_size, dtype=torch.bool)
        if reason != "quarantined":  # the same data met again later in this run is skipped too
            for rank in range(self.world_size):
                if own[rank]:
                    self.quarantined.update(self.reader.window_of(s) for s in indices[rank].tolist())
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            for rank in range(self.world_size):
                samples = indices[rank].tolist()
                rank_loss = "nan/inf" if table[rank, 0] > 0 else float(table[rank, 2])
                record = {"step": step, "attempt": attempt, "rank": rank, "reason": reason if own[rank] else PEER,
                          "loss": rank_loss, "samples": samples,
                          "windows": [self.reader.window_of(s) for s in samples]}
                if own[rank]:
                    record["documents"] = sorted({d for s in samples for d in self.reader.sample_documents(s)})
                f.write(json.dumps(record) + "\n")

    def on_task_start(self, task) -> None:
        """A continual task's data has losses of its own: judged against the last task's, a new domain's
        normal loss would be skipped as "spikes" until the run aborts. Its baseline starts empty."""
        self.recent_losses.clear()

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "consecutive": self.consecutive, "accepted": self.accepted,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.consecutive = state["consecutive"]
        self.accepted = state["accepted"]
        self.recent_losses = deque(state["recent_losses"], maxlen=self.cfg.spike_window)


class LossScaleWatch:
    """Watches DeepSpeed's optimizer steps: overflow skips, loss scale and hysteresis, death at the minimum."""

    def __init__(self, engine, cfg: StabilityConfig, ds_config: dict):
        self.engine = engine
        self.cfg = cfg
        self.ds_fp16 = ds_config.get("fp16", {})
        self.overflow_steps = 0
        self._before: Optional[tuple[float, int]] = None
        self._take_over_min_scale()

    @property
    def scaler(self) -> Optional[LossScaler]:
        return LossScaler.of(self.engine)

    def _take_over_min_scale(self) -> None:
        # DeepSpeed raises inside step() at the minimum scale, on every rank, with no checkpoint;
        # we let it clamp instead and decide ourselves after the step, where the engine is consistent.
        if self.scaler is not None and self.cfg.exit_at_min_loss_scale:
            self.scaler.raise_at_min_scale(False)

    def _after_engine_load(self) -> None:
        """The scaler comes back pickled from the checkpoint; re-apply our policy, reset it if asked."""
        self._take_over_min_scale()
        if self.scaler is not None and self.cfg.reset_loss_scale:
            self.scaler.reset(self.ds_fp16)

    def state(self) -> dict:
        scaler = self.scaler
        return {} if scaler is None else {"loss_scale": scaler.scale, "hysteresis": scaler.hysteresis}

    def before_step(self) -> None:
        scaler = self.scaler
        self._before = (scaler.scale, scaler.hysteresis) if scaler is not None else None

    def after_step(self, step: int) -> Optional[dict]:
        """Call after the boundary micro-step; returns an event dict when the optimizer step was skipped."""
        if self.engine.was_step_applied():
            return None
        self.overflow_steps += 1
        event = {"step": step, "reason": "overflow"}
        scaler = self.scaler
        if scaler is not None and self._before is not None:
            scale_before, hysteresis_before = self._before
            event.update(scale_before=scale_before, scale_after=scaler.scale, hysteresis_left=scaler.hysteresis)
            if scaler.at_minimum(scale_before, hysteresis_before) and self.cfg.exit_at_min_loss_scale:
                raise RunAborted(f"fp16 gradients overflowed at step {step} while the loss scale was already at its "
                                 f"minimum ({scaler.minimum}): the run cannot make progress in fp16. A checkpoint "
                                 "was saved; resume it with ds_configs/bf16.json, a lower train.lr, or "
                                 "--stability.reset_loss_scale true.")
        return event

    def state_dict(self) -> dict:
        return {"overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict) -> None:
        """Called after DeepSpeed has restored the engine (and with it the scaler) from the same checkpoint."""
        self.overflow_steps = state["overflow_steps"]
        self._after_engine_load()


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward returns inf, as an fp16 overflow would produce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class Drill:
    """Fault injection, deterministic in (step, attempt), so a resumed run meets the same faults."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.rank, self.world_size = comm.world()
        self.nan_at: dict[int, set] = {}
        for item in cfg.drill_nan_loss:
            step, _, rank = item.partition("@")
            ranks = set(range(self.world_size)) if rank == "*" else {int(rank)}
            self.nan_at.setdefault(int(step), set()).update(ranks)
        self.inf_grad_steps = set(cfg.drill_inf_grad_steps)

    def poisons_loss(self, step: int, attempt: int) -> bool:
        if attempt == 0 and self.rank in self.nan_at.get(step, ()):
            return True
        if self.cfg.drill_nan_fraction > 0:
            rng = np.random.default_rng((self.cfg.drill_seed, step, attempt))
            return bool(rng.random() < self.cfg.drill_nan_fraction) and int(rng.integers(self.world_size)) == self.rank
        return False

    def apply_to_loss(self, loss: torch.Tensor, step: int, attempt: int) -> torch.Tensor:
        return loss * float("nan") if self.poisons_loss(step, attempt) else loss

    def apply_to_logits(self, logits: torch.Tensor, step: int, last_micro_batch: bool) -> torch.Tensor:
        return _InfiniteGradient.apply(logits) if last_micro_batch and step in self.inf_grad_steps else logits


def describe_skip_counts(guard: BatchGuard, watch: LossScaleWatch) -> dict:
    counts = {f"skipped_{reason}": guard.counts.get(reason, 0) for reason in BAD_REASONS}
    counts["skipped_overflow"] = watch.overflow_steps
    counts["micro_batches_trained"] = guard.accepted
    return counts
