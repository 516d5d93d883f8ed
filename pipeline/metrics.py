"""Run logging: console and `training.log` lines on rank 0, `metrics.jsonl` records, DeepSpeed monitors,
and the measurements that go into the records (peak memory, bits per byte)."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

LOGGER_NAME = "pipeline"


def setup_logging(run_dir: Path, rank: int) -> logging.Logger:
    """Rank 0 logs INFO to the console and to `<run_dir>/training.log`; other ranks only warnings and errors."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "training.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.WARNING)
    return logger


def format_train_line(step: int, record: Mapping[str, object]) -> str:
    """The periodic training line of `training.log` and plain consoles; scripts parse it, keep its format."""
    grad_norm = record.get("grad_norm")
    return "step %d: loss %.4f  lr %.2e  grad_norm %s  %.0f tok/s%s" % (
        step, record["loss"], record["lr"], f"{grad_norm:.3f}" if grad_norm is not None else "n/a",
        record["tokens_per_s"], f"  scale {record['loss_scale']:g}" if "loss_scale" in record else "")


def peak_memory_gb(device=None) -> float:
    """Peak memory in GiB (2^30 bytes, as DeepSpeed's memory reports): on a CUDA device the peak allocated
    by tensors since start (or the last torch.cuda.reset_peak_memory_stats); elsewhere the process's peak
    resident set, which also counts the interpreter and libraries (a few hundred MB)."""
    if device is not None and str(device).startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # Linux: the kernel's own high-water mark, exact at the moment of reading
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        pass
    import resource  # ru_maxrss is updated lazily on Linux: it can lag the resident set it should bound
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30  # bytes on macOS, KiB on Linux


def bits_per_byte(loss: float, stream_tokens: int, text_bytes: int) -> float:
    """Validation bits per byte from the mean token loss (nats), for a split of `text_bytes` UTF-8 bytes that
    reads as `stream_tokens` predicted tokens (its documents' tokens plus one EOS each, as the reader packs
    them). Only the split's tokens-per-byte ratio enters, so an evaluation of part of the split
    (`train.eval_batches`) gives the same estimate. Comparable across tokenizers, unlike the loss."""
    return loss / math.log(2) * stream_tokens / text_bytes


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsSink:
    """Appends one JSON record per event to `metrics.jsonl` (rank 0) and forwards scalars to DeepSpeed's
    monitors (TensorBoard / CSV / W&B, as enabled in the DeepSpeed JSON)."""

    def __init__(self, run_dir: Path, rank: int, monitor=None):
        self.rank = rank
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.path: Optional[Path] = run_dir / "metrics.jsonl" if rank == 0 else None
        self.listeners: list = []  # objects with `log(record)` that get every record too (pipeline/wandb_log.py)

    def write(self, kind: str, step: int, values: Mapping[str, object]) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener.log(record)
        if self.monitor is not None:
            events = [(f"{kind}/{k}", float(v), step) for k, v in record.items()
                      if k not in ("kind", "step", "time") and isinstance(v, (int, float))]
            self.monitor.write_events(events)


def read_metrics(run_dir: str | Path, kind: Optional[str] = None, bad_lines: Optional[list] = None) -> list[dict]:
    """All records of `<run_dir>/metrics.jsonl` (none if it is absent), optionally of one kind (`train`, `eval`,
    ...). With `bad_lines` (a list), unreadable lines are appended there instead of raising."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            if bad_lines is None:
                raise
            bad_lines.append(line)
            continue
        if record is not None and (kind is None or record.get("kind") == kind):
            records.append(record)
    return records


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so an untrained or diverged model's loss stays a finite number."""
    return math.exp(min(loss, 50.0))
