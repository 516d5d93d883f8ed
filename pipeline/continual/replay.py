"""Replay buffer: a uniform reservoir of the global sample ids of finished tasks, the same on every rank.

What is stored are sample ids (`pipeline.data.blend`), not token copies: a replayed sample is re-read from
its folder. Every rank feeds the buffer the same ids (all ranks' trained samples of each step, which each
rank computes from the deterministic sample order) with the same seeded random decisions, so the buffers
agree without any communication.

While a task runs, its trained samples go into a *pending* reservoir (Algorithm R: item t, 0-based,
replaces a random slot with probability capacity/(t+1)). When the task ends, the pending reservoir is
merged into the main one: a uniform sample of the union is drawn, the share of each part hypergeometric
in the sizes they represent, so the buffer stays a uniform sample of every earlier task's samples.
Samples the stability guard quarantined (NaN or spike) are purged, so they are never replayed.
"""
from __future__ import annotations

from typing import Callable, Collection

import numpy as np
import torch

_TAG = 0x5245504C  # "REPL": keeps these random streams apart from others seeded with the same numbers


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int):
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.ids = np.zeros(0, dtype=np.int64)  # the reservoir over finished tasks
        self.seen = 0  # samples of finished tasks it stands for
        self.pending = np.zeros(0, dtype=np.int64)  # the reservoir over the running task
        self.pending_seen = 0
        self.task = 0  # index of the running task
        self.quarantine_size = 0  # size of the quarantine at the last purge

    def __len__(self) -> int:
        return len(self.ids)

    def observe(self, ids: np.ndarray) -> None:
        """Feed the running task's trained sample ids, in the global order (every rank the same ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        room = max(0, self.capacity - len(self.pending))
        fill, rest = ids[:room], ids[room:]
        self.pending = np.concatenate([self.pending, fill])
        if len(rest):
            rng = np.random.default_rng((self.seed, _TAG, 0, self.task, self.pending_seen))
            t = self.pending_seen + len(fill) + np.arange(len(rest), dtype=np.int64)  # 0-based item numbers
            slots = rng.integers(0, t + 1)
            for k in np.nonzero(slots < self.capacity)[0]:  # in order: a later item may replace an earlier one
                self.pending[slots[k]] = rest[k]
        self.pending_seen += len(ids)

    def on_task_end(self, task) -> None:
        """Merge the finished task's reservoir into the buffer (a uniform sample of the union)."""
        total = self.seen + self.pending_seen
        keep = min(self.capacity, total)
        rng = np.random.default_rng((self.seed, _TAG, 1, self.task))
        from_new = int(rng.hypergeometric(self.pending_seen, self.seen, keep)) if keep else 0
        from_new = min(from_new, len(self.pending))  # only short after a purge removed quarantined samples
        from_old = min(keep - from_new, len(self.ids))
        old = rng.choice(self.ids, size=from_old, replace=False) if from_old else self.ids[:0]
        new = rng.choice(self.pending, size=from_new, replace=False) if from_new else self.pending[:0]
        self.ids = np.sort(np.concatenate([old, new]))  # sorted: the order carries no information
        self.seen = total
        self.pending = np.zeros(0, dtype=np.int64)
        self.pending_seen = 0
        self.task += 1

    def purge(self, quarantined: Collection[int], windows_of: Callable[[np.ndarray], np.ndarray]) -> int:
        """Drop samples whose (encoded) window is quarantined; returns how many were dropped.

        Runs only when the quarantine has grown; the quarantine is identical on every rank (its updates are
        collective), so the buffers stay identical."""
        if len(quarantined) == self.quarantine_size:
            return 0
        self.quarantine_size = len(quarantined)
        bad = np.fromiter(quarantined, dtype=np.int64, count=len(quarantined))
        dropped = 0
        for name in ("ids", "pending"):
            ids = getattr(self, name)
            if len(ids):
                keep = ~np.isin(windows_of(ids), bad)
                dropped += int((~keep).sum())
                setattr(self, name, ids[keep])
        return dropped

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` ids drawn uniformly from the buffer (without replacement when it holds enough)."""
        if count == 0 or len(self.ids) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.ids[rng.choice(len(self.ids), size=count, replace=len(self.ids) < count)]

    def state_dict(self) -> dict:
        return {"ids": torch.from_numpy(self.ids.copy()), "seen": self.seen,
                "pending": torch.from_numpy(self.pending.copy()), "pending_seen": self.pending_seen,
                "task": self.task, "quarantine_size": self.quarantine_size, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        self.ids = state["ids"].numpy().astype(np.int64)
        self.seen = int(state["seen"])
        self.pending = state["pending"].numpy().astype(np.int64)
        self.pending_seen = int(state["pending_seen"])
        self.task = int(state["task"])
        self.quarantine_size = int(state["quarantine_size"])
        if int(state["capacity"]) != self.capacity:
            # A new capacity applies from here on; a smaller one trims the buffer uniformly.
            rng = np.random.default_rng((self.seed, _TAG, 2, self.task, self.capacity))
            for name in ("ids", "pending"):
                ids = getattr(self, name)
                if len(ids) > self.capacity:
                    setattr(self, name, np.sort(rng.choice(ids, size=self.capacity, replace=False)))
