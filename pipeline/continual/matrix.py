"""The task x task evaluation matrix: every task's validation loss before training and after each task.

`R[r][j]` is the validation loss (mean token NLL, nats; lower is better) on task j: row 0 before any
training, row r after training task r (tasks numbered from 1). With T tasks, after row i:

* forgetting of task j (Chaudhry et al. 2018), for tasks j < i:  R[i][j] - min_{j <= l < i} R[l][j]
  (how far the loss rose above its best since the task was trained; > 0 is forgetting, 0 none)
* BWT (Lopez-Paz & Ranzato 2017), in loss units with the paper's sign:  mean_{j < i} (R[j][j] - R[i][j])
  (< 0: later tasks raised the loss of earlier ones = forgetting; > 0: they lowered it)
* FWT (Lopez-Paz & Ranzato 2017), in loss units with the paper's sign:
  mean_{2 <= j <= min(i+1, T)} (R[0][j] - R[j-1][j])
  (> 0: training the earlier tasks already lowered task j's loss before it was trained)
* mean_seen_loss: mean_{j <= i} R[i][j] (the ACC of the papers, as a loss)

Files in the run folder, rewritten after every row: `task_matrix.json`, `task_matrix.csv`, and the
heatmap `task_matrix.png`; every evaluation is also a `task_eval` record in `metrics.jsonl`.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from pipeline.metrics import perplexity

log = logging.getLogger("pipeline")

INIT = "init"  # the name of row 0


def transfer_metrics(rows: Sequence[Sequence[float]], num_tasks: int) -> dict:
    """Forgetting per task (None where not defined yet), BWT, FWT and mean seen loss of the rows so far."""
    i = len(rows) - 1  # tasks trained
    forgetting: List[Optional[float]] = []
    for j in range(num_tasks):  # task j + 1 in the docstring's numbering; its own row is j + 1
        if j + 1 < i:
            forgetting.append(rows[i][j] - min(rows[l][j] for l in range(j + 1, i)))
        else:
            forgetting.append(None)
    bwt_terms = [rows[j + 1][j] - rows[i][j] for j in range(i - 1)]
    fwt_terms = [rows[0][j] - rows[j][j] for j in range(1, min(i + 1, num_tasks))]
    seen = [rows[i][j] for j in range(i)]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"forgetting": forgetting, "bwt": mean(bwt_terms), "fwt": mean(fwt_terms), "mean_seen_loss": mean(seen)}


class TaskMatrix:
    """Evaluates every task at the boundaries and writes the matrix; subscribes to on_task_end."""

    def __init__(self, names: Sequence[str], run_dir: Path, rank: int, evaluate_task: Callable[[int], dict]):
        self.names = list(names)
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.evaluate_task = evaluate_task  # task index -> {"loss", "perplexity", ...} (collective)
        self.metrics = None
        self.rows: List[List[float]] = []
        self.steps: List[int] = []

    def evaluate_row(self, after: str, step: int) -> None:
        row = []
        for j, name in enumerate(self.names):
            result = self.evaluate_task(j)
            row.append(result["loss"])
            if self.metrics is not None:
                self.metrics.write("task_eval", step, {"after_task": after, "task": name, "loss": result["loss"],
                                                       "perplexity": result["perplexity"],
                                                       "accuracy": result["accuracy"], "tokens": result["tokens"]})
        self.rows.append(row)
        self.steps.append(step)
        log.info("task matrix, after %s (step %d): %s", after, step,
                 "  ".join(f"{name} {loss:.4f}" for name, loss in zip(self.names, row)))
        if self.rank == 0:
            self.write()

    def on_task_end(self, task) -> None:
        self.evaluate_row(task.name, task.end)

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        row_names = [INIT] + self.names[:len(self.rows) - 1]
        return {"tasks": self.names, "rows": row_names, "steps": self.steps, "loss": self.rows,
                "perplexity": [[perplexity(v) for v in row] for row in self.rows], **transfer_metrics(self.rows, len(self.names)),
                # For readers of a generic matrix (pipeline/report.py): the metric and its values.
                "metric": "loss", "matrix": self.rows,
                "definitions": {
                    "loss": "loss[r][j]: validation loss (mean token NLL, nats) on task j, row 0 before training, "
                            "row r after training task r",
                    "forgetting": "loss[i][j] - min over rows l (j <= l < i) of loss[l][j]; > 0 means forgetting",
                    "bwt": "mean over j < i of (loss[j][j] - loss[i][j]); < 0 means forgetting",
                    "fwt": "mean over j >= 2 of (loss[0][j] - loss[j-1][j]); > 0 means earlier tasks helped task j",
                }}

    def write(self) -> None:
        data = self.to_dict()
        (self.run_dir / "task_matrix.json").write_text(json.dumps(data, indent=2) + "\n")
        with (self.run_dir / "task_matrix.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after_task", "step"] + self.names)
            for name, step, row in zip(data["rows"], self.steps, self.rows):
                writer.writerow([name, step] + [f"{v:.6f}" for v in row])
        try:
            self._plot(data)
        except ImportError as err:  # matplotlib is in requirements.txt; a bare environment still gets the numbers
            log.warning("task_matrix.png not drawn (%s); the numbers are in task_matrix.json/.csv", err)

    def _plot(self, data: dict) -> None:
        from matplotlib.figure import Figure  # Agg through savefig; no display, no pyplot state

        from pipeline.report import heatmap

        rows, names = data["loss"], data["tasks"]
        fig = Figure(figsize=(1.6 + 1.1 * len(names), 1.4 + 0.6 * len(rows)), layout="constrained")
        ax = fig.subplots()
        heatmap(fig, ax, rows, names, [f"after {r}" if r != INIT else "before training" for r in data["rows"]],
                label="loss (nats)")
        ax.set_xlabel("evaluated on (validation loss)")
        bwt = data["bwt"]
        ax.set_title("Task x task loss" + (f"  (BWT {bwt:+.3f})" if bwt is not None else ""))
        fig.savefig(self.run_dir / "task_matrix.png", dpi=100)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rows": self.rows, "steps": self.steps, "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [list(map(float, row)) for row in state["rows"]]
        self.steps = [int(s) for s in state["steps"]]
