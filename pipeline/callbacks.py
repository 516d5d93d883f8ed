"""The Trainer's callbacks (pipeline/trainer.py documents the order of the hooks): each mechanism decides its
own timing. Adding one is a class here plus one line in `default_callbacks`."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from pipeline import comm
from pipeline.engine.budget import TrainClock
from pipeline.engine.checkpoint import BEST_TAG, BestCheckpoint
from pipeline.engine.preemption import PREEMPTED_EXIT_CODE, Preemption
from pipeline.engine.stability import BatchGuard, Drill, LossScaleWatch, describe_skip_counts
from pipeline.trainer import Callback

log = logging.getLogger("pipeline")


def default_callbacks(trainer) -> list:
    """The launcher's list, in call order (the state names are the checkpoint's keys: do not rename them)."""
    cfg, continual = trainer.cfg, trainer.continual
    stability = StabilityCallback(trainer)
    callbacks = [stability, TrainLog(trainer, stability)]
    if continual is not None:  # the engine (evaluation, EWC) and the guard's quarantine, before the resume
        continual.attach(trainer.engine, stability.guard)
        callbacks.append(continual)
    if cfg.plasticity.enabled:  # STDP and metaplasticity beside backprop
        from pipeline.plasticity import Plasticity

        callbacks.append(Plasticity(cfg.plasticity, trainer.engine, trainer.model))
    callbacks += [TrainBudget(trainer), Schedule(trainer), trainer.preemption]
    if cfg.train.wandb and trainer.rank == 0:  # after TrainLog: its report's plots go to W&B at the end
        callbacks.append(WandbCallback(trainer))
    for callback in callbacks if continual is not None else ():
        if callback is not continual:
            continual.schedule.subscribe(callback)  # task boundaries reach every callback (plasticity's reference)
    return callbacks


class StabilityCallback(Callback):
    """The collective batch guard, the fp16 loss-scale watch and the fault drills (pipeline/engine/stability.py)."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.guard = BatchGuard(cfg.stability, trainer.run_dir, trainer.reader)
        self.watch = LossScaleWatch(trainer.engine, cfg.stability, trainer.ds_config)
        self.drill = Drill(cfg.stability)
        self.trainer, self.overflow = trainer, None

    def states(self) -> list:
        return [("guard", self.guard, False), ("scale_watch", self.watch, False)]

    def on_step_start(self, step: int) -> None:
        self.watch.before_step()

    def on_logits(self, logits, step: int, last: bool):
        return self.drill.apply_to_logits(logits, step, last_micro_batch=last)

    def on_loss(self, loss, step: int, attempt: int):
        return self.drill.apply_to_loss(loss, step, attempt)

    def skip_reason(self, loss, batch, step: int, attempt: int):
        reason = self.guard.check(loss, batch["sample_index"], step, attempt)
        if reason is not None:
            log.warning("step %d: skipped a micro-batch on every rank (%s); see %s", step, reason, self.guard.path.name)
        return reason

    def on_step_end(self, step: int, applied: bool) -> None:
        overflow = self.watch.after_step(step)  # raises RunAborted at the minimum loss scale
        if overflow is not None:
            log.warning("step %d: optimizer step skipped by the fp16 loss scaler (overflow): scale %s -> %s, "
                        "hysteresis left %s", step, overflow.get("scale_before"), overflow.get("scale_after"),
                        overflow.get("hysteresis_left"))
            self.trainer.metrics.write("overflow", step, overflow)
        self.overflow = overflow

    def train_record(self, step: int) -> dict:
        return {**self.watch.state(), **describe_skip_counts(self.guard, self.watch)}

    def on_task_start(self, task) -> None:
        self.guard.on_task_start(task)  # a new domain's losses are its own spike baseline


class TrainLog(Callback):
    """The periodic `train` record (metrics.jsonl, the `step N: loss` line, the progress bar) and the run summary."""

    def __init__(self, trainer, stability: StabilityCallback):
        from pipeline.flops import MFU

        self.trainer, self.stability = trainer, stability
        cfg, engine = trainer.cfg, trainer.engine
        # Every rank measures the CPU peak at once, so the matmul shares the cores as training will.
        self.mfu = MFU(cfg.model, cfg.data.sequence_length, engine.device, trainer.world_size, cfg.train.peak_flops,
                       {"fp16": torch.float16, "bf16": torch.bfloat16}.get(trainer.precision, torch.float32))
        log.info("mfu: %s", self.mfu.describe())
        self.gas = engine.gradient_accumulation_steps()
        self.tokens_per_step = trainer.micro_batch * self.gas * trainer.world_size * cfg.data.sequence_length
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        self.steps, self.seconds = 0, 0.0  # throughput counts training time, not eval or checkpoints
        self.progress = None

    def on_fit_start(self, trainer) -> None:
        from pipeline.progress import Progress

        self.progress = Progress(log, trainer.cfg.train.max_steps, initial_step=trainer.engine.global_steps,
                                 enabled=trainer.rank == 0)

    def on_step_start(self, step: int) -> None:
        self.t_step = time.time()
        self.lr = self.trainer.scheduler.get_last_lr()[0]  # what this step trains with

    def on_micro_batch(self, loss) -> None:
        self.loss_sum += loss.detach().double()

    def on_step_end(self, step: int, applied: bool) -> None:
        self.steps += 1
        self.seconds += time.time() - self.t_step

    def on_step_done(self, step: int) -> None:
        from pipeline.metrics import peak_memory_gb

        trainer, cfg = self.trainer, self.trainer.cfg
        if step % cfg.train.log_interval != 0 and step != cfg.train.max_steps:
            return
        mean_loss = comm.all_reduce(self.loss_sum, out_device="cpu").item() / (trainer.world_size * self.steps * self.gas)
        grad_norm = trainer.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        record = {"loss": mean_loss, "lr": self.lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens_per_step * self.steps / self.seconds, "epoch": trainer.reader.epoch,
                  **self.stability.train_record(step)}
        record.update(mfu=self.mfu(record["tokens_per_s"]), peak_memory_gb=peak_memory_gb(trainer.engine.device))
        record.update({k: v.item() for k, v in trainer.model.observables().items()})
        for callback in trainer.callbacks:
            if callback is not self.stability:
                record.update(callback.train_record(step))
        self.progress.update(step, record)  # the `step N: loss ...` line, and the bar on a terminal
        if self.stability.overflow is None and grad_norm is not None and grad_norm > cfg.stability.grad_norm_warning:
            log.warning("step %d: gradient norm %.1f exceeds stability.grad_norm_warning=%g", step, grad_norm,
                        cfg.stability.grad_norm_warning)
        trainer.metrics.write("train", step, record)
        self.loss_sum.zero_()
        self.steps, self.seconds = 0, 0.0

    def on_exit(self, reason: str) -> None:
        """The bar closes first; a finished (or exit_after_steps) run then sums itself up."""
        from pipeline.metrics import read_metrics

        self.progress.close()
        trainer, run_dir = self.trainer, self.trainer.run_dir
        if trainer.abort_message:  # a stop raised by a mechanism (RunAborted, ...)
            log.error("%s", trainer.abort_message)
        if reason not in ("end", "stopped"):
            return
        skips = describe_skip_counts(self.stability.guard, self.stability.watch)
        if any(v for k, v in skips.items() if k.startswith("skipped")):
            log.info("skipped: %s (details in %s)", skips, self.stability.guard.path)
        evals = read_metrics(run_dir, "eval") if trainer.rank == 0 else []
        if len(evals) >= 2:
            log.info("validation loss %.4f (step %d) -> %.4f (step %d)", evals[0]["loss"], evals[0]["step"],
                     evals[-1]["loss"], evals[-1]["step"])
        log.info("done at step %d. run folder: %s", trainer.engine.global_steps, run_dir.resolve())
        log.info("  checkpoints: %s  log: %s  metrics: %s", trainer.checkpointer.dir, run_dir / "training.log",
                 run_dir / "metrics.jsonl")
        if trainer.continual is not None:
            log.info("  %s", trainer.continual.summary(run_dir))
        if trainer.cfg.train.report and trainer.rank == 0:
            from pipeline.report import build_report  # matplotlib: imported on the one rank that draws

            try:
                log.info("  report: %s", build_report(run_dir))
            except Exception as err:  # a plotting problem must not fail a finished run
                log.warning("the run report could not be written (%s: %s); retry with python -m pipeline.report %s",
                            type(err).__name__, err, run_dir)


class TrainBudget(Callback):
    """Training tokens and seconds (pipeline/engine/budget.py) in every eval record, and the train.max_seconds stop:
    a collective decision, so every rank evaluates, checkpoints and stops after the same step."""

    def __init__(self, trainer):
        self.clock = TrainClock(trainer.cfg.train.max_seconds)
        self.tokens_per_step = (trainer.micro_batch * trainer.engine.gradient_accumulation_steps() *
                                trainer.world_size * trainer.cfg.data.sequence_length)
        self.out_of_time, self.started = False, 0.0

    def states(self) -> list:
        return [("clock", self.clock, True)]  # optional: checkpoints from before it existed still resume

    def on_step_start(self, step: int) -> None:
        self.started = time.time()

    def on_step_done(self, step: int) -> None:
        self.out_of_time = self.clock.tick(self.tokens_per_step, time.time() - self.started)  # collective

    def eval_record(self, step: int) -> dict:
        return self.clock.totals()

    def should_evaluate(self, step: int) -> bool:
        return self.out_of_time

    def should_save(self, step: int) -> bool:
        return self.out_of_time

    def should_stop(self, step: int):
        if self.out_of_time:
            log.info("train.max_seconds=%g reached at step %d (%.1f s of training)", self.clock.max_seconds, step,
                     self.clock.seconds)
            return "stopped"
        return False


class Schedule(Callback):
    """When to evaluate and checkpoint (train.eval_interval, checkpoint_interval, keep_best, exit_after_steps),
    the best checkpoint, and the run's closing lines."""

    def __init__(self, trainer):
        self.trainer, self.train = trainer, trainer.cfg.train
        self.best = BestCheckpoint()
        trainer.checkpointer.best = self.best  # `best` is replaced only by a better model than the one on disk

    def states(self) -> list:
        # `run_config` for load_for_inference; `best` optional: checkpoints from before it existed still resume
        return [("run_config", self.trainer.run_config, False), ("best", self.best, True)]

    def on_fit_start(self, trainer) -> None:
        self.start_step = trainer.engine.global_steps

    def _last(self, step: int) -> bool:
        return step == self.train.max_steps

    def _stopping(self, step: int) -> bool:
        return bool(self.train.exit_after_steps) and step - self.start_step >= self.train.exit_after_steps

    def should_evaluate(self, step: int) -> bool:
        return step % self.train.eval_interval == 0 or self._last(step)

    def on_evaluate(self, step: int, result: dict) -> None:
        # A continual schedule evaluates each task on its own data: its losses do not rank checkpoints.
        if self.train.keep_best and self.trainer.continual is None and self.best.improved(step, result["loss"]):
            log.info("best validation loss so far: checkpoint %s", self.trainer.save(step, tag=BEST_TAG))

    def should_save(self, step: int) -> bool:
        return step % self.train.checkpoint_interval == 0 or self._last(step) or self._stopping(step)

    def should_stop(self, step: int) -> bool:
        if self._stopping(step) and not self._last(step):
            log.info("exit_after_steps=%d reached at step %d; resume with --train.resume auto",
                     self.train.exit_after_steps, step)
            return True
        return False


class PreemptionCallback(Callback, Preemption):
    """A scheduler's signal: every rank stops after the same step (one all-reduce per step), checkpoints, exits 75.

    Asked again after a step's evaluation or checkpoint, which can take minutes: a signal that arrives
    during either stops the run right after it, not one training step later (and a checkpoint just
    written is the one the run stops with)."""

    busy_at: Optional[int] = None  # the last step with an evaluation or a checkpoint

    def should_interrupt(self, step: int) -> bool:
        self.step = step
        return self.requested()  # every rank, every step: one all-reduce of one number

    def on_evaluate(self, step: int, result: dict) -> None:
        self.busy_at = step

    def on_save(self, step: int, tag) -> None:
        self.busy_at = step

    def should_stop(self, step: int):
        return "preempted" if self.busy_at == step and self.requested() else False

    def on_exit(self, reason: str) -> None:
        if reason == "preempted":
            log.warning("preempted (%s) after step %d: checkpoint saved; exit code %d asks for a requeue, and "
                        "the next run resumes with --train.resume auto", self.describe(), self.step,
                        PREEMPTED_EXIT_CODE)

class WandbCallback(Callback):
    """Weights & Biases (`--train.wandb PROJECT`, rank 0): every metrics.jsonl record, the run config, and the
    report's plots at the end, as one W&B run across resumes (pipeline/wandb_log.py)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.wandb = None

    def on_fit_start(self, trainer) -> None:
        from pipeline.wandb_log import WandbLog

        train = trainer.cfg.train
        self.wandb = WandbLog(train.wandb, trainer.run_dir, trainer.cfg.to_dict(), trainer.resumed_from is not None,
                              train.wandb_entity, train.wandb_name, train.wandb_tags)
        trainer.metrics.listeners.append(self.wandb)

    def on_exit(self, reason: str) -> None:
        if self.wandb is not None:
            self.wandb.finish(self.trainer.run_dir / "report")
