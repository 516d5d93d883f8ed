"""Continual learning as engine hooks: a task schedule with a boundary hook, replay, EWC, a task x task matrix.

* `schedule.py`: tasks from named data folders (or parts of one), their step ranges, the per-task LR, and
  the task-boundary hook (`on_task_start(task)`, `on_task_end(task)`) that the components subscribe to.
* `stream.py`: the trainer's reader during a schedule (blended folders, replayed samples).
* `replay.py`: the reservoir of earlier tasks' sample ids, identical on every rank.
* `ewc.py`: the Fisher at each boundary (correct under ZeRO-2) and the consolidation penalty.
* `matrix.py`: every task's validation loss after each task, forgetting, BWT, FWT; json/csv/png.
* `run.py`: `ContinualRun`, the Trainer callback that wires them in.
"""
from .run import ContinualRun

__all__ = ["ContinualRun"]
