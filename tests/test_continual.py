"""Continual schedules end to end: real DeepSpeed processes, 2 CPU ranks, ZeRO-2, the tiny preset.

The corpora are pseudo-languages generated here (tests/continual_corpora.py), tokenized with one shared
tokenizer: three with disjoint alphabets for the 3-task matrix and resume test, and two "dialects" of one
language (same words, different frequencies and word order) for the forgetting comparisons, where the
tasks share a vocabulary as EWC assumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from continual_corpora import prepare_languages
from dsrun import train, train_records
from pipeline.config import ModelConfig
from pipeline.data import PackedReader
from pipeline.metrics import read_metrics
from pipeline.model import HybridLM
from pipeline.run_config import load_yaml_config

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def languages(tmp_path_factory) -> dict:
    return prepare_languages(tmp_path_factory.mktemp("languages"),
                             names=("alpha", "beta", "gamma", "alpha/x", "alpha/y"))


def schedule_args(tasks: list[str], **continual) -> list[str]:
    args = ["--train.max_steps", "0", "--continual.tasks", "[" + ", ".join(tasks) + "]"]
    for key, value in continual.items():
        args += [f"--continual.{key}", str(value)]
    return args


def three_task_args(languages) -> list[str]:
    """alpha (10 steps), then a 3:1 blend of beta and alpha/x at its own lr (10 steps), then gamma by a token
    budget (2000 tokens / (3 fresh x 2 ranks x 32) -> 11 steps); replay and EWC on."""
    a, b, g, x = (languages[k] for k in ("alpha", "beta", "gamma", "alpha/x"))
    return schedule_args([f"{{name: alpha, data_dir: {a}, steps: 10}}",
                          f"{{name: beta, data_dirs: [{b}, {x}], weights: [3, 1], steps: 10, lr: 0.02}}",
                          f"{{name: gamma, data_dir: {g}, tokens: 2000}}"],
                         replay_ratio=0.25, replay_buffer_size=50, ewc_lambda=0.1, ewc_fisher_batches=2,
                         eval_batches=4, rewarm_steps=3) + \
        ["--train.checkpoint_interval", "10", "--train.keep_checkpoints", "0", "--train.eval_interval", "5",
         "--train.report", "false"]


@pytest.fixture(scope="module")
def three_tasks(languages, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("continual") / "full"
    # data.data_dir is not used by a schedule (the launcher passes one anyway: a warning)
    train(languages["alpha"], run_dir, *three_task_args(languages))
    return run_dir


def test_three_task_schedule_writes_the_matrix(three_tasks):
    matrix = json.loads((three_tasks / "task_matrix.json").read_text())
    assert matrix["tasks"] == ["alpha", "beta", "gamma"] and matrix["rows"] == ["init", "alpha", "beta", "gamma"]
    R = np.array(matrix["loss"])
    assert R.shape == (4, 3) and matrix["steps"] == [0, 10, 20, 31]
    assert np.allclose(matrix["perplexity"], np.exp(R))
    # Training a task lowers its own loss a lot: the tasks are different languages.
    for j in range(3):
        assert R[j + 1][j] < R[0][j] - 0.5, R
    assert R[1][1] > R[1][0] + 1.0 and R[1][2] > R[1][0] + 1.0, "after alpha, beta and gamma are still unknown"
    # The summary numbers follow the README's definitions.
    assert matrix["forgetting"][0] == pytest.approx(R[3][0] - min(R[1][0], R[2][0]))
    assert matrix["forgetting"][1] == pytest.approx(R[3][1] - R[2][1]) and matrix["forgetting"][2] is None
    assert matrix["bwt"] == pytest.approx(((R[1][0] - R[3][0]) + (R[2][1] - R[3][1])) / 2)
    assert matrix["fwt"] == pytest.approx(((R[0][1] - R[1][1]) + (R[0][2] - R[2][2])) / 2)
    csv = (three_tasks / "task_matrix.csv").read_text().splitlines()
    assert csv[0] == "after_task,step,alpha,beta,gamma" and csv[2].startswith("alpha,10,")
    assert (three_tasks / "task_matrix.png").stat().st_size > 1000
    evals = read_metrics(three_tasks, "task_eval")
    assert len(evals) == 12 and {(r["after_task"], r["task"]) for r in evals} == \
        {(a, t) for a in matrix["rows"] for t in matrix["tasks"]}
    assert all(r["loss"] == pytest.approx(R[matrix["rows"].index(r["after_task"])][matrix["tasks"].index(r["task"])])
               for r in evals)
    # Train records: the task, the LR re-warm-up at every boundary (task lr overrides train.lr), replay.
    records = train_records(three_tasks)
    assert sorted(records) == list(range(1, 32))
    assert [records[s]["task"] for s in (1, 10, 11, 20, 21, 31)] == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    lrs = {s: r["lr"] for s, r in records.items()}
    assert lrs[1] == pytest.approx(0.01 / 3) and lrs[3] == pytest.approx(0.01)
    assert lrs[11] == pytest.approx(0.02 / 3) and lrs[13] == pytest.approx(0.02) and lrs[20] < 0.02
    assert lrs[21] == pytest.approx(0.01 / 3) and min(lrs.values()) > 0
    assert records[10]["replay_buffer"] == 0 and records[11]["replay_buffer"] == 50
    assert "ewc_penalty" not in records[10] and records[12]["ewc_penalty"] > 0
    evals = {r["step"]: r for r in read_metrics(three_tasks, "eval")}
    assert [evals[s]["task"] for s in (0, 10, 15, 20, 25)] == ["alpha", "alpha", "beta", "beta", "gamma"]
    log = (three_tasks / "training.log").read_text()
    assert "data.data_dir=" in log and "is not used" in log
    assert "task_matrix.json" in log and "task_matrix.png" in log


def test_the_checkpoint_carries_the_continual_state(three_tasks):
    state = torch.load(three_tasks / "checkpoints" / "step00000020" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert {"reader", "continual_schedule", "replay_buffer", "ewc", "task_matrix"} <= set(state)
    assert state["continual_schedule"]["finished"] == 2 and state["continual_schedule"]["index"] == 2
    assert len(state["replay_buffer"]["ids"]) == 50 and state["replay_buffer"]["seen"] == 10 * 4 * 2 + 10 * 3 * 2
    assert state["ewc"]["tasks"] == 2 and len(state["task_matrix"]["rows"]) == 3
    assert state["reader"]["task"] == 2 and state["reader"]["micro_steps"] == 0


def test_fisher_equals_a_single_process_reference(three_tasks, languages):
    """EWC's Fisher at the end of task 1, computed by 2 ZeRO-2 ranks (autograd.grad + one all-reduce), against
    the plain per-sample `loss.backward()` of one process on the same 16 samples (2 batches x 4 x 2 ranks)."""
    state = torch.load(three_tasks / "checkpoints" / "step00000010" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    fisher, anchor = state["ewc"]["fisher"], state["ewc"]["anchor"]
    cfg = load_yaml_config(str(ROOT / "launch/presets/tiny.yaml"))
    model = HybridLM(ModelConfig(**json.loads((three_tasks / "config.json").read_text())["model"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(anchor)
    module_state = state["module"]
    with torch.no_grad():
        for (name, p), theta in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], anchor):
            p.copy_(theta)
            assert torch.equal(module_state[name].float(), theta), f"theta* of {name} is not the step-10 weight"
    model.eval()
    reader = PackedReader(languages["alpha"], sequence_length=cfg.data.sequence_length, seed=cfg.data.seed)
    expected = [torch.zeros_like(p) for p in params]
    samples = 2 * 4 * 2
    for n in range(samples):  # the first samples of alpha's order: what the task trained on first
        tokens = torch.from_numpy(reader.sample_tokens(n))[None]
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1])[0].float(), tokens[0, 1:])
        loss.backward()
        for e, p in zip(expected, params):
            e += p.grad.float().square() if p.grad is not None else 0
    flat = torch.cat([e.flatten() for e in expected]) / samples
    flat /= flat.mean()
    got = torch.cat([f.flatten() for f in fisher])
    assert float(got.mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(got, flat, rtol=1e-4, atol=1e-5)


def test_resume_in_the_middle_of_task_two_reproduces_the_run(three_tasks, languages, tmp_path):
    run_dir = tmp_path / "stopped"
    train(languages["alpha"], run_dir, *three_task_args(languages), "--train.exit_after_steps", "15")
    assert max(train_records(run_dir)) == 15
    resumed = train(languages["alpha"], run_dir, *three_task_args(languages), "--train.resume", "auto")
    assert "resumed from" in resumed.stdout
    expected, got = train_records(three_tasks), train_records(run_dir)
    assert sorted(got) == list(range(1, 32))
    for step in range(16, 32):
        assert got[step]["loss"] == expected[step]["loss"], step
        assert got[step]["task"] == expected[step]["task"] and got[step]["lr"] == expected[step]["lr"]
    assert json.loads((run_dir / "task_matrix.json").read_text())["loss"] == \
        json.loads((three_tasks / "task_matrix.json").read_text())["loss"]


# ---- forgetting, with and without replay and EWC -------------------------------------------------

def two_dialects(languages, **continual) -> list[str]:
    x, y = languages["alpha/x"], languages["alpha/y"]
    return schedule_args([f"{{name: first, data_dir: {x}, steps: 40}}", f"{{name: second, data_dir: {y}, steps: 40}}"],
                         eval_batches=8, ewc_fisher_batches=4, **continual) + \
        ["--train.eval_interval", "1000", "--train.checkpoint_interval", "1000", "--train.log_interval", "10",
         "--train.report", "false"]


@pytest.fixture(scope="module")
def forgetting(languages, tmp_path_factory) -> dict:
    """Forgetting of the first task (nats) after the second, per setting; printed for the README."""
    root = tmp_path_factory.mktemp("forgetting")
    settings = {"none": {}, "replay": {"replay_ratio": 0.25}, "ewc": {"ewc_lambda": 10.0}}
    out = {}
    for name, continual in settings.items():
        train(languages["alpha/x"], root / name, *two_dialects(languages, **continual))
        matrix = json.loads((root / name / "task_matrix.json").read_text())
        out[name] = {"forgetting": matrix["forgetting"][0], "loss": matrix["loss"]}
    print("forgetting of task 1 (nats):", {k: round(v["forgetting"], 4) for k, v in out.items()})
    return out


def test_without_protection_the_first_task_is_forgotten(forgetting):
    R = forgetting["none"]["loss"]
    assert R[1][0] < R[0][0] - 2.0 and R[2][1] < R[1][1] - 0.5, "both tasks are learnt"
    assert forgetting["none"]["forgetting"] > 0.2, forgetting


def test_replay_forgets_less(forgetting):
    assert forgetting["replay"]["forgetting"] < forgetting["none"]["forgetting"] - 0.2, forgetting


def test_ewc_forgets_less(forgetting):
    assert forgetting["ewc"]["forgetting"] < forgetting["none"]["forgetting"] - 0.2, forgetting
    R = forgetting["ewc"]["loss"]
    assert R[2][1] < R[0][1] - 1.0, "with EWC the second task is still learnt"
