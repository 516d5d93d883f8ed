"""Run logging: console and `training.log` lines on rank 0, `metrics.jsonl` records, DeepSpeed monitors."""
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

    def write(self, kind: str, step: int, values: Mapping[str, object]) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None:
            events = [(f"{kind}/{k}", float(v), step) for k, v in record.items()
                      if k not in ("kind", "step", "time") and isinstance(v, (int, float))]
            self.monitor.write_events(events)


def read_metrics(run_dir: str | Path, kind: Optional[str] = None) -> list[dict]:
    """All records of `metrics.jsonl`, optionally of one kind (`train`, `eval`, ...)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
