"""The run report (`python -m pipeline.report`): from a real tiny run's folder, from records of every kind
(fp16 loss scale, overflows, skips, continual tasks), and several runs overlaid.

A user relies on: every plot the data allows is a real picture with data in it, a plot the data does
not allow is absent and the report says why, and report.md holds the config and the final metrics.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from dsrun import tiny_data, train  # noqa: F401  (tiny_data is a fixture)
from pipeline.metrics import MetricsSink, read_metrics
from pipeline.report import build_report, main

ALWAYS = {"loss", "perplexity", "grad_norm", "skipped", "lr", "throughput", "spike_rates"}


@pytest.fixture(scope="module")
def real_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_data, run_dir, "--train.max_steps", "6", "--train.eval_interval", "3", "--train.tensorboard",
          str(run_dir / "tb"), "--train.csv", str(run_dir / "csv"), num_procs=1)
    return run_dir


def assert_picture(path: Path) -> None:
    """A PNG that decodes, with coloured pixels: matplotlib draws axes, text and grids in greys only, so
    colour means a data series was drawn."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    rgb = imread(path)[..., :3]
    assert rgb.shape[0] > 100 and rgb.shape[1] > 100 and rgb.std() > 0, path
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2
    assert coloured.mean() > 1e-3, f"{path}: no data drawn"


def plots(folder: Path) -> set:
    return {p.stem for p in folder.glob("*.png")}


@pytest.mark.distributed
def test_report_of_a_real_run_draws_what_its_data_allows(real_run):
    path = build_report(real_run)
    assert path == real_run / "report" / "report.md"
    drawn = plots(path.parent)
    assert ALWAYS | {"gates"} <= drawn  # the tiny preset gates its streams
    assert not drawn & {"loss_scale", "task_matrix"}, "an fp32 run without tasks has no such data"
    for name in drawn:
        assert_picture(path.parent / f"{name}.png")
    text = path.read_text()
    for name in drawn:
        assert f"]({name}.png)" in text
    assert "Loss scale and overflows: no `loss_scale`" in text
    assert "Task x task matrix: no continual schedule ran" in text
    assert "| model.hidden_dim | 32 |" in text and "| train.max_steps | 6 |" in text
    last = read_metrics(real_run, "train")[-1]
    assert f"| loss | {last['loss']:.4g} |" in text
    best = min(read_metrics(real_run, "eval"), key=lambda r: r["loss"])
    assert f"Best validation loss: **{best['loss']:.4f}** at step {best['step']}" in text


@pytest.mark.distributed
def test_two_runs_overlay_into_one_folder(real_run, tmp_path, capsys):
    other = tmp_path / "lower_lr"
    other.mkdir()
    records = read_metrics(real_run)
    last_loss = [r for r in records if r["kind"] == "train"][-1]["loss"]
    for r in records:
        if "loss" in r:
            r["loss"] *= 0.8
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = json.loads((real_run / "config.json").read_text())
    config["train"]["lr"] = 0.005
    (other / "config.json").write_text(json.dumps(config))

    out = tmp_path / "compare"
    assert main([str(real_run), str(other), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    drawn = plots(out)
    assert ALWAYS | {"gates"} <= drawn
    for name in drawn:
        assert_picture(out / f"{name}.png")
    text = (out / "report.md").read_text()
    assert f"| tiny | 6 | {last_loss:.4g} |" in text and f"| lower_lr | 6 | {0.8 * last_loss:.4g} |" in text
    assert "| train.lr | 0.01 | 0.005 |" in text, "the config differences are listed"

    with pytest.raises(SystemExit):
        main([str(real_run), str(other)])
    assert "--out" in capsys.readouterr().err


# The record keys, which launch/train.py and the liquid layer do not write yet: strict xfails,
# so each fails loudly (XPASS) once its wiring lands, and its marker must go.
@pytest.mark.distributed
def test_train_records_hold_mfu_and_peak_memory(real_run):
    for record in read_metrics(real_run, "train"):
        assert 0.0 < record["mfu"] <= 1.0 and record["peak_memory_gb"] > 0.0
    log = (real_run / "training.log").read_text()
    assert "mfu: " in log and "TFLOP/s per device" in log, "the log states the peak it used"
    assert "report: " in log and (real_run / "report" / "report.md").is_file(), "the trainer writes the report"


@pytest.mark.distributed
def test_tensorboard_and_csv_monitors_get_the_same_records(real_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((real_run / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    expected = [r["loss"] for r in read_metrics(real_run, "train")]
    assert losses == pytest.approx(expected, rel=1e-6)
    csv_files = {p.name for p in (real_run / "csv").rglob("*.csv")}
    assert {"train_loss.csv", "train_mfu.csv", "eval_loss.csv", "eval_bpb.csv"} <= csv_files, csv_files


@pytest.mark.distributed
def test_train_records_hold_liquid_time_constants(real_run):
    for record in read_metrics(real_run, "train"):
        for layer in range(2):
            low, mean, high = (record[f"{key}/layer{layer}"] for key in ("liquid_tau_min", "liquid_tau", "liquid_tau_max"))
            assert 0.0 < low <= mean <= high


@pytest.mark.distributed
def test_the_best_validation_checkpoint_is_kept_beside_the_newest(real_run):
    import torch

    evals = [r for r in read_metrics(real_run, "eval") if r["step"] > 0]
    best = min(evals, key=lambda r: r["loss"])
    saved = torch.load(real_run / "checkpoints" / "best" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert saved["best"] == {"loss": best["loss"], "step": best["step"]}
    assert (real_run / "checkpoints" / "latest").read_text().strip() == "step00000006"


@pytest.mark.distributed
def test_eval_records_hold_bits_per_byte(real_run):
    for record in read_metrics(real_run, "eval"):
        assert 0.0 < record["bpb"] < record["loss"] / math.log(2)  # more than one byte per token


def write_fp16_continual_run(run_dir: Path) -> None:
    """Records of every kind, through the trainer's own sink: an fp16 run with overflows and skips over
    a two-task continual schedule, resumed once (steps 9-10 recorded twice), killed mid-line at the end."""
    sink = MetricsSink(run_dir, rank=0)
    scale = 1024.0
    for step in list(range(1, 11)) + list(range(9, 21)):
        if step in (4, 15):
            sink.write("overflow", step, {"scale_before": scale, "scale_after": scale / 2, "hysteresis_left": 1})
            scale /= 2
        record = {"loss": 5.0 - 0.1 * step, "lr": 1e-3, "grad_norm": math.inf if step == 4 else 1.0,
                  "tokens_per_s": 1000.0, "loss_scale": scale, "hysteresis": 2, "skipped_nan": step // 8,
                  "skipped_spike": 0, "skipped_quarantined": 0, "skipped_overflow": (step >= 4) + (step >= 15),
                  "micro_batches_trained": step, "mfu": 0.2, "peak_memory_gb": 1.5, "task": "A" if step <= 10 else "B"}
        for layer in range(2):
            record.update({f"spike_rate/layer{layer}": 0.1, f"liquid_tau/layer{layer}": 4.0 + layer,
                           f"liquid_tau_min/layer{layer}": 1.0, f"liquid_tau_max/layer{layer}": 30.0})
        sink.write("train", step, record)
        if step % 10 == 0:
            sink.write("eval", step, {"loss": 4.5, "perplexity": math.exp(4.5), "accuracy": 0.2, "tokens": 512,
                                      "bpb": 1.9})
            for task in ("A", "B"):
                sink.write("task_eval", step, {"after_task": "A" if step == 10 else "B", "task": task,
                                               "loss": 3.0 if task == "A" else 6.0})
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 21, "lo')


def test_report_draws_loss_scale_skips_and_task_matrix(tmp_path):
    run_dir = tmp_path / "fp16"
    run_dir.mkdir()
    write_fp16_continual_run(run_dir)
    path = build_report(run_dir)
    drawn = plots(path.parent)
    assert ALWAYS | {"loss_scale", "task_matrix", "liquid_tau", "bpb"} <= drawn
    assert "gates" not in drawn
    for name in drawn:
        assert_picture(path.parent / f"{name}.png")
    text = path.read_text()
    assert "20 train records (steps 1–20)" in text, "a step recorded twice counts once"
    assert "2 overflows" in text and "1 unreadable lines of metrics.jsonl skipped" in text
    assert "| skipped_nan | 2 |" in text and "| loss_scale | 256 |" in text
    assert "| A | 3 | 6 |" in text and "| B | 3 | 6 |" in text, "the task matrix as a table"
    assert "Adaptive gates: no `gate/layer<i>` values" in text

    # A rebuilt report drops the plots its data no longer allows.
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in (run_dir / "metrics.jsonl")
                                                   .read_text().splitlines() if '"task_eval"' not in line))
    build_report(run_dir)
    assert "task_matrix" not in plots(path.parent)
