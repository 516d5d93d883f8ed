"""Wiring of a continual schedule into the trainer: what `ContinualCallback` (pipeline/callbacks.py) calls."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from pipeline.config import ConfigError
from pipeline.data.blend import SourcePool
from pipeline.engine.evaluation import evaluate
from pipeline.engine.lr import build_lr_scheduler
from pipeline.metrics import bits_per_byte, perplexity
from pipeline.trainer import Callback

from .ewc import EWC
from .matrix import TaskMatrix
from .replay import ReplayBuffer
from .schedule import TaskSchedule, plan_tasks
from .stream import TaskStream, validation_summary

log = logging.getLogger("pipeline")


class ContinualRun(Callback):
    """A continual schedule as one Trainer callback: its stream stands in for the reader, its per-task LR for the
    plain one; the task-boundary hook reaches its own components first, then the Trainer's other callbacks."""

    def __init__(self, cfg, micro_batch: int, accumulation: int, rank: int, world_size: int,
                 verify_checksums: bool, run_dir: Path):
        self.cfg = cfg.continual
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.eval_batches = cfg.train.eval_batches
        if cfg.continual.tasks and cfg.data.data_dir != type(cfg.data)().data_dir:
            log.warning("data.data_dir=%s is not used: continual.tasks name their own data folders", cfg.data.data_dir)
        self.tasks = plan_tasks(cfg.continual, cfg.train, cfg.data.data_dir, cfg.data.sequence_length, micro_batch,
                                accumulation, world_size)
        self.pool = SourcePool(cfg.data.sequence_length, cfg.data.seed, verify_checksums)
        self.pool.check_one_tokenizer([key.data_dir for task in self.tasks for key in task.sources])
        self.schedule = TaskSchedule(self.tasks)
        self.replay = ReplayBuffer(cfg.continual.replay_buffer_size, cfg.data.seed)
        trace = Path(run_dir) / "samples" / f"rank{rank}.jsonl" if cfg.data.trace_samples else None
        self.stream = TaskStream(self.pool, self.tasks, self.replay, micro_batch, rank, world_size, cfg.data.seed,
                                 trace)
        if self.stream.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({self.stream.vocab_size}) of {self.pool.keys[0].data_dir}/manifest.json")
        self.validation = validation_summary(self.pool, rank, world_size, micro_batch)
        self.ewc = EWC(cfg.continual.ewc_lambda, cfg.continual.ewc_gamma, cfg.continual.ewc_fisher_batches,
                       self.stream.fisher_batches, len(self.tasks))
        self.matrix = TaskMatrix([t.name for t in self.tasks], run_dir, rank,
                                 lambda j: self.evaluate_task(j, self.cfg.eval_batches))
        self.lr_scheduler = build_lr_scheduler(cfg.train, self.tasks)
        self.engine = None
        self._penalty_sum, self._penalty_count = 0.0, 0
        # The task-boundary hook's subscribers, in the order they run: the matrix sees the weights the task
        # ended with, EWC takes its Fisher, the replay buffer closes the task, the stream moves on.
        for listener in (self.matrix, self.ewc, self.replay, self.stream):
            self.schedule.subscribe(listener)
        for task in self.tasks:
            log.info("continual %s", task.describe())

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def attach(self, engine, guard) -> None:
        """The engine (evaluation, EWC) and the guard's quarantine (never replay or weigh quarantined samples)."""
        self.engine = engine
        self.stream.attach_quarantine(guard.quarantined)
        self.ewc.attach(engine, lambda sample: bool(guard.quarantined) and
                        self.pool.window_of(sample) in guard.quarantined)

    def states(self) -> list:
        return [(name, part, False) for name, part in (("continual_schedule", self.schedule),
                ("replay_buffer", self.replay), ("ewc", self.ewc), ("task_matrix", self.matrix))]

    def on_fit_start(self, trainer) -> None:
        """A fresh run evaluates matrix row 0 and starts the first task; a resumed one goes on."""
        self.matrix.metrics = trainer.metrics
        self._done_step = trainer.engine.global_steps
        if not self.schedule.started:
            self.matrix.evaluate_row("init", 0)
        self.schedule.begin()

    # ---- per step ------------------------------------------------------------------------
    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: the LM loss plus the EWC penalty once a task has been consolidated."""
        penalty = self.ewc.penalty()
        if penalty is None:
            return loss
        self._penalty_sum = self._penalty_sum + penalty.detach().double()  # on the device: read at log time only
        self._penalty_count += 1
        return loss + penalty.to(loss.dtype)

    def on_step_done(self, step: int) -> None:
        """The replay feed; after a task's last step its end hooks (before anything is checkpointed at it)."""
        # Tasks switch on global steps, which count the updates the fp16 loss scaler skipped; DeepSpeed
        # steps the LR schedule only for applied ones. Without this each overflow would move every later
        # re-warm one step past its task's start.
        self.engine.lr_scheduler.catch_up(step)
        self.stream.end_step()
        self.schedule.after_step(step)
        self._done_step = step

    def on_stopping(self, reason: str) -> None:
        """A stop raised after the optimizer step (the loss scale at its minimum) skips on_step_done. On a
        task's last step its end hooks (Fisher, matrix row, replay merge) must still run before the exit
        checkpoint, or the resumed run would train that task one step more and close it a step late."""
        step = self.engine.global_steps
        if self.schedule.started and getattr(self, "_done_step", step) != step:
            self.on_step_done(step)

    def train_record(self, step: int = 0) -> dict:
        """Extra fields of the periodic train record (the task, replay and EWC at work)."""
        record = {"task": self.schedule.task_for_step(self.engine.global_steps).name,
                  "replay_buffer": len(self.replay)}
        if self._penalty_count:
            record["ewc_penalty"] = float(self._penalty_sum) / self._penalty_count
            self._penalty_sum, self._penalty_count = 0.0, 0
        return record

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate_task(self, index: int, max_batches: int) -> dict:
        """A task's validation loss: its folders' losses weighted as the blend weighs them (collective)."""
        task = self.tasks[index]
        totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0, "bpb": 0.0}
        for key, weight in zip(task.sources, task.weights):
            reader = self.pool.validation(self.pool.add(key), self.rank, self.world_size, self.micro_batch)
            result = evaluate(self.engine, reader.iter_epoch_once(), max_batches)
            totals["loss"] += weight * result["loss"]
            totals["accuracy"] += weight * result["accuracy"]
            totals["tokens"] += result["tokens"]
            # Bits per byte need the split's text bytes, which a manifest counts for whole splits only.
            text_bytes = reader.manifest.split("validation").extra.get("text_bytes")
            if totals["bpb"] is not None and text_bytes and key.val_documents is None:
                totals["bpb"] += weight * bits_per_byte(result["loss"], reader.num_tokens, text_bytes)
            else:
                totals["bpb"] = None
        totals["perplexity"] = perplexity(totals["loss"])
        if totals["bpb"] is None:
            del totals["bpb"]
        return totals

    def evaluate_current(self, step: int) -> dict:
        """The regular evaluation (train.eval_interval): the task that trained this step."""
        task = self.schedule.task_for_step(step)
        return {**self.evaluate_task(task.index, self.eval_batches), "task": task.name}

    def summary(self, run_dir: Path) -> Optional[str]:
        if not self.matrix.rows:
            return None
        data = self.matrix.to_dict()
        fmt = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
        return (f"task matrix ({len(self.matrix.rows) - 1}/{len(self.tasks)} tasks): BWT {fmt(data['bwt'])}, "
                f"FWT {fmt(data['fwt'])}, forgetting {[None if f is None else round(f, 4) for f in data['forgetting']]}"
                f"; {run_dir / 'task_matrix.json'} (.csv), heatmap {run_dir / 'task_matrix.png'}")
