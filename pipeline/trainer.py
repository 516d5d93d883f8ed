"""The Trainer: data, model, engine and a list of callbacks; `train_step()`, `evaluate(step)`, `fit()`.

    trainer = Trainer(parse_run_config(argv))
    exit_code = trainer.fit()

`train_step()` is one optimizer step: micro-batches until `gradient_accumulation_steps` of them were
trained (a micro-batch the callbacks skip, collectively, is replaced by the next one), backward and
`engine.step()` for each. Every mechanism around it (the batch guard, the loss-scale watch, the
preemption signal, the continual schedule with replay and EWC, plasticity, logging, checkpoints) is a
`Callback` (pipeline/callbacks.py) that decides its own timing. `Callback` lists the hooks in the order they
are called; every callback sees every hook, in list order (docs/TRAINER.md draws the whole sequence).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from pipeline import comm
from pipeline.config import ConfigError
from pipeline.engine.checkpoint import Checkpointer, ClientState, RunConfigRecord
from pipeline.engine.evaluation import evaluate, lm_loss
from pipeline.engine.preemption import PREEMPTED_EXIT_CODE
from pipeline.metrics import MetricsSink, bits_per_byte, setup_logging

log = logging.getLogger("pipeline")


class Callback:
    """One mechanism around the step; override the hooks it needs. They are called in this order:"""

    def states(self) -> list: return []  # (name, component, optional) registered once in the Trainer's ClientState
    def on_fit_start(self, trainer) -> None: ...  # after the resume, before evaluate(0) of a fresh run
    def on_step_start(self, step: int) -> None: ...  # train_step(): step = global_steps + 1; then per micro-batch:
    def on_logits(self, logits, step: int, last: bool): return logits
    def on_loss(self, loss, step: int, attempt: int): return loss
    def skip_reason(self, loss, batch, step: int, attempt: int) -> Optional[str]: return None  # same on all ranks
    def objective(self, loss): return loss  # what is backpropagated
    def on_micro_batch(self, loss) -> None: ...  # after backward, before engine.step
    def on_step_end(self, step: int, applied: bool) -> None: ...  # applied: False when the fp16 scaler skipped
    def on_step_done(self, step: int) -> None: ...  # run_step(): the log record, task boundaries
    def train_record(self, step: int) -> dict: return {}  # at log steps, from TrainLog.on_step_done
    def on_task_end(self, task) -> None: ...  # from a continual schedule's on_step_done
    def on_task_start(self, task) -> None: ...
    def should_interrupt(self, step: int): return False  # fit(): stop now (truthy; a str names the reason)
    def should_evaluate(self, step: int) -> bool: return False  # every should_* asks all (collectives inside)
    def eval_record(self, step: int) -> dict: return {}  # extra fields of the eval record
    def on_evaluate(self, step: int, result: dict) -> None: ...
    def should_save(self, step: int) -> bool: return False
    def on_save(self, step: int, tag: Optional[str]) -> None: ...  # a checkpoint is complete on every rank
    def should_stop(self, step: int): return False  # stop after this step's evaluation and checkpoint
    def on_stopping(self, reason: str) -> None: ...  # the exit path, before its checkpoint
    def on_exit(self, reason: str) -> None: ...  # end | stopped | preempted | aborted | another stop's reason


class Trainer:
    """Built from the run config; itself the checkpointed state (`state_dict` walks the registered components)."""

    def __init__(self, cfg, parts: Optional[dict] = None, callbacks: Optional[list] = None):
        """`parts` (tests, benchmarks): engine, model, reader, val_reader, scheduler and ds_config built elsewhere
        (a fake engine, say); `callbacks` replaces the default list, a function of the trainer."""
        self.cfg, self.continual, self.resumed_from = cfg, None, None
        if parts is None:
            self._build(cfg)
        else:
            self.rank, self.world_size = comm.world()
            self.run_dir, self.micro_batch = Path(cfg.train.out_dir), cfg.train.micro_batch_size
            self.precision, self.ds_config = "fp32", parts.pop("ds_config", {})
            self.__dict__.update(parts)
        self.checkpointer = Checkpointer(self.run_dir, self, keep=cfg.train.keep_checkpoints)
        self.run_config = RunConfigRecord(cfg.to_dict())
        from pipeline.callbacks import default_callbacks

        self.callbacks = callbacks(self) if callbacks is not None else default_callbacks(self)
        self.states = ClientState()  # every stateful component registered once, under its checkpoint key
        self.states.register("reader", self.reader)  # refuses a resume onto data rewritten since (allow_changed)
        for callback in self.callbacks:
            for name, component, optional in callback.states():
                self.states.register(name, component, optional=optional)
        self._saved_step: Optional[int] = None
        self.metrics: Optional[MetricsSink] = None
        self.abort_message: Optional[str] = None

    def _build(self, cfg) -> None:
        from pipeline.callbacks import PreemptionCallback
        from pipeline.continual import ContinualRun
        from pipeline.data import DataError, PackedReader
        from pipeline.engine.setup import (check_precision_supported, configure_cpu_threads, configure_determinism,
                                           initialize, load_deepspeed_config, precision_of)
        from pipeline.model import build_model

        # ---- config: checked before any process group exists
        self.ds_config = ds_config = load_deepspeed_config(cfg.deepspeed_config, cfg.train)
        check_precision_supported(ds_config, cfg.deepspeed_config, cfg.train.allow_cpu_fp16)
        configure_determinism(cfg.train.deterministic)
        # Under deepspeed, srun, mpirun or alone; every collective gives up after train.collective_timeout_s.
        self.rank, self.world_size = comm.init_distributed(cfg.train.collective_timeout_s)
        configure_cpu_threads()  # after: under srun and mpirun the ranks per node are known only now
        self.run_dir = run_dir = Path(cfg.train.out_dir)
        setup_logging(run_dir, self.rank)
        self.preemption = PreemptionCallback(cfg.train.preemption_signals)  # from now on a signal: checkpoint

        # ---- data: each rank reads its own slice; a continual schedule's stream stands in for the reader
        self.micro_batch = micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        verify = int(os.environ.get("LOCAL_RANK", "0")) == 0  # one process per node hashes the shards
        # A check some ranks make alone (the shard checksums) ends every rank with the same sentence.
        with comm.fail_together(ConfigError, DataError, OSError):
            continual = ContinualRun(cfg, micro_batch, ds_config["gradient_accumulation_steps"], self.rank,
                                     self.world_size, verify, run_dir) if cfg.continual.enabled else None
            if continual is not None:
                cfg.train.max_steps = continual.total_steps
            reader = lambda split, **kw: PackedReader(  # noqa: E731
                cfg.data.data_dir, split=split, sequence_length=cfg.data.sequence_length,
                micro_batch_size=micro_batch, seed=cfg.data.seed, rank=self.rank, world_size=self.world_size,
                verify_checksums=verify, **kw)
            trace = run_dir / "samples" / f"rank{self.rank}.jsonl" if cfg.data.trace_samples else None
            self.reader = continual.stream if continual else reader("train", trace_file=trace,
                                                                    allow_changed=cfg.data.allow_changed)
            self.val_reader = continual.validation if continual else reader("validation")
            if self.reader.vocab_size > cfg.model.vocab_size:
                raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                                  f"vocabulary ({self.reader.vocab_size}) of {cfg.data.data_dir}/manifest.json")

        # ---- model and engine: identical initial weights on every rank, then per-rank dropout streams
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model)  # model.arch: the hybrid, or the baseline Transformer
        torch.manual_seed(cfg.train.seed + 1 + self.rank)
        self.engine, self.scheduler = initialize(self.model, ds_config, cfg.train,
                                                 continual.lr_scheduler if continual else None,
                                                 plasticity=cfg.plasticity)  # meta: the metaplastic optimizer
        self.precision = precision_of(ds_config)
        if self.rank == 0:
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
            shutil.copyfile(self.reader.tokenizer_path, run_dir / "tokenizer.model")
        d = self.reader.describe()
        log.info("data: %d train documents, %d tokens -> %d samples/epoch (dropped per epoch: %d samples, %d tail "
                 "tokens); validation: %d documents, %d tokens", d["documents"], d["stream_tokens"], d["num_samples"],
                 d["samples_dropped_per_epoch"], d["tail_tokens_dropped"], self.val_reader.num_documents,
                 self.val_reader.num_tokens)
        log.info("model: %.2fM parameters, %s, ZeRO-2 on %d ranks (%s), micro batch %d x accumulation %d x seq %d",
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.precision, self.world_size,
                 self.engine.device, micro_batch, self.engine.gradient_accumulation_steps(), cfg.data.sequence_length)
        self.continual = continual

    # ---- checkpointed state: the registry of every component that must survive a restart
    def state_dict(self) -> dict:
        return self.states.state_dict()

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        self.states.load_state_dict(state, source=source)

    def save(self, step: int, tag: Optional[str] = None) -> Path:
        folder = self.checkpointer.save(self.engine, step, tag=tag)
        if tag is None:
            self._saved_step = step
        self._each("on_save", step, tag)
        return folder

    def resume(self) -> None:
        """The engine from DeepSpeed's checkpoint, then every registered state, then the RNG."""
        self.resumed_from = resumed_from = self.checkpointer.load(self.engine, self.cfg.train.resume)
        if resumed_from is not None:
            quarantined = self.guard.quarantined if self.guard is not None else ()
            log.info("resumed from %s at step %d (epoch %d)%s", resumed_from, self.engine.global_steps,
                     self.reader.epoch, f", {len(quarantined)} quarantined samples" if quarantined else "")
            if self.run_config.changed:
                log.info("settings changed since that checkpoint: %s", ", ".join(self.run_config.changed))
            self._saved_step = self.engine.global_steps
        self.metrics = MetricsSink(self.run_dir, self.rank, self.engine.monitor)

    @property
    def guard(self):
        return next((c.guard for c in self.callbacks if hasattr(c, "guard")), None)

    def _each(self, hook: str, *args) -> list:
        return [getattr(callback, hook)(*args) for callback in self.callbacks]

    def _chain(self, hook: str, value, *args):
        for callback in self.callbacks:
            value = getattr(callback, hook)(value, *args)
        return value

    # ---- one optimizer step
    def train_step(self) -> int:
        """Train micro-batches until the accumulation count is met; return the new global step."""
        engine, reader = self.engine, self.reader
        step = engine.global_steps + 1  # the step being trained
        self._saved_step = None
        reader_state_at_step_start = reader.state_dict()
        self._each("on_step_start", step)
        gas = engine.gradient_accumulation_steps()
        good, attempt = 0, 0
        try:
            while good < gas:
                batch = reader.next_batch()
                logits = self._chain("on_logits", engine(batch["input_ids"].to(engine.device)), step, good == gas - 1)
                loss = self._chain("on_loss", lm_loss(logits, batch["targets"].to(engine.device)), step, attempt)
                attempt += 1
                reason = next((r for c in self.callbacks if (r := c.skip_reason(loss, batch, step, attempt - 1))),
                              None)
                if reason is not None:  # identical on every rank: the decision was all-gathered
                    continue
                engine.backward(self._chain("objective", loss))
                self._each("on_micro_batch", loss)
                engine.step()  # applies the optimizer only at the accumulation boundary
                good += 1
            step = engine.global_steps
            self._each("on_step_end", step, engine.was_step_applied())
        except Exception as err:
            # A stop (RunAborted, ...) drops the partial step: the checkpoint holds the last applied step and the
            # reader position at its end, so a resume redoes this step (skipping what is now quarantined).
            if hasattr(err, "exit_code") and good < gas:
                reader.load_state_dict(reader_state_at_step_start)
            raise
        return step

    # ---- evaluation
    def evaluate(self, step: int) -> dict:
        continual = self.continual
        result = (continual.evaluate_current(step) if continual else
                  evaluate(self.engine, self.val_reader.iter_epoch_once(), self.cfg.train.eval_batches))
        text_bytes = None if continual else self.val_reader.manifest.split("validation").extra.get("text_bytes")
        if text_bytes:  # manifests written before data_prep counted bytes have none
            result["bpb"] = bits_per_byte(result["loss"], self.val_reader.num_tokens, text_bytes)
        log.info("eval step %d: loss %.4f  ppl %.2f  acc %.3f%s  (%d tokens)", step, result["loss"],
                 result["perplexity"], result["accuracy"], f"  bpb {result['bpb']:.4f}" if "bpb" in result else "",
                 result["tokens"])
        for callback in self.callbacks:
            result.update(callback.eval_record(step))
        self.metrics.write("eval", step, result)
        self._each("on_evaluate", step, result)
        return result

    # ---- the loop, and its one exit path
    def begin(self) -> None:
        """The resume (if not done yet), then on_fit_start."""
        if self.metrics is None:
            self.resume()
        self._each("on_fit_start", self)

    def run_step(self) -> int:
        """One step of fit()'s loop without its evaluation and checkpoint: train_step, then on_step_done."""
        step = self.train_step()
        self._each("on_step_done", step)
        return step

    def fit(self) -> int:
        """Train to train.max_steps (or a stop); return the process exit code."""
        self.begin()
        step, code = self.engine.global_steps, 0
        if step == 0:
            self.evaluate(0)
        try:
            while step < self.cfg.train.max_steps:
                step = self.run_step()
                last = step == self.cfg.train.max_steps
                stop = _reason(self._each("should_interrupt", step), "preempted")
                if stop and not last:
                    break
                if any(self._each("should_evaluate", step)):
                    self.evaluate(step)
                if any(self._each("should_save", step)):
                    log.info("checkpoint %s", self.save(step))
                stop = _reason(self._each("should_stop", step), "stopped")
                if stop and not last:
                    break
            else:
                stop = None
        except Exception as err:  # a stop raised by a mechanism (RunAborted: exit code 3) leaves by the same path
            if not hasattr(err, "exit_code"):
                raise
            stop, code, self.abort_message = getattr(err, "reason", "aborted"), err.exit_code, str(err)
        reason = stop or "end"
        code = PREEMPTED_EXIT_CODE if reason == "preempted" else code
        self._each("on_stopping", reason)
        if self._saved_step != self.engine.global_steps:  # whatever the reason: the state it stops in is kept
            log.info("checkpoint %s", self.save(self.engine.global_steps))
        self._each("on_exit", reason)
        return code


def _reason(answers: list, default: str) -> Optional[str]:
    """The first truthy answer of a should_* hook, as a reason (True means `default`)."""
    answer = next((a for a in answers if a), None)
    return None if answer is None else answer if isinstance(answer, str) else default
