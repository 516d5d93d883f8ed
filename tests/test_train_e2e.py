"""End to end with real DeepSpeed processes: 2 CPU ranks, gloo, ZeRO-2, the tiny preset.

A user relies on: the loss goes down, evaluation runs on held-out data, and a run that was stopped
after a checkpoint and resumed with `--train.resume auto` continues with exactly the losses an
uninterrupted run has.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsrun import generate_text, tiny_data, train, train_losses  # noqa: F401  (tiny_data is a fixture)
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    train(tiny_data, run_dir, "--train.max_steps", "16", "--train.checkpoint_interval", "8",
          "--train.eval_interval", "8")
    return run_dir


def test_loss_decreases_and_eval_runs_on_held_out_split(uninterrupted):
    losses = train_losses(uninterrupted)
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.5, losses
    evals = {r["step"]: r for r in read_metrics(uninterrupted, "eval")}
    assert set(evals) == {0, 8, 16}
    assert evals[16]["loss"] < evals[0]["loss"] - 0.5
    assert evals[16]["tokens"] > 0 and 0.0 <= evals[16]["accuracy"] <= 1.0
    lrs = [r["lr"] for r in read_metrics(uninterrupted, "train")]
    assert lrs[0] > 0, "the first step must train at a learning rate above zero"
    log = (uninterrupted / "training.log").read_text()
    assert "[rank1]" not in log, "only rank 0 writes the log"
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == "step00000016"
    assert (uninterrupted / "tokenizer.model").is_file()


def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny_data, uninterrupted, tmp_path):
    run_dir = tmp_path / "stopped"
    train(tiny_data, run_dir, "--train.max_steps", "16", "--train.checkpoint_interval", "8",
          "--train.eval_interval", "8", "--train.exit_after_steps", "5")
    assert max(train_losses(run_dir)) == 5
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000005"
    resumed = train(tiny_data, run_dir, "--train.max_steps", "16", "--train.checkpoint_interval", "8",
                    "--train.eval_interval", "8", "--train.resume", "auto")
    assert "resumed from" in resumed.stdout
    checkpoint = run_dir / "checkpoints" / "step00000016"  # written by the resumed run
    client_state = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert {"reader", "guard", "scale_watch", "run_config"} <= set(client_state)
    for rank in (0, 1):
        assert "accelerator" in torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False)
    expected, got = train_losses(uninterrupted), train_losses(run_dir)
    assert sorted(got) == list(range(1, 17))
    for step in range(6, 17):
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_generate_from_trained_checkpoint(uninterrupted):
    generate_text(uninterrupted)
