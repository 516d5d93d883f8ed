"""The trainer's reader during a continual schedule: this rank's micro-batches of the running task.

Every micro-step, the running task's blend hands out `(micro_batch - replayed) * world_size` global slots
(smooth weighted round-robin over its folders, `pipeline.data.blend`); each folder's next samples fill
its slots, and rank `r` takes slots `r, r + w, ...` (as the plain reader interleaves ranks). The rest of
the micro-batch, `replay_per_micro_batch` samples, is drawn from the replay buffer with a generator
seeded by (seed, task, micro-step of the task, rank): every rank draws differently, and a resumed run
draws exactly what the uninterrupted one did. All of it is a function of counters that every rank holds
alike, so no decision needs communication.

After each optimizer step, `end_step` feeds all ranks' task samples of that step (not the replayed ones,
not quarantined ones; samples of a micro-batch skipped only because of another rank's are kept: they are
good data) to the replay buffer, again identically on every rank.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Collection, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from pipeline.data.blend import SourcePool, WeightedRoundRobin
from pipeline.data.manifest import DataError

from .replay import ReplayBuffer
from .schedule import Task

_TAG = 0x53545245  # "STRE"


def blend_ids(pool: SourcePool, codes: Sequence[int], robin: WeightedRoundRobin, counts: np.ndarray,
              consumed: Dict[int, int], slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the next `slots` global slots of a blend; advances `consumed` (samples taken per source code)
    in place and returns (ids, the blend's new per-entry counts)."""
    entries, counts = robin.assign(counts, slots)
    ids = np.empty(slots, dtype=np.int64)
    for entry, code in enumerate(codes):
        where = np.nonzero(entries == entry)[0]
        if len(where):
            ids[where] = pool.encode(code, consumed[code] + np.arange(len(where), dtype=np.int64))
            consumed[code] += len(where)
    return ids, counts


class TaskStream:
    def __init__(self, pool: SourcePool, tasks: Sequence[Task], replay: ReplayBuffer, micro_batch: int, rank: int,
                 world_size: int, seed: int, trace_file: Optional[Path] = None):
        self.pool = pool
        self.tasks = list(tasks)
        self.codes = [[pool.add(key) for key in task.sources] for task in self.tasks]
        self.robins = [WeightedRoundRobin(task.weights) for task in self.tasks]
        self.replay = replay
        self.micro_batch, self.rank, self.world_size, self.seed = micro_batch, rank, world_size, seed
        self.quarantined: Collection[int] = ()  # the guard's set of encoded windows (attach_quarantine)
        self.replaying = any(task.replay_per_micro_batch for task in self.tasks)
        # State: the running task, its micro-steps and blend counts, and samples taken per source (over all
        # tasks, so a folder that comes back continues where it stopped).
        self.task = 0
        self.micro_steps = 0
        self.blend_counts = np.zeros(len(self.tasks[0].sources), dtype=np.int64)
        self.consumed: Dict[int, int] = {code: 0 for code in range(1, len(pool.keys) + 1)}
        self._step_ids: List[np.ndarray] = []  # all ranks' fresh samples of the current optimizer step
        first = pool.reader(1)
        self.vocab_size, self.tokenizer_path = first.vocab_size, first.tokenizer_path
        # data.trace_samples: the sample ids this rank reads, one JSON line per micro-batch (as the plain reader).
        self.trace_file = Path(trace_file) if trace_file is not None else None
        if self.trace_file is not None:
            self.trace_file.parent.mkdir(parents=True, exist_ok=True)

    def attach_quarantine(self, quarantined: Collection[int]) -> None:
        self.quarantined = quarantined

    # ---- the schedule's hook -------------------------------------------------------------
    def on_task_start(self, task: Task) -> None:
        self.task = task.index
        self.micro_steps = 0
        self.blend_counts = np.zeros(len(task.sources), dtype=np.int64)

    # ---- what the trainer and the guard call ---------------------------------------------
    def next_batch(self) -> Dict[str, torch.Tensor]:
        task = self.tasks[self.task]
        if self.replaying and self.quarantined:
            self.replay.purge(self.quarantined, self.pool.windows_of)
        replayed = task.replay_per_micro_batch if len(self.replay) else 0
        fresh = self.micro_batch - replayed
        ids, self.blend_counts = blend_ids(self.pool, self.codes[self.task], self.robins[self.task],
                                           self.blend_counts, self.consumed, fresh * self.world_size)
        if self.replaying:
            self._step_ids.append(ids)
        rng = np.random.default_rng((self.seed, _TAG, self.task, self.micro_steps, self.rank))
        mine = np.concatenate([ids[self.rank::self.world_size], self.replay.draw(replayed, rng)])
        self.micro_steps += 1
        if self.trace_file is not None:
            with self.trace_file.open("a") as f:
                f.write(json.dumps({"task": task.name, "samples": mine.tolist(), "replayed": replayed}) + "\n")
        tokens = self.pool.read(mine)
        return {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
                "sample_index": torch.from_numpy(mine)}

    def end_step(self) -> None:
        """After an optimizer step: its task samples (every rank's, less quarantined ones) go to the replay buffer."""
        if not self._step_ids:
            return
        ids = np.concatenate(self._step_ids)
        self._step_ids = []
        if self.quarantined:
            ids = ids[~np.isin(self.pool.windows_of(ids), np.fromiter(self.quarantined, dtype=np.int64))]
        self.replay.observe(ids)

    def window_of(self, sample_id: int) -> int:
        return self.pool.window_of(sample_id)

    def sample_documents(self, sample_id: int) -> List[str]:
        return self.pool.sample_documents(sample_id)

    @property
    def epoch(self) -> int:
        """The furthest epoch among the running task's folders (for logs)."""
        return max(self.consumed[c] // self.pool.reader(c).num_windows for c in self.codes[self.task])

    def describe(self) -> dict:
        readers = self.pool.readers
        return {"documents": sum(r.num_documents for r in readers), "stream_tokens": sum(r.num_tokens for r in readers),
                "num_samples": sum(r.num_windows for r in readers), "samples_dropped_per_epoch": 0,
                "tail_tokens_dropped": sum(r.tokens_dropped_tail for r in readers)}

    # ---- Fisher data ---------------------------------------------------------------------
    def fisher_batches(self, task: Task, batches: int) -> Iterator[Dict[str, torch.Tensor]]:
        """This rank's share of the first `batches * micro_batch * world_size` samples of the task's blend
        order (what the task trained on first), laid out as training micro-batches."""
        consumed = {code: 0 for code in self.consumed}
        counts = np.zeros(len(task.sources), dtype=np.int64)
        for _ in range(batches):
            ids, counts = blend_ids(self.pool, self.codes[task.index], self.robins[task.index], counts, consumed,
                                    self.micro_batch * self.world_size)
            mine = ids[self.rank::self.world_size]
            tokens = self.pool.read(mine)
            yield {"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
                   "sample_index": torch.from_numpy(mine)}

    # ---- state ---------------------------------------------------------------------------
    def _fingerprints(self) -> List[str]:
        return [r.fingerprint for r in self.pool.readers]

    def state_dict(self) -> dict:
        """Identical on every rank, and small (a few counters): the trainer takes it at every step start."""
        return {"task": self.task, "micro_steps": self.micro_steps, "blend_counts": self.blend_counts.tolist(),
                "consumed": [self.consumed[c] for c in sorted(self.consumed)], "seed": self.seed,
                "fingerprints": self._fingerprints(),
                "micro_batch": self.micro_batch, "world_size": self.world_size}  # the layout, for the record

    def load_state_dict(self, state: dict) -> None:
        # The slots are global counters, so another rank layout continues the same sample order.
        mine = {"seed": self.seed, "fingerprints": self._fingerprints()}
        diffs = [key for key, value in mine.items() if state.get(key) != value]
        if diffs:
            raise DataError(f"cannot resume the continual data stream with a different data {' or '.join(diffs)}: "
                            "the sample order would not continue; use the original data folders and data.seed")
        self.task, self.micro_steps = int(state["task"]), int(state["micro_steps"])
        self.blend_counts = np.asarray(state["blend_counts"], dtype=np.int64)
        self.consumed = {code: int(n) for code, n in zip(sorted(self.consumed), state["consumed"])}
        self._step_ids = []


def validation_summary(pool: SourcePool, rank: int, world_size: int, micro_batch: int) -> SimpleNamespace:
    """Documents and tokens of every source's validation split (for the start-of-run log)."""
    readers = [pool.validation(code, rank, world_size, micro_batch) for code in range(1, len(pool.keys) + 1)]
    return SimpleNamespace(num_documents=sum(r.num_documents for r in readers),
                           num_tokens=sum(r.num_tokens for r in readers))
