"""The console form of the periodic training line (rank 0): a tqdm bar on a terminal, plain lines elsewhere.

`training.log` always gets the `step N: loss ...` line (scripts parse it). On a terminal the console
shows a bar instead (step/total, ETA, tokens/s, loss, learning rate, loss scale, task), and every other
log line (evaluations, checkpoints, warnings) prints above the bar. When stdout is not a terminal
(SLURM logs, CI, pipes) the console gets the same plain line as the file, as before.
"""
from __future__ import annotations

import logging
import sys
from typing import Mapping

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.metrics import format_train_line


class _HideProgressLine(logging.Filter):
    """On the console handler while the bar shows: the bar already says what the step line says."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "progress_line", False)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Call `update(step, record)` at each log interval only: the display never reads the device itself,
    so it adds no host synchronisation. `close()` (or use it as a context manager) at the end."""

    def __init__(self, log: logging.Logger, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.log = log
        self.bar = None
        self._redirect = None
        # FileHandler is a StreamHandler too; the console is the plain one.
        console = next((h for h in log.handlers if type(h) is logging.StreamHandler), None)
        # tqdm's redirect recognises a console handler only by its stream being sys.stdout/stderr itself.
        if (enabled and console is not None and console.stream in (sys.stdout, sys.stderr)
                and _isatty(console.stream)):
            before = set(log.handlers)
            self._redirect = logging_redirect_tqdm([log])
            self._redirect.__enter__()
            for handler in set(log.handlers) - before:  # tqdm's stand-in for the console handler
                handler.addFilter(_HideProgressLine())
            # mininterval 0: updates come only every log_interval steps and each one should show.
            self.bar = tqdm(total=total_steps, initial=initial_step, file=console.stream, unit="step",
                            dynamic_ncols=True, mininterval=0)
        self.enabled = enabled

    def update(self, step: int, record: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        self.log.info(format_train_line(step, record), extra={"progress_line": True})
        if self.bar is None:
            return
        parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
        if "loss_scale" in record:
            parts.append(f"scale {record['loss_scale']:g}")
        if record.get("task") is not None:
            parts.append(f"task {record['task']}")
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        self.bar.update(step - self.bar.n)  # tqdm's rate and ETA come from these updates' spacing

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)  # the logger's own handlers come back
            self._redirect = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
