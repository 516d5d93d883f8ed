"""The Trainer's call order with a fake engine, in one process (milliseconds; the real thing: test_train_e2e.py).

The skip, abort, preemption and task-boundary paths, and the one exit path that saves whatever the reason.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.config import StabilityConfig
from pipeline.continual.schedule import TaskSchedule
from pipeline.engine.stability import BatchGuard, RunAborted
from pipeline.run_config import parse_run_config
from pipeline.trainer import Callback, Trainer

VOCAB, SEQ = 7, 5


class FakeEngine:
    """One weight; counts micro-steps and applies an optimizer step every `gas` of them."""

    def __init__(self, gas: int = 2):
        self.gas, self.micro, self.global_steps, self.device = gas, 0, 0, torch.device("cpu")
        self.weight = torch.nn.Parameter(torch.zeros(VOCAB))
        self.module = torch.nn.Module()
        self.monitor = None
        self.skip_steps: set = set()  # optimizer steps the "loss scaler" skips

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def __call__(self, ids):
        return self.weight.expand(*ids.shape, VOCAB)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.gas == 0:
            self.global_steps += 1

    def was_step_applied(self) -> bool:
        return self.global_steps not in self.skip_steps

    def get_global_grad_norm(self):
        return 1.0

    def eval(self): ...
    def train(self): ...


class FakeReader:
    vocab_size, epoch = VOCAB, 0

    def __init__(self):
        self.position = 0

    def next_batch(self) -> dict:
        self.position += 1
        ids = torch.full((2, SEQ), self.position % VOCAB)
        return {"input_ids": ids, "targets": ids, "sample_index": torch.tensor([2 * self.position, 2 * self.position + 1])}

    def window_of(self, sample: int) -> int:
        return sample

    def sample_documents(self, sample: int) -> list:
        return []

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class Recorder(Callback):
    """Writes every hook it sees into `calls`; optionally skips, aborts or interrupts on cue."""

    def __init__(self, calls: list, skip=(), interrupt_at=None, tasks=None):
        self.calls, self.skip, self.interrupt_at = calls, set(skip), interrupt_at
        self.schedule = TaskSchedule(tasks) if tasks else None
        if self.schedule:
            self.schedule.subscribe(self)

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")
        if self.schedule:
            self.schedule.begin()

    def on_step_start(self, step):
        self.calls.append(f"start {step}")

    def skip_reason(self, loss, batch, step, attempt):
        if (step, attempt) in self.skip:
            self.calls.append(f"skip {step}.{attempt}")
            return "nan"
        return None

    def on_micro_batch(self, loss):
        self.calls.append("micro")

    def on_step_end(self, step, applied):
        self.calls.append(f"end {step}{'' if applied else ' skipped'}")

    def train_record(self, step):
        return {"recorded": step}

    def on_step_done(self, step):
        if self.schedule:
            self.schedule.after_step(step)

    def on_task_start(self, task):
        self.calls.append(f"task_start {task.name}")

    def on_task_end(self, task):
        self.calls.append(f"task_end {task.name}")

    def should_interrupt(self, step):
        return step == self.interrupt_at

    def should_evaluate(self, step):
        return step % 2 == 0

    def should_save(self, step):
        return step % 3 == 0

    def on_exit(self, reason):
        self.calls.append(f"exit {reason}")


def make_trainer(tmp_path, *callbacks, max_steps=4, gas=2):
    cfg = parse_run_config(["--train.max_steps", str(max_steps), "--train.out_dir", str(tmp_path),
                            "--train.micro_batch_size", "2"])
    engine = FakeEngine(gas)
    trainer = Trainer(cfg, parts=dict(engine=engine, model=None, reader=FakeReader(), val_reader=None,
                                      scheduler=None), callbacks=lambda t: list(callbacks))
    saves, evals = [], []
    trainer.checkpointer = SimpleNamespace(save=lambda engine, step, tag=None: saves.append(step) or f"step{step}")
    trainer.evaluate = lambda step: evals.append(step)
    trainer.metrics = SimpleNamespace(write=lambda *a: None)
    return trainer, engine, saves, evals


def test_order_of_a_plain_run(tmp_path):
    calls = []
    trainer, engine, saves, evals = make_trainer(tmp_path, Recorder(calls), max_steps=3)
    assert trainer.fit() == 0
    assert calls == ["fit_start"] + [c for s in (1, 2, 3) for c in (f"start {s}", "micro", "micro", f"end {s}")] + \
        ["exit end"]
    assert evals == [0, 2] and saves == [3], "the last step's checkpoint is not written twice by the exit path"


def test_a_skipped_micro_batch_is_replaced_and_trains_nothing(tmp_path):
    calls = []
    trainer, engine, saves, _ = make_trainer(tmp_path, Recorder(calls, skip={(2, 0), (2, 1)}), max_steps=2)
    trainer.fit()
    step2 = calls[calls.index("start 2"):calls.index("end 2") + 1]
    assert step2 == ["start 2", "skip 2.0", "skip 2.1", "micro", "micro", "end 2"]
    assert engine.micro == 4 and trainer.reader.position == 6  # two replacement micro-batches read


def test_fp16_skipped_step_is_reported_as_not_applied(tmp_path):
    calls = []
    trainer, engine, _, _ = make_trainer(tmp_path, Recorder(calls), max_steps=2)
    engine.skip_steps = {1}
    trainer.fit()
    assert "end 1 skipped" in calls and "end 2" in calls


def test_abort_restores_the_reader_saves_and_exits_through_the_one_path(tmp_path):
    """The batch guard gives up mid-step: the partial step is dropped, the last applied step saved, exit 3."""
    calls = []

    class Guard(Callback):
        def __init__(self):
            self.guard = BatchGuard(StabilityConfig(max_consecutive_skips=2, drill_nan_loss=[]), tmp_path,
                                    FakeReader())

        def skip_reason(self, loss, batch, step, attempt):
            return self.guard.check(loss * (float("nan") if step == 3 else 1.0), batch["sample_index"], step,
                                    attempt)

    trainer, engine, saves, _ = make_trainer(tmp_path, Guard(), Recorder(calls), max_steps=6)
    assert trainer.fit() == RunAborted.exit_code
    assert engine.global_steps == 2 and saves == [2]
    assert trainer.reader.position == 4, "the reader is back where step 3 began"
    assert calls[-3:] == ["end 2", "start 3", "exit aborted"]
    assert "consecutive micro-batches were skipped" in trainer.abort_message


def test_preemption_stops_before_eval_and_save_and_checkpoints_once(tmp_path):
    calls = []
    trainer, engine, saves, evals = make_trainer(tmp_path, Recorder(calls, interrupt_at=2), max_steps=6)
    assert trainer.fit() == 75
    assert evals == [0] and saves == [2] and calls[-1] == "exit preempted"


def test_preemption_on_the_last_step_finishes_normally(tmp_path):
    calls = []
    trainer, _, saves, _ = make_trainer(tmp_path, Recorder(calls, interrupt_at=3), max_steps=3)
    assert trainer.fit() == 0 and saves == [3] and calls[-1] == "exit end"


def test_task_boundaries_run_after_the_step_and_before_its_checkpoint(tmp_path):
    from pipeline.continual.schedule import Task

    tasks = [Task(index=i, name=n, sources=(), weights=(), start=3 * i, steps=3, lr=0.1, rewarm=1,
                  replay_per_micro_batch=0) for i, n in enumerate(("a", "b"))]
    calls = []

    class SaveMarker(Callback):
        def should_save(self, step):
            calls.append(f"save? {step}")
            return False

    trainer, _, saves, _ = make_trainer(tmp_path, Recorder(calls, tasks=tasks), SaveMarker(), max_steps=6, gas=1)
    trainer.fit()
    assert calls[:3] == ["fit_start", "task_start a", "start 1"]
    i = calls.index("end 3")
    assert calls[i:i + 4] == ["end 3", "task_end a", "task_start b", "save? 3"]
    assert calls[-3:] == ["task_end b", "save? 6", "exit end"]
    assert saves == [3, 6]


def test_the_trainer_is_the_checkpointed_state(tmp_path):
    class Counter(Callback):
        def __init__(self):
            self.n = 0

        def on_step_end(self, step, applied):
            self.n += 1

        def states(self):
            return [("counter", self, False)]

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    counter = Counter()
    trainer, *_ = make_trainer(tmp_path, counter, max_steps=2)
    trainer.fit()
    state = trainer.state_dict()
    assert state == {"reader": {"position": 4}, "counter": {"n": 2}}
    counter.n, trainer.reader.position = 0, 0
    trainer.load_state_dict(state)
    assert counter.n == 2 and trainer.reader.position == 4
    with pytest.raises(KeyError, match="counter"):
        trainer.load_state_dict({"reader": {"position": 1}})


def test_a_stop_raised_with_its_own_reason_and_code_leaves_by_the_exit_path(tmp_path):
    """What a future mechanism (say, a lost peer) raises: its reason reaches on_stopping and on_exit, its code the
    shell; the checkpoint comes after on_stopping (a task's end hooks could run there first)."""
    calls = []

    class LostPeer(RuntimeError):
        exit_code, reason = 4, "lost_peer"

    class Raiser(Callback):
        def on_step_end(self, step, applied):
            if step == 2:
                raise LostPeer("rank 1 stopped answering")

        def on_stopping(self, reason):
            calls.append(f"stopping {reason}")

    trainer, engine, saves, _ = make_trainer(tmp_path, Raiser(), Recorder(calls), max_steps=5)
    trainer.checkpointer = SimpleNamespace(save=lambda engine, step, tag=None: calls.append(f"save {step}"))
    assert trainer.fit() == 4
    assert calls[-3:] == ["stopping lost_peer", "save 2", "exit lost_peer"]
    assert trainer.reader.position == 4, "the optimizer step was taken: the reader stays at its end"


def test_should_stop_may_name_its_reason(tmp_path):
    calls = []

    class Signal(Callback):
        def should_stop(self, step):
            return "preempted" if step == 2 else False

    trainer, _, saves, evals = make_trainer(tmp_path, Signal(), Recorder(calls), max_steps=5)
    assert trainer.fit() == 75
    assert evals == [0, 2] and saves == [2] and calls[-1] == "exit preempted", "evaluated, saved once, exit 75"


@pytest.mark.parametrize("during", ["evaluation", "checkpoint"])
def test_a_signal_during_an_evaluation_or_a_checkpoint_stops_right_after_it(tmp_path, during):
    """Not one training step later (faults issue, item 4), and a checkpoint just written is the one kept."""
    import signal

    from pipeline.callbacks import PreemptionCallback

    saved_handler = signal.getsignal(signal.SIGUSR2)
    try:
        preemption = PreemptionCallback(["SIGUSR2"])
        trainer, engine, saves, evals = make_trainer(tmp_path, Recorder([]), preemption, max_steps=9)
        busy_step = 2 if during == "evaluation" else 3  # Recorder evaluates even steps, saves multiples of 3

        def evaluate(step):
            evals.append(step)
            if step == busy_step:
                preemption._on_signal(signal.SIGUSR2, None)  # arrives while the evaluation runs
            trainer._each("on_evaluate", step, {})

        def save(engine_, step, tag=None):
            saves.append(step)
            if step == busy_step:
                preemption._on_signal(signal.SIGUSR2, None)  # arrives while the checkpoint is written
            return f"step{step}"

        trainer.evaluate = evaluate
        trainer.checkpointer = SimpleNamespace(save=save)
        assert trainer.fit() == 75
        assert engine.global_steps == busy_step, "no further training step"
        assert saves == [busy_step], "one checkpoint, of the step the signal arrived in"
    finally:
        signal.signal(signal.SIGUSR2, saved_handler)
