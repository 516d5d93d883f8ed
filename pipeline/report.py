"""Run report: Markdown and PNG plots from a run folder, or several runs' curves overlaid.

    python -m pipeline.report outputs/demo                      # -> outputs/demo/report/report.md + *.png
    python -m pipeline.report outputs/a outputs/b --out cmp/    # overlay, labelled by run folder name

The trainer calls `build_report(run_dir)` at the end of a run. Plots are drawn with matplotlib's Agg
renderer (no display, no server). A plot whose data the run does not have (no loss scale in an fp32
run, no task matrix without a continual schedule) is not drawn; the report says why instead.

What is read from a run folder:

* `metrics.jsonl`, one JSON record per line, `{"kind": ..., "step": N, "time": unix seconds, ...}`:
  - `train`: loss, lr, grad_norm, tokens_per_s, epoch; loss_scale, hysteresis (fp16); cumulative
    skip counts `skipped_<reason>` (nan, spike, quarantined: micro-batches; overflow: optimizer steps)
    and micro_batches_trained; mfu, peak_memory_gb; model observables `spike_rate/layer<i>`,
    `spike_rate/mean`, `gate/layer<i>`, `liquid_tau/layer<i>` (with optional `liquid_tau_min/...`,
    `liquid_tau_max/...`); `task` (name of the current task of a continual schedule).
  - `eval`: loss, perplexity, accuracy, tokens, bpb (bits per byte, optional); train_tokens and
    train_seconds (the training tokens and seconds in training steps so far).
  - `overflow`: an optimizer step skipped by the fp16 loss scaler: scale_before, scale_after,
    hysteresis_left.
  - `task_eval` (continual schedules): `after_task` (the task just trained), `task` (the task
    evaluated), `loss`; one record per pair. These make the task x task matrix.
  A step recorded twice (a resumed run redoes the steps after its checkpoint) counts once, the last
  record winning. Non-finite numbers are stored as the strings "nan"/"inf" and read back as floats.
  A line that does not parse (a run killed mid-write) is skipped and counted in the report.
* `task_matrix.json` (optional, takes precedence over `task_eval` records):
  `{"tasks": [names], "matrix": [[...]], "metric": "loss"}` with `matrix[i][j]` the metric on task j
  after training on task i (`null` where not measured).
* `config.json`, the merged run config, for the config table.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from matplotlib.figure import Figure

from pipeline.metrics import perplexity, read_metrics


def _num(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


@dataclass
class Run:
    dir: Path
    name: str
    records: dict = field(default_factory=dict)      # kind -> records sorted by step, one per step
    task_evals: List[dict] = field(default_factory=list)
    task_matrix: Optional[dict] = None
    config: dict = field(default_factory=dict)
    bad_lines: int = 0

    def series(self, kind: str, key, x: str = "step"):
        """(x values, values) of the records of `kind` that hold a number under `key` (or for which the
        function `key` of the record returns one) and under `x` (default: the step)."""
        value = key if callable(key) else (lambda r: _num(r.get(key)))
        pairs = [(r["step"] if x == "step" else _num(r.get(x)), value(r)) for r in self.records.get(kind, [])]
        pairs = [(s, v) for s, v in pairs if s is not None and v is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def keys(self, kind: str, prefix: str) -> List[str]:
        found = {k for r in self.records.get(kind, []) for k in r if k.startswith(prefix)}
        return sorted(found, key=_natural)

    def last(self, kind: str) -> Optional[dict]:
        records = self.records.get(kind)
        return records[-1] if records else None


def _natural(key: str):
    """spike_rate/layer10 after spike_rate/layer9."""
    head = key.rstrip("0123456789")
    return (head, int(key[len(head):]) if len(head) < len(key) else -1)


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    run = Run(dir=run_dir, name=run_dir.resolve().name)
    by_step: dict = {}
    bad_lines: list = []
    for record in read_metrics(run_dir, bad_lines=bad_lines):
        if record.get("kind") == "task_eval":
            run.task_evals.append(record)
        elif "step" in record:
            by_step.setdefault(record.get("kind"), {})[record["step"]] = record
    run.records = {kind: [steps[s] for s in sorted(steps)] for kind, steps in by_step.items()}
    run.bad_lines = len(bad_lines)
    if (run_dir / "task_matrix.json").is_file():
        run.task_matrix = json.loads((run_dir / "task_matrix.json").read_text())
    elif run.task_evals:
        run.task_matrix = _matrix_from_records(run.task_evals)
    if (run_dir / "config.json").is_file():
        run.config = json.loads((run_dir / "config.json").read_text())
    return run


def _matrix_from_records(records: List[dict]) -> dict:
    trained = list(dict.fromkeys(r["after_task"] for r in records))
    tasks = trained + [t for t in dict.fromkeys(r["task"] for r in records) if t not in trained]
    cell = {(r["after_task"], r["task"]): _num(r.get("loss")) for r in records}  # the last one wins
    return {"tasks": tasks, "metric": "loss", "rows": trained,
            "matrix": [[cell.get((a, t)) for t in tasks] for a in trained]}


# ---------------------------------------------------------------------------------------------
# Plots. Each draws every given run into a Figure, or returns the reason why it has nothing to draw.
# ---------------------------------------------------------------------------------------------

def _style(runs: Sequence[Run], i: int, k: int) -> dict:
    """One run: a colour per series. Several: a colour per run, a line style per series."""
    if len(runs) == 1:
        return {"color": f"C{k}"}
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[k % 4]}


def _label(runs: Sequence[Run], run: Run, series: str) -> str:
    return series if len(runs) == 1 else f"{run.name} {series}"


def _axes(fig: Figure, ylabel: str, title: str, xlabel: str = "step"):
    ax = fig.subplots()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def _lines(fig: Figure, runs: Sequence[Run], series: Sequence[tuple], ylabel: str, title: str,
           log: bool = False, x: str = "step", xlabel: str = "step") -> bool:
    """series: (label, kind, key, marker) drawn for every run against the records' `x`; False when none has
    any value."""
    drawn = []
    ax = _axes(fig, ylabel, title, xlabel)
    for i, run in enumerate(runs):
        for k, (label, kind, key, marker) in enumerate(series):
            steps, values = run.series(kind, key, x)
            if steps:
                ax.plot(steps, values, marker=marker, markersize=4, label=_label(runs, run, label),
                        **_style(runs, i, k))
                drawn.extend(values)
    if log and drawn and all(v > 0 for v in drawn if math.isfinite(v)):
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize="small")
    return bool(drawn)


def _mean_of(keys: Sequence[str]) -> Callable:
    def mean(record: dict) -> Optional[float]:
        values = [v for v in (_num(record.get(k)) for k in keys) if v is not None]
        return sum(values) / len(values) if values else None
    return mean


def _sum_of(keys: Sequence[str]) -> Callable:
    def total(record: dict) -> Optional[float]:
        values = [v for v in (_num(record.get(k)) for k in keys) if v is not None]
        return sum(values) if values else None
    return total


def _perplexity(record: dict) -> Optional[float]:
    loss = _num(record.get("loss"))
    return perplexity(loss) if loss is not None else None


def plot_loss(fig, runs):
    if not _lines(fig, runs, [("train", "train", "loss", None), ("validation", "eval", "loss", "o")],
                  "loss (nats per token)", "Loss"):
        return "no train or validation loss in metrics.jsonl"
    if len(runs) == 1:
        _mark_tasks(fig.axes[0], runs[0])
    return None


def _mark_tasks(ax, run: Run) -> None:
    """Continual schedules: a vertical line where the task changes, named."""
    previous = None
    for record in run.records.get("train", []):
        task = record.get("task")
        if task is not None and task != previous:
            ax.axvline(record["step"], color="grey", linewidth=0.8, linestyle=":")
            ax.annotate(str(task), (record["step"], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize="small", color="grey")
        previous = task


def plot_perplexity(fig, runs):
    if not _lines(fig, runs, [("train", "train", _perplexity, None), ("validation", "eval", "perplexity", "o")],
                  "perplexity", "Perplexity", log=True):
        return "no train loss or validation perplexity in metrics.jsonl"
    return None


def plot_bpb(fig, runs):
    if not _lines(fig, runs, [("validation", "eval", "bpb", "o")], "bits per UTF-8 byte",
                  "Validation bits per byte (comparable across tokenizers)"):
        return "no `bpb` in the eval records"
    return None


def plot_bpb_tokens(fig, runs):
    if not _lines(fig, runs, [("validation", "eval", "bpb", "o")], "bits per UTF-8 byte",
                  "Validation bits per byte against training tokens", x="train_tokens", xlabel="training tokens"):
        return "no `bpb` with `train_tokens` in the eval records"
    return None


def plot_bpb_time(fig, runs):
    if not _lines(fig, runs, [("validation", "eval", "bpb", "o")], "bits per UTF-8 byte",
                  "Validation bits per byte against training time", x="train_seconds",
                  xlabel="seconds in training steps (evaluation and checkpoints not counted)"):
        return "no `bpb` with `train_seconds` in the eval records"
    return None


def plot_grad_norm(fig, runs):
    if not _lines(fig, runs, [("grad norm", "train", "grad_norm", None)], "global gradient norm (before clipping)",
                  "Gradient norm", log=True):
        return "no `grad_norm` in the train records"
    return None


def plot_lr(fig, runs):
    if not _lines(fig, runs, [("learning rate", "train", "lr", None)], "learning rate", "Learning rate"):
        return "no `lr` in the train records"
    return None


def plot_loss_scale(fig, runs):
    if not any(run.series("train", "loss_scale")[0] or run.records.get("overflow") for run in runs):
        return "no `loss_scale` in the train records and no overflow records (only fp16 runs have a loss scaler)"
    ax = _axes(fig, "loss scale", "fp16 loss scale and overflows (skipped optimizer steps)")
    ax.set_yscale("log", base=2)
    for i, run in enumerate(runs):
        steps, scales = run.series("train", "loss_scale")
        if steps:
            ax.step(steps, scales, where="post", label=_label(runs, run, "loss scale"), **_style(runs, i, 0))
        overflows = run.records.get("overflow", [])
        at = [(r["step"], _num(r.get("scale_before"))) for r in overflows]
        with_scale = [(s, v) for s, v in at if v is not None]
        if with_scale:
            ax.plot(*zip(*with_scale), "v", color="red" if len(runs) == 1 else f"C{i % 10}",
                    label=_label(runs, run, f"overflow ({len(overflows)})"))
        for s, v in at:
            if v is None:
                ax.axvline(s, color="red", alpha=0.4)
    ax.legend(fontsize="small")
    return None


def plot_skipped(fig, runs):
    if not any(run.keys("train", "skipped_") for run in runs):
        return "no `skipped_*` counts in the train records"
    if len(runs) == 1:
        keys = runs[0].keys("train", "skipped_")
        series = [(k[len("skipped_"):] + (" (optimizer steps)" if k == "skipped_overflow" else ""), "train", k, None)
                  for k in keys]
        _lines(fig, runs, series, "cumulative count", "Skipped micro-batches by reason")
        total = _sum_of(keys)(runs[0].last("train")) or 0
        fig.axes[0].set_title(f"Skipped micro-batches by reason ({total:.0f} in all)")
        fig.axes[0].set_ylim(0, max(total, 1) * 1.1)  # counts: a healthy run's zeros sit on the floor
    else:
        ax = _axes(fig, "cumulative count", "Skipped micro-batches and overflow steps, all reasons")
        for i, run in enumerate(runs):
            ax.plot(*run.series("train", _sum_of(run.keys("train", "skipped_"))), label=run.name,
                    **_style(runs, i, 0))
        ax.legend(fontsize="small")
    return None


def plot_throughput(fig, runs):
    if not any(run.series("train", "tokens_per_s")[0] for run in runs):
        return "no `tokens_per_s` in the train records"
    has_mfu = any(run.series("train", "mfu")[0] for run in runs)
    top, bottom = fig.subplots(2, 1, sharex=True) if has_mfu else (fig.subplots(), None)
    for i, run in enumerate(runs):
        steps, values = run.series("train", "tokens_per_s")
        if steps:
            top.plot(steps, values, label=_label(runs, run, "tokens/s"), **_style(runs, i, 0))
        steps, values = run.series("train", "mfu")
        if steps:
            bottom.plot(steps, [100 * v for v in values], label=_label(runs, run, "MFU"), **_style(runs, i, 1))
    top.set_title("Throughput" + (" and model FLOPs utilisation" if has_mfu else " (no MFU recorded)"))
    top.set_ylabel("tokens/s (all ranks)")
    for ax in [top] + ([bottom] if bottom is not None else []):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if bottom is not None:
        bottom.set_ylabel("MFU (%)")
    (bottom if bottom is not None else top).set_xlabel("step")
    return None


def _layer_keys(run: Run, prefix: str) -> List[str]:
    return [k for k in run.keys("train", prefix) if k[len(prefix):].startswith("layer")]


def _per_layer(fig, runs, prefix: str, ylabel: str, title: str) -> bool:
    """One run: a line per layer (and the model's own mean if recorded). Several: each run's mean."""
    if len(runs) == 1:
        series = [(k[len(prefix):], "train", k, None) for k in _layer_keys(runs[0], prefix)]
        if runs[0].series("train", prefix + "mean")[0]:
            series.append(("mean", "train", prefix + "mean", None))
        return _lines(fig, runs, series, ylabel, title)
    ax = _axes(fig, ylabel, title + " (mean over layers)")
    drawn = False
    for i, run in enumerate(runs):
        steps, values = run.series("train", _mean_of(_layer_keys(run, prefix)))
        if steps:
            ax.plot(steps, values, label=run.name, **_style(runs, i, 0))
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    return drawn


def plot_spike_rates(fig, runs):
    if not _per_layer(fig, runs, "spike_rate/", "fraction of neurons spiking", "Spike rate per layer"):
        return "no `spike_rate/layer<i>` values in the train records"
    return None


def plot_gates(fig, runs):
    if not _per_layer(fig, runs, "gate/", "mean gate (1: liquid, 0: Mamba)", "Adaptive gate per layer"):
        return "no `gate/layer<i>` values in the train records (model.use_adaptive_gating is off)"
    return None


def plot_liquid_tau(fig, runs):
    if not _per_layer(fig, runs, "liquid_tau/", "effective time constant 1/lambda (tokens)",
                      "Liquid time constants per layer"):
        return "no `liquid_tau/layer<i>` values in the train records"
    ax = fig.axes[0]
    if len(runs) == 1:
        run = runs[0]
        for k, key in enumerate(_layer_keys(run, "liquid_tau/")):
            layer = key[len("liquid_tau/"):]
            low, high = run.series("train", f"liquid_tau_min/{layer}"), run.series("train", f"liquid_tau_max/{layer}")
            if low[0] and low[0] == high[0]:
                ax.fill_between(low[0], low[1], high[1], color=f"C{k}", alpha=0.15, linewidth=0)
        ax.set_title("Liquid effective time constants per layer (line: mean; band: min to max)")
    ax.set_yscale("log")
    return None


def plot_task_matrix(fig, runs):
    if len(runs) > 1:
        return "task matrices are per run: see each run's own report"
    matrix = runs[0].task_matrix
    if not matrix:
        return "no continual schedule ran (no `task_eval` records, no task_matrix.json)"
    tasks, rows = matrix["tasks"], matrix.get("rows", matrix["tasks"])
    values = [[float("nan") if v is None else v for v in row] for row in matrix["matrix"]]
    fig.set_size_inches(6, 5)
    ax = fig.subplots()
    heatmap(fig, ax, values, [str(t) for t in tasks], [str(t) for t in rows],
            lower_is_better=matrix.get("metric", "loss") == "loss")
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(f"Task x task matrix: validation {matrix.get('metric', 'loss')}")
    return None


def heatmap(fig, ax, values, columns, rows, lower_is_better: bool = True, label: Optional[str] = None) -> None:
    """A matrix as coloured cells with their values written in (NaN cells blank); bright = good."""
    image = ax.imshow(values, cmap="viridis_r" if lower_is_better else "viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            if math.isfinite(v):
                bright = (image.norm(v) < 0.5) == lower_is_better
                ax.text(c, r, f"{v:.3g}", ha="center", va="center", color="black" if bright else "white")
    fig.colorbar(image, ax=ax, label=label)


PLOTS: List[tuple[str, str, Callable]] = [
    ("loss", "Loss", plot_loss),
    ("perplexity", "Perplexity", plot_perplexity),
    ("bpb", "Validation bits per byte", plot_bpb),
    ("bpb_tokens", "Validation bits per byte against training tokens", plot_bpb_tokens),
    ("bpb_time", "Validation bits per byte against training time", plot_bpb_time),
    ("grad_norm", "Gradient norm", plot_grad_norm),
    ("loss_scale", "Loss scale and overflows", plot_loss_scale),
    ("skipped", "Skipped micro-batches", plot_skipped),
    ("lr", "Learning rate", plot_lr),
    ("throughput", "Tokens/s and MFU", plot_throughput),
    ("spike_rates", "Spike rates", plot_spike_rates),
    ("gates", "Adaptive gates", plot_gates),
    ("liquid_tau", "Liquid time constants", plot_liquid_tau),
    ("task_matrix", "Task x task matrix", plot_task_matrix),
]


def draw_plots(runs: Sequence[Run], out_dir: Path) -> tuple[list, list]:
    """Writes `<name>.png` for every plot with data; returns ([(name, title)], [(title, reason)])."""
    drawn, skipped = [], []
    for name, title, plot in PLOTS:
        path = out_dir / f"{name}.png"
        path.unlink(missing_ok=True)  # a plot this run cannot draw must not survive from an older report
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        reason = plot(fig, runs)
        if reason is None:
            fig.savefig(path, dpi=100)
            drawn.append((name, title))
        else:
            skipped.append((title, reason))
    return drawn, skipped


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _best_eval(run: Run) -> Optional[dict]:
    evals = [r for r in run.records.get("eval", []) if _num(r.get("loss")) is not None
             and math.isfinite(_num(r["loss"]))]
    return min(evals, key=lambda r: _num(r["loss"])) if evals else None


def _summary(run: Run) -> str:
    times = [r["time"] for records in run.records.values() for r in records if _num(r.get("time")) is not None]
    steps = [r["step"] for r in run.records.get("train", [])]
    parts = [f"{len(steps)} train records (steps {steps[0]}–{steps[-1]})" if steps else "no train records",
             f"{len(run.records.get('eval', []))} evaluations", f"{len(run.records.get('overflow', []))} overflows"]
    if len(times) >= 2:
        seconds = max(times) - min(times)
        span = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
            f"{seconds / 3600:.1f} h"
        parts.append(f"{span} from first to last record")
    if run.bad_lines:
        parts.append(f"{run.bad_lines} unreadable lines of metrics.jsonl skipped")
    return ", ".join(parts) + "."


def _plots_markdown(drawn, skipped) -> List[str]:
    lines = ["## Plots", ""]
    for name, title in drawn:
        lines += [f"### {title}", "", f"![{title}]({name}.png)", ""]
    if skipped:
        lines += ["Not plotted:", ""] + [f"- {title}: {reason}." for title, reason in skipped] + [""]
    return lines


def _run_markdown(run: Run, drawn, skipped) -> str:
    lines = [f"# Run report: {run.name}", "", f"Run folder `{run.dir.resolve()}`: {_summary(run)}", "",
             "## Final metrics", ""]
    best = _best_eval(run)
    if best is not None:
        lines += [f"Best validation loss: **{_num(best['loss']):.4f}** at step {best['step']}.", ""]
    for kind, heading in (("train", "Last train record"), ("eval", "Last evaluation")):
        record = run.last(kind)
        if record is not None:
            rows = [(k, v) for k, v in record.items() if k not in ("kind", "time")]
            lines += [f"{heading} (step {record['step']}):", ""] + _table(("metric", "value"), rows)
    matrix = run.task_matrix
    if matrix:
        rows = [[row_task] + row for row_task, row in zip(matrix.get("rows", matrix["tasks"]), matrix["matrix"])]
        lines += [f"## Task x task matrix (validation {matrix.get('metric', 'loss')}; columns: the task "
                  "evaluated)", ""] + _table(["after training on"] + [str(t) for t in matrix["tasks"]], rows)
    lines += _plots_markdown(drawn, skipped)
    lines += ["## Config", ""]
    lines += _table(("key", "value"), sorted(_flatten(run.config).items())) if run.config else ["(no config.json)", ""]
    return "\n".join(lines)


def _comparison_markdown(runs: Sequence[Run], drawn, skipped) -> str:
    lines = ["# Run comparison", "", "| run | folder |", "| --- | --- |"]
    lines += [f"| {run.name} | `{run.dir.resolve()}` |" for run in runs] + ["", "## Final metrics", ""]
    rows = []
    for run in runs:
        train, evaluation, best = run.last("train") or {}, run.last("eval") or {}, _best_eval(run) or {}
        mfu = _num(train.get("mfu"))
        rows.append((run.name, train.get("step"), train.get("loss"), evaluation.get("loss"), best.get("loss"),
                     best.get("step"), evaluation.get("bpb"), train.get("tokens_per_s"),
                     f"{100 * mfu:.2f}%" if mfu is not None else None))
    lines += _table(("run", "step", "train loss", "val loss", "best val loss", "best at", "val bpb", "tokens/s",
                     "MFU"), rows)
    configs = [_flatten(run.config) for run in runs]
    differing = sorted(k for k in set().union(*configs) if len({json.dumps(c.get(k)) for c in configs}) > 1)
    lines += ["## Config differences", ""]
    lines += _table(["key"] + [run.name for run in runs], [[k] + [c.get(k) for c in configs] for k in differing]) \
        if differing else ["The runs' configs are identical.", ""]
    lines += _plots_markdown(drawn, skipped)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Writes the report of one run into `out_dir` (default `<run_dir>/report/`); returns report.md's path."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    drawn, skipped = draw_plots([run], out)
    path = out / "report.md"
    path.write_text(_run_markdown(run, drawn, skipped) + f"\n_Generated {time.strftime('%Y-%m-%d %H:%M:%S')}._\n")
    return path


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Overlays several runs' curves in `out_dir`, each labelled by its folder name; returns report.md's path."""
    runs = [load_run(d) for d in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # same folder names under different parents: use the paths
        for run in runs:
            run.name = str(run.dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn, skipped = draw_plots(runs, out)
    path = out / "report.md"
    path.write_text(_comparison_markdown(runs, drawn, skipped)
                    + f"\n_Generated {time.strftime('%Y-%m-%d %H:%M:%S')}._\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=(
        "Write a run's report (report.md and PNG plots) into RUN_DIR/report, or overlay several runs in --out."))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl")
    parser.add_argument("--out", help="output folder (required with several runs; default RUN_DIR/report)")
    args = parser.parse_args(argv)
    if len(args.run_dirs) > 1 and not args.out:
        parser.error("several runs are overlaid into one folder: give it with --out DIR")
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            parser.error(f"{run_dir} holds no metrics.jsonl: not a run folder")
    if len(args.run_dirs) == 1:
        path = build_report(args.run_dirs[0], args.out)
    else:
        path = compare_runs(args.run_dirs, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
