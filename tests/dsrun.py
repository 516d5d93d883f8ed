"""Starting real DeepSpeed training processes from tests (2 CPU ranks, gloo)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.comm import free_port
from pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small real corpus (Python standard library sources) tokenized with a 512-piece tokenizer."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    subprocess.run([sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out_dir", str(out),
                    "--vocab_size", "512", "--max_bytes", "600000", "--val_fraction", "0.2"], cwd=ROOT, check=True, capture_output=True)
    return out


def write_ds_config(path: Path, base: str = "ds_configs/fp16_stable.json", **fp16) -> Path:
    config = json.loads((ROOT / base).read_text())
    config.setdefault("fp16", {}).update(fp16)
    path.write_text(json.dumps(config))
    return path


def run_group(cmd: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a launcher in a process group of its own: on a timeout its ranks are killed with it, not orphaned."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(data_dir: Path, run_dir: Path, *overrides: str, ds_config: str | Path = "ds_configs/cpu.json",
          num_procs: int = 2, expect_rc: int = 0, preset: str | Path = "launch/presets/tiny.yaml"
          ) -> subprocess.CompletedProcess:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    assert launcher, "the deepspeed launcher is not on PATH"
    port = free_port()
    cmd = [launcher, "--num_gpus", str(num_procs), "--master_port", str(port),
           str(ROOT / "launch/train.py"), "--deepspeed_config", str(ROOT / ds_config),
           "--config", str(ROOT / preset),
           "--data.data_dir", str(data_dir), "--train.out_dir", str(run_dir),
           "--train.log_interval", "1", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = run_group(cmd, env)
    if result.returncode != expect_rc:
        raise AssertionError(f"rc={result.returncode} (expected {expect_rc})\n{result.stdout[-8000:]}\n"
                             f"{result.stderr[-4000:]}")
    leftover = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not leftover, f"DeepSpeed's shared-memory buffers were left behind: {leftover}"
    return result


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir, "train")}


def train_losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in train_records(run_dir).items()}


def quarantine_records(run_dir: Path) -> list[dict]:
    path = run_dir / "skipped_batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def generate_text(run_dir: Path, prompt: str = "def ", max_new_tokens: int = 8) -> str:
    """launch/generate.py on a trained run folder; fails the test unless it exits 0 and prints text."""
    out = subprocess.run([sys.executable, str(ROOT / "launch/generate.py"), "--checkpoint", str(run_dir),
                          "--prompt", prompt, "--max_new_tokens", str(max_new_tokens), "--seed", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
    return out.stdout
