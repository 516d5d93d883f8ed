"""Stability hooks with real DeepSpeed processes (2 CPU ranks, gloo, ZeRO-2).

fp16 runs use the real ZeRO-2 fp16 optimizer and DeepSpeed's DynamicLossScaler: the CPU accelerator
is declared fp16-capable inside the training processes (`--train.allow_cpu_fp16 true`), nothing is mocked.
"""
from __future__ import annotations

import json

import pytest
import torch

from dsrun import ROOT, quarantine_records, tiny_data, train, train_losses, train_records, write_ds_config  # noqa: F401
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.distributed
FP16 = ("--train.allow_cpu_fp16", "true")


def assert_weights_finite(run_dir):
    from pipeline.engine.checkpoint import load_for_inference
    model, _, _ = load_for_inference(str(run_dir))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_nan_loss_on_one_rank_is_skipped_by_every_rank_without_touching_the_scaler(tiny_data, tmp_path):
    run = tmp_path / "nan"
    train(tiny_data, run, "--train.max_steps", "5", "--train.gradient_accumulation_steps", "2",
          "--stability.drill_nan_loss", '[3@1]', *FP16, ds_config="ds_configs/fp16_stable.json")
    records = train_records(run)
    assert sorted(records) == [1, 2, 3, 4, 5]
    for step in (2, 3, 4):
        assert records[step]["loss_scale"] == 2 ** 10 and records[step]["hysteresis"] == 2
    assert records[2]["skipped_nan"] == 0 and records[3]["skipped_nan"] == 1
    assert records[5]["skipped_overflow"] == 0
    # every optimizer step still had its 2 good micro-batches
    assert records[3]["micro_batches_trained"] == 6 and records[5]["micro_batches_trained"] == 10
    quarantine = quarantine_records(run)
    assert {(r["step"], r["rank"], r["reason"]) for r in quarantine} == {(3, 1, "nan"), (3, 0, "peer")}
    assert all(len(r["samples"]) == 4 for r in quarantine)  # the tiny preset's micro batch
    assert_weights_finite(run)


def expected_scale_trajectory(steps, overflow_steps, initial, window, hysteresis):
    """DeepSpeed's documented DynamicLossScaler rule with consecutive_hysteresis=true, written independently."""
    scale, left, last_overflow, trajectory = initial, hysteresis, -1, {}
    for i, step in enumerate(steps):
        if step in overflow_steps:
            if left == 1:
                scale = max(scale / 2, 1)
            else:
                left -= 1
            last_overflow = i
        else:
            left = hysteresis
            stable = i - last_overflow - 1
            if stable > 0 and stable % window == 0:
                scale *= 2
        trajectory[step] = (scale, left)
    return trajectory


def test_inf_gradients_follow_the_configured_loss_scale_trajectory(tiny_data, tmp_path):
    ds = write_ds_config(tmp_path / "fp16.json", initial_scale_power=8, loss_scale_window=3, hysteresis=2,
                         consecutive_hysteresis=True, min_loss_scale=1)
    run = tmp_path / "inf"
    overflow_steps = [2, 5, 6, 7, 8]
    train(tiny_data, run, "--train.max_steps", "14", "--stability.drill_inf_grad_steps",
          json.dumps(overflow_steps), "--train.warmup_steps", "4", *FP16, ds_config=ds)
    records = train_records(run)
    expected = expected_scale_trajectory(range(1, 15), set(overflow_steps), 2 ** 8, 3, 2)
    got = {step: (r["loss_scale"], r["hysteresis"]) for step, r in records.items()}
    assert got == expected
    # an isolated overflow costs hysteresis, not scale; 4 in a row halve it 3 times; the window regrows it
    assert expected[2] == (256, 1) and expected[8] == (32, 1) and expected[12] == (64, 2)
    events = read_metrics(run, "overflow")
    assert [e["step"] for e in events] == overflow_steps
    assert records[14]["skipped_overflow"] == len(overflow_steps)
    # skipped optimizer steps do not advance the LR schedule
    lr = {step: r["lr"] for step, r in records.items()}
    assert lr[2] > lr[1] and lr[3] == lr[2] and lr[4] > lr[3]
    assert_weights_finite(run)


def test_overflow_at_minimum_scale_saves_a_checkpoint_and_exits(tiny_data, tmp_path):
    ds = write_ds_config(tmp_path / "fp16.json", initial_scale_power=1, hysteresis=1, min_loss_scale=1)
    run = tmp_path / "min"
    result = train(tiny_data, run, "--train.max_steps", "6", "--stability.drill_inf_grad_steps", "[2, 3]", *FP16,
                   ds_config=ds, expect_rc=3)
    assert "already at its minimum" in result.stdout + result.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"


def test_too_many_consecutive_skips_checkpoint_and_exit_non_zero(tiny_data, tmp_path):
    run = tmp_path / "consecutive"
    result = train(tiny_data, run, "--train.max_steps", "10", "--stability.drill_nan_fraction", "0.95",
                   "--stability.max_consecutive_skips", "3", expect_rc=3)
    output = result.stdout + result.stderr
    assert "3 consecutive micro-batches were skipped" in output
    assert str((run / "skipped_batches.jsonl").resolve()) in output
    assert (run / "checkpoints" / "latest").is_file()
    assert len([r for r in quarantine_records(run) if r["reason"] == "nan"]) >= 3


def test_resume_skips_quarantined_samples_again_and_matches_the_uninterrupted_losses(tiny_data, tmp_path):
    drill = ("--stability.drill_nan_loss", '[3@1, 6@0]')
    common = ("--train.max_steps", "8", "--train.checkpoint_interval", "2", "--train.keep_checkpoints", "0")
    full = tmp_path / "full"
    train(tiny_data, full, *common, *drill)
    # The same run dies after step 7; the last checkpoint we restart from predates both bad batches.
    broken = tmp_path / "broken"
    train(tiny_data, broken, *common, *drill, "--train.exit_after_steps", "7")
    resumed = train(tiny_data, broken, *common, "--train.resume", str(broken / "checkpoints" / "step00000002"))
    assert "quarantined samples" in resumed.stdout
    expected, got = train_losses(full), train_losses(broken)
    for step in range(3, 9):
        assert got[step] == expected[step], (step, got[step], expected[step])
    reasons = [(r["step"], r["rank"], r["reason"]) for r in quarantine_records(broken)]
    assert reasons.count((3, 1, "quarantined")) == 1 and reasons.count((6, 0, "quarantined")) == 1


def test_nan_drill_under_bf16(tiny_data, tmp_path):
    run = tmp_path / "bf16"
    train(tiny_data, run, "--train.max_steps", "4", "--stability.drill_nan_loss", '[2@0]',
          ds_config="ds_configs/bf16.json")
    records = train_records(run)
    assert records[2]["skipped_nan"] == 1 and records[4]["micro_batches_trained"] == 4
    assert {(r["step"], r["rank"], r["reason"]) for r in quarantine_records(run)} == {(2, 0, "nan"), (2, 1, "peer")}
    assert_weights_finite(run)
