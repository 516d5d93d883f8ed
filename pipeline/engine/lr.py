"""The LR schedule: one pure function of the step and the task, with and without a continual schedule.

`lr_multiplier(tasks, ...)(step)` is the factor of train.lr for the update after `step` applied updates. Within
each task (a run without a continual schedule is one task over train.max_steps): a linear warm-up over its first
`rewarm` steps, then a cosine decay from the task's peak (its lr) to peak * min_lr_ratio by its end.

The plain run's arithmetic is that of DeepSpeed's `WarmupCosineLR` (linear type, from 1/warmup, as this pipeline
used it before, so runs and checkpoints continue bit for bit): warm-up `1/W + (t/W)(1 - 1/W)` over W = max(2,
warmup) steps, cosine progress `(t - W + 1)/(steps - W)`. A continual task warms up as `(t+1)/rewarm` and its
cosine runs over `(t - rewarm)/(steps - rewarm)`. The checkpoint holds only the step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class Phase:
    """What the schedule needs of a task (continual `Task`s have the same fields)."""

    start: int
    steps: int
    lr: float
    rewarm: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def lr_multiplier(tasks: Sequence, base_lr: float, min_lr_ratio: float, plain: bool = False) -> Callable[[int], float]:
    """`plain`: `tasks` is the one phase of a run without a continual schedule (WarmupCosineLR's arithmetic)."""
    ends = [t.end for t in tasks]

    def multiplier(step: int) -> float:
        task = tasks[next((i for i, end in enumerate(ends) if step < end), len(tasks) - 1)]
        if plain:
            warmup = max(2, task.rewarm)
            floor = 1.0 / task.rewarm if task.rewarm > 0 else 1.0
            if step < warmup:
                return floor + step / warmup * (1.0 - floor)
            progress = min(1.0, (step - warmup + 1) / max(1, task.steps - warmup))
            return max(0.0, min_lr_ratio + (1.0 - min_lr_ratio) * ((1 + math.cos(math.pi * progress)) / 2))
        t = min(step - task.start, task.steps - 1)
        peak = task.lr / base_lr
        if t < task.rewarm:
            return peak * (t + 1) / task.rewarm
        progress = (t - task.rewarm) / max(1, task.steps - task.rewarm)
        return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


class ScheduledLR:
    """Sets every parameter group's lr to base lr x `multiplier(step)`; DeepSpeed calls `step()` after each applied
    optimizer step. Loads the state of DeepSpeed's WarmupCosineLR and torch's LambdaLR (older checkpoints)."""

    def __init__(self, optimizer, multiplier: Callable[[int], float]):
        self.optimizer, self.multiplier = optimizer, multiplier
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_batch_iteration = 0
        self._apply()  # the first update trains at the factor of step 0, never at lr 0

    def _apply(self) -> None:
        factor = self.multiplier(self.last_batch_iteration)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, last_batch_iteration: Optional[int] = None) -> None:
        self.last_batch_iteration = (self.last_batch_iteration + 1 if last_batch_iteration is None
                                     else last_batch_iteration)
        self._apply()

    def catch_up(self, step: int) -> None:
        """Follow optimizer step `step` (skipped updates included): the next update trains at `multiplier(step)`."""
        if self.last_batch_iteration < step:
            self.step(step)

    def get_last_lr(self) -> list:
        return self._last_lr

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = int(state.get("last_batch_iteration", state.get("last_epoch", 0)))
        self._apply()


def build_lr_scheduler(train, tasks: Optional[Sequence] = None):
    """The schedule as a factory: DeepSpeed calls it with its own wrapped optimizer. `tasks`: a continual schedule's."""
    plain = tasks is None
    if plain:
        tasks = [Phase(start=0, steps=train.max_steps, lr=train.lr, rewarm=train.warmup_steps)]
    multiplier = lr_multiplier(tasks, train.lr, train.min_lr_ratio, plain=plain)
    return lambda optimizer: ScheduledLR(optimizer, multiplier)
