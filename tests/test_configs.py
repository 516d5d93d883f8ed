"""Every shipped YAML and JSON config parses, and the config surface rejects bad values by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig
from pipeline.engine.setup import DeepSpeedConfigError, load_deepspeed_config, precision_of
from pipeline.run_config import load_yaml_config, parse_run_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "launch" / "presets").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_shipped_configs_exist():
    names = {p.name for p in DS_CONFIGS}
    assert {"fp16_stable.json", "bf16.json", "cpu.json"} <= names
    assert {"tiny.yaml", "small.yaml", "base.yaml", "production.yaml", "demo.yaml"} <= {p.name for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_parses(preset):
    cfg = load_yaml_config(str(preset))
    assert cfg.model.hidden_dim > 0 and cfg.data.sequence_length > 1 and cfg.train.max_steps > 0


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_deepspeed_json_is_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = load_deepspeed_config(str(path), TrainConfig())
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_optimization_stage == 2
    assert parsed.gradient_clipping > 0


def test_fp16_recipe_spells_out_every_scaler_key():
    fp16 = json.loads((ROOT / "ds_configs" / "fp16_stable.json").read_text())["fp16"]
    # A partial fp16 block has silently fallen back to 2^32 initial scale before (DeepSpeed PR #4986).
    for key in ("enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                "consecutive_hysteresis", "min_loss_scale"):
        assert key in fp16, key
    assert fp16["loss_scale"] == 0, "dynamic scaling"
    assert fp16["initial_scale_power"] <= 10, "the old trainer diverged at 2^16"
    assert fp16["hysteresis"] >= 2 and fp16["consecutive_hysteresis"] is True


def test_overrides_and_print_config(tmp_path):
    cfg = parse_run_config(["--config", str(ROOT / "launch/presets/tiny.yaml"), "--model.hidden_dim", "48",
                            "--train.max_steps", "7"])
    assert cfg.model.hidden_dim == 48 and cfg.train.max_steps == 7
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config",
                          str(ROOT / "launch/presets/tiny.yaml"), "--train.max_steps", "7", "--print_config"],
                         capture_output=True, text=True, check=True)
    assert "max_steps: 7" in out.stdout and "hidden_dim:" in out.stdout


def test_invalid_values_name_the_field():
    with pytest.raises(ConfigError, match="model.beta"):
        parse_run_config(["--model.beta", "1.5"])
    with pytest.raises(ConfigError, match="train.lr"):
        parse_run_config(["--train.lr", "0"])


def test_batch_overrides_and_refusals(tmp_path):
    config = load_deepspeed_config(str(ROOT / "ds_configs/cpu.json"),
                                   TrainConfig(micro_batch_size=3, gradient_accumulation_steps=5))
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    bad = tmp_path / "stage3.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                               "zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match="stage3.json"):
        load_deepspeed_config(str(bad), TrainConfig())
    broken = tmp_path / "broken.json"
    broken.write_text("{\n  \"fp16\": \n}")
    with pytest.raises(DeepSpeedConfigError, match="broken.json is not valid JSON: line 3"):
        load_deepspeed_config(str(broken), TrainConfig())
    assert precision_of(json.loads((ROOT / "ds_configs/fp16_stable.json").read_text())) == "fp16"


def test_fp16_on_cpu_fails_at_once_with_one_sentence():
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--deepspeed_config",
                          str(ROOT / "ds_configs/fp16_stable.json"), "--config", str(ROOT / "launch/presets/tiny.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "fp16" in error_lines[0] and "ds_configs/cpu.json" in error_lines[0]


def test_lm_eval_task_yamls_name_their_local_data():
    """The local lm-evaluation-harness tasks (run by tests/test_export.py) read JSONL files that exist."""
    import yaml

    tasks = sorted((ROOT / "tests" / "lm_eval_tasks").glob("*.yaml"))
    assert len(tasks) == 2
    for path in tasks:
        task = yaml.safe_load(path.read_text())
        assert task["task"] == path.stem and task["dataset_path"] == "json"
        data = ROOT / task["dataset_kwargs"]["data_files"]["test"]
        assert data.is_file() and all(json.loads(line) for line in data.read_text().splitlines())
