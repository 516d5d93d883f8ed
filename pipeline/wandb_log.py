"""Weights & Biases logging (`--train.wandb PROJECT`): the records of metrics.jsonl, the run config, the report's
plots at the end, and one W&B run across resumes (its id is kept in `<out_dir>/wandb_run_id`).

Rank 0 only; `wandb` is an optional package (requirements-extras.txt), imported only when this is used.
`WANDB_MODE=offline` writes the run under `<out_dir>/wandb/` for a later `wandb sync`.
"""
from __future__ import annotations

import math
import secrets
import string
from pathlib import Path
from typing import Mapping, Optional

ID_FILE = "wandb_run_id"
_NOT_METRICS = ("kind", "step", "time")


def _number(value) -> Optional[float]:
    """metrics.jsonl writes non-finite floats as strings (JSON has none); W&B takes them as floats."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
        return value if not math.isfinite(value) else None
    return value


def _new_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLog:
    """One W&B run for one run folder: `log(record)` for every metrics.jsonl record, `finish()` at the end."""

    def __init__(self, project: str, run_dir: Path, config: Mapping, resumed: bool, entity: Optional[str] = None,
                 name: Optional[str] = None, tags: Optional[list] = None):
        import wandb

        self.wandb = wandb
        id_file = Path(run_dir) / ID_FILE
        # A resumed training run continues its W&B run; a fresh start in the same folder is a new W&B run.
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else _new_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, entity=entity, name=name or Path(run_dir).name, tags=tags or None,
                              config=dict(config), id=run_id, resume="allow", dir=str(run_dir))
        # The training step is the x axis of every chart: a resume re-logs the steps after its checkpoint, which
        # W&B's own monotonic step counter would drop.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: Mapping) -> None:
        values = {f"{record['kind']}/{key}": number for key, value in record.items() if key not in _NOT_METRICS
                  and (number := _number(value)) is not None}
        if values:
            self.run.log({"step": record["step"], **values})

    def finish(self, report_dir: Optional[Path] = None) -> None:
        """Uploads the report's plots (as `report/<name>` images) and closes the run."""
        plots = sorted(Path(report_dir).glob("*.png")) if report_dir is not None and Path(report_dir).is_dir() else []
        if plots:
            self.run.log({f"report/{p.stem}": self.wandb.Image(str(p)) for p in plots})
        self.run.finish()
