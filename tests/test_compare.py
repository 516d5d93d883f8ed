"""`python -m pipeline.compare` end to end, and the Transformer through the real training path (2 CPU ranks,
gloo, ZeRO-2): it trains under fp32 and emulated fp16, resumes bit-exactly and generates text."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dsrun import ROOT, generate_text, tiny_data, train, train_losses  # noqa: F401  (tiny_data is a fixture)
from pipeline.compare import main as compare_main, validation_digest
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.distributed

LRS = [3e-3, 1e-2]


def run_compare(data: Path, out: Path, budget: str) -> dict:
    return compare_main(["--config", str(ROOT / "launch/presets/tiny.yaml"), "--data.data_dir", str(data),
                         "--budget", budget, "--lrs", ",".join(map(str, LRS)), "--out", str(out), "--evals", "2",
                         "--train.eval_batches", "2", "--calibration_steps", "4", "--num_procs", "2",
                         # the test needs the clock, not the schedule's end, to stop the seconds runs
                         "--seconds_headroom", "3", "--run_timeout", "900"])


@pytest.fixture(scope="module")
def by_tokens(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare") / "tokens"
    return out, run_compare(tiny_data, out, "tokens:4096")  # 16 steps of 2 ranks x micro-batch 4 x 32 tokens


@pytest.fixture(scope="module")
def by_seconds(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare") / "seconds"
    return out, run_compare(tiny_data, out, "seconds:4")


def check_outputs(out: Path, summary: dict) -> None:
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(summary))
    md = (out / "compare.md").read_text()
    for row in ("non-embedding parameters", "FLOPs per token", "tokens seen", "wall time", "tokens/s", "MFU",
                "best LR", "validation loss", "bits per byte", "perplexity", "load average"):
        assert row in md, row
    assert summary["verdict"] in md and "%" in summary["verdict"]
    for plot in ("bpb_tokens.png", "bpb_time.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    for model in ("hybrid", "transformer"):
        runs = summary["runs"][model]
        assert [r["lr"] for r in runs] == LRS and not any(r.get("failed") for r in runs), runs
        for r in runs:
            config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
            assert config["model"]["arch"] == model
        best = summary["results"][model]
        assert best["val_loss"] == min(r["val_loss"] for r in runs)
        assert best["bpb"] > 0 and best["tokens_per_s"] > 0 and best["mfu"] > 0
    h, t = (summary["sizes"][m]["non_embedding_params"] for m in ("hybrid", "transformer"))
    assert abs(t / h - 1) <= 0.05, (h, t)
    # Honesty: both read the same validation token ids (each run's digest rebuilt from its own config) ...
    assert summary["validation"]["identical"]
    for model in ("hybrid", "transformer"):
        evals = read_metrics(summary["results"][model]["run_dir"], "eval")
        assert evals[-1]["tokens"] == summary["validation"][model]["tokens"]


def test_tokens_budget_end_to_end(by_tokens, tmp_path):
    out, summary = by_tokens
    check_outputs(out, summary)
    steps = summary["steps"]
    assert steps["hybrid"] == steps["transformer"] == 4096 // summary["tokens_per_step"] == 16
    for model in ("hybrid", "transformer"):
        assert summary["results"][model]["tokens_seen"] == 4096
        losses = train_losses(Path(summary["results"][model]["run_dir"]))
        assert losses[max(losses)] < losses[1] - 0.3, (model, losses)  # the Transformer learns under fp32 too
    # ... and the digest does see a different validation stream.
    other = tmp_path / "other"
    other.mkdir()
    run_dir = Path(summary["results"]["hybrid"]["run_dir"])
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["sequence_length"] += 1
    (other / "config.json").write_text(json.dumps(config))
    shutil.copy(run_dir / "ds_config.json", other)
    assert validation_digest(other, 2)["sha256"] != summary["validation"]["hybrid"]["sha256"]


def test_seconds_budget_end_to_end(by_seconds):
    out, summary = by_seconds
    check_outputs(out, summary)
    assert summary["max_seconds"] == 4
    for model in ("hybrid", "transformer"):
        for r in summary["runs"][model]:
            # The clock ends every run, after its 4 s and within a step of them, on both ranks at once.
            assert 4 <= r["train_seconds"] and r["step"] < summary["steps"][model], r
            slowest_step = max(summary["tokens_per_step"] / rec["tokens_per_s"]
                               for rec in read_metrics(r["run_dir"], "train"))
            assert r["train_seconds"] < 4 + 2 * slowest_step, r
            assert "train.max_seconds=4 reached" in (Path(r["run_dir"]) / "training.log").read_text()


@pytest.fixture(scope="module")
def transformer_preset(tmp_path_factory) -> Path:
    """The tiny preset with its model replaced by a Transformer of the same width and vocabulary."""
    preset = yaml.safe_load((ROOT / "launch/presets/tiny.yaml").read_text())
    preset["model"] = {"arch": "transformer", "vocab_size": 512, "hidden_dim": 32, "num_layers": 2,
                       "num_attention_heads": 4}
    path = tmp_path_factory.mktemp("presets") / "tiny_transformer.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture(scope="module")
def fp16_transformer(tiny_data, transformer_preset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "transformer-fp16"
    train(tiny_data, run_dir, "--train.max_steps", "12", "--train.checkpoint_interval", "6", "--train.eval_interval", "6",
          "--train.allow_cpu_fp16", "true", ds_config="ds_configs/fp16_stable.json", preset=transformer_preset)
    return run_dir


def test_transformer_trains_under_emulated_fp16(fp16_transformer):
    losses = train_losses(fp16_transformer)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.3, losses
    assert "loss_scale" in read_metrics(fp16_transformer, "train")[-1]
    evals = read_metrics(fp16_transformer, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["train_tokens"] > 0


def test_transformer_resumes_bit_exactly(tiny_data, transformer_preset, fp16_transformer, tmp_path):
    run_dir = tmp_path / "stopped"
    common = ( "--train.max_steps", "12", "--train.checkpoint_interval", "6", "--train.eval_interval",
              "6", "--train.allow_cpu_fp16", "true")
    train(tiny_data, run_dir, *common, "--train.exit_after_steps", "4", ds_config="ds_configs/fp16_stable.json",
          preset=transformer_preset)
    assert max(train_losses(run_dir)) == 4
    resumed = train(tiny_data, run_dir, *common, "--train.resume", "auto", ds_config="ds_configs/fp16_stable.json",
                    preset=transformer_preset)
    assert "resumed from" in resumed.stdout
    expected, got = train_losses(fp16_transformer), train_losses(run_dir)
    assert [got[s] for s in range(5, 13)] == [expected[s] for s in range(5, 13)]


def test_transformer_checkpoint_generates_text(fp16_transformer):
    generate_text(fp16_transformer)
