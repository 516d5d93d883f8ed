"""The task schedule: which task trains at which optimizer step, and the task-boundary hook (the per-task LR:
pipeline/engine/lr.py).

Tasks follow each other on global step counts (task i trains steps `start+1 .. start+steps`), which every
rank knows, so boundaries need no communication. Components subscribe to the boundary hook:

    schedule.subscribe(component)   # any of on_task_start(task), on_task_end(task)

`on_task_start(task)` runs before the task's first step (for the first task: when a fresh run begins),
`on_task_end(task)` after its last step and before anything is checkpointed at that step, so a
checkpoint never falls between a task's end and its hooks. Subscribers run in subscription order.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from pipeline.config import ConfigError, ContinualConfig, TrainConfig
from pipeline.data.blend import SourceKey
from pipeline.data.manifest import DataError, load_manifest


@dataclass(frozen=True)
class Task:
    index: int
    name: str
    sources: tuple  # SourceKey per blended folder (one for a plain task)
    weights: tuple  # blend weights, summing to 1
    start: int  # optimizer steps before this task
    steps: int
    lr: float  # peak learning rate
    rewarm: int  # warm-up steps at its start
    replay_per_micro_batch: int  # samples of each micro-batch drawn from earlier tasks

    @property
    def end(self) -> int:
        return self.start + self.steps

    def describe(self) -> str:
        folders = ", ".join(f"{key.label()} ({w:.0%})" if len(self.sources) > 1 else key.label()
                            for key, w in zip(self.sources, self.weights))
        return (f"task {self.index + 1} {self.name!r}: steps {self.start + 1}-{self.end}, lr {self.lr:g} "
                f"(re-warm {self.rewarm}), replay {self.replay_per_micro_batch}/micro-batch, data {folders}")


def replay_per_micro_batch(cfg: ContinualConfig, micro_batch: int) -> int:
    replayed = int(round(cfg.replay_ratio * micro_batch))
    if cfg.replay_ratio > 0 and replayed == 0:
        raise ConfigError(f"continual.replay_ratio={cfg.replay_ratio} of a micro batch of {micro_batch} samples rounds "
                          "to 0 replayed samples: raise it or train.micro_batch_size")
    if replayed >= micro_batch:
        raise ConfigError(f"continual.replay_ratio={cfg.replay_ratio} of a micro batch of {micro_batch} samples leaves "
                          "no sample of the task itself: lower it")
    return replayed


def _split_documents(data_dir: str, parts: int) -> List[tuple]:
    """Contiguous, near-equal document ranges of the train and validation splits, one pair per part."""
    manifest = load_manifest(data_dir)
    ranges = []
    for split in ("train", "validation"):
        documents = manifest.split(split).documents
        if documents < parts:
            raise DataError(f"{data_dir}: the {split} split has {documents} documents, too few to split into "
                            f"continual.num_tasks={parts} tasks")
        bounds = [documents * k // parts for k in range(parts + 1)]
        ranges.append([(bounds[k], bounds[k + 1]) for k in range(parts)])
    return list(zip(*ranges))


def plan_tasks(cfg: ContinualConfig, train: TrainConfig, data_dir: str, sequence_length: int, micro_batch: int,
               accumulation: int, world_size: int) -> List[Task]:
    """Resolve the config into tasks with step ranges; one ConfigError/DataError naming the field otherwise."""
    replayed = replay_per_micro_batch(cfg, micro_batch)
    specs = []  # (name, sources, weights, steps or None, tokens, lr)
    if cfg.num_tasks:
        base, extra = divmod(train.max_steps, cfg.num_tasks)
        folder = os.path.abspath(data_dir)
        for k, (docs, val_docs) in enumerate(_split_documents(folder, cfg.num_tasks)):
            specs.append((f"part{k + 1}", (SourceKey(folder, docs, val_docs),), (1.0,), base + (k < extra), 0, None))
    else:
        for task in cfg.tasks:
            folders = [task.data_dir] if task.data_dir is not None else list(task.data_dirs)
            weights = list(task.weights) or [1.0] * len(folders)
            total = sum(weights)
            specs.append((task.name, tuple(SourceKey(os.path.abspath(f)) for f in folders),
                          tuple(w / total for w in weights), task.steps, task.tokens, task.lr))
    tasks, start = [], 0
    rewarm_default = train.warmup_steps if cfg.rewarm_steps is None else cfg.rewarm_steps
    for index, (name, sources, weights, steps, tokens, lr) in enumerate(specs):
        replay = replayed if index > 0 else 0  # nothing to replay during the first task
        if not steps:
            # The budget counts the task's own tokens: replayed samples take part of every micro-batch.
            fresh_per_step = (micro_batch - replay) * accumulation * world_size * sequence_length
            steps = math.ceil(tokens / fresh_per_step)
        tasks.append(Task(index=index, name=name, sources=sources, weights=weights, start=start, steps=steps,
                          lr=lr if lr is not None else train.lr, rewarm=min(rewarm_default, steps),
                          replay_per_micro_batch=replay))
        start += steps
    if not cfg.num_tasks and train.max_steps not in (0, start):
        raise ConfigError(f"train.max_steps ({train.max_steps}) must be 0 or the sum of the continual tasks' steps "
                          f"({' + '.join(str(t.steps) for t in tasks)} = {start})")
    return tasks


class TaskSchedule:
    """The running task and the boundary hook; its state (which hooks ran) is checkpointed."""

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        self.listeners: list = []
        self.index = 0  # the running task
        self.started = False  # on_task_start of the first task ran
        self.finished = 0  # tasks whose on_task_end ran

    @property
    def total_steps(self) -> int:
        return self.tasks[-1].end

    @property
    def current(self) -> Task:
        return self.tasks[self.index]

    def task_for_step(self, step: int) -> Task:
        """The task that trains optimizer step `step` (1-based; step 0, before training, belongs to the first)."""
        return next((t for t in self.tasks if step <= t.end), self.tasks[-1])

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)

    def _fire(self, event: str, task: Task) -> None:
        for listener in self.listeners:
            hook = getattr(listener, event, None)
            if hook is not None:
                hook(task)

    def begin(self) -> None:
        """A fresh run: start the first task (a resumed run continues where its checkpoint was)."""
        if not self.started:
            self.started = True
            self._fire("on_task_start", self.tasks[0])

    def after_step(self, step: int) -> Optional[Task]:
        """Fire the hooks of a boundary that `step` reached; returns the task that ended, if any."""
        ended = None
        while self.finished < len(self.tasks) and step >= self.tasks[self.finished].end:
            ended = self.tasks[self.finished]
            self._fire("on_task_end", ended)
            self.finished += 1
            if self.finished < len(self.tasks):
                self.index = self.finished
                self._fire("on_task_start", self.current)
        return ended

    def _plan(self) -> list:
        # Folder paths are left out (a moved data folder may resume); the stream checks the data's fingerprints.
        return [[t.name, t.start, t.steps, [list(k.documents or ()) for k in t.sources], list(t.weights)]
                for t in self.tasks]

    def state_dict(self) -> dict:
        return {"index": self.index, "started": self.started, "finished": self.finished, "plan": self._plan()}

    def load_state_dict(self, state: dict) -> None:
        if state["plan"] != self._plan():
            raise ConfigError(f"continual: the checkpoint's task plan {state['plan']} differs from this run's "
                              f"{self._plan()}; resume with the original continual.tasks (and batch layout)")
        self.index, self.started, self.finished = int(state["index"]), bool(state["started"]), int(state["finished"])
