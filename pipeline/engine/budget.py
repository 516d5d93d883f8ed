"""The training clock: tokens and seconds spent in training steps, and the `train.max_seconds` stop.

Seconds count the optimizer steps only (forward, backward, optimizer), not evaluation, checkpoints or
start-up, so "equal training wall time" means the same thing for two models whose evaluations cost
differently. The totals are a checkpointed state (a resumed run continues its budget) and go into every
evaluation record (`train_tokens`, `train_seconds`), which is what `python -m pipeline.compare` plots
validation bits per byte against.

The stop is a collective decision: every rank measures its own time, the ranks agree on the largest
(one all-reduce of one number per step, only when `max_seconds` is set) and keep it, and all of them stop
after the same step.
"""
from __future__ import annotations

import torch

from pipeline import comm


class TrainClock:
    """Cumulative training tokens and seconds, and whether `max_seconds` (0: no limit) has run out."""

    def __init__(self, max_seconds: float = 0.0):
        self.max_seconds = max_seconds
        self.tokens = 0
        self.seconds = 0.0

    def tick(self, tokens: int, seconds: float) -> bool:
        """Count one optimizer step; returns, identically on every rank, whether the time budget is spent."""
        self.tokens += tokens
        self.seconds += seconds
        if not self.max_seconds:
            return False
        # Every rank adopts the slowest rank's clock: one clock for the run, the same on every rank.
        self.seconds = comm.all_reduce(torch.tensor([self.seconds], dtype=torch.float64), op="max").item()
        return self.seconds >= self.max_seconds

    def totals(self) -> dict:
        return {"train_tokens": self.tokens, "train_seconds": self.seconds}

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.seconds = int(state["tokens"]), float(state["seconds"])
