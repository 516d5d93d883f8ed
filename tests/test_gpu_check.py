"""bench/gpu_check.sh: the plan on any machine, one clear refusal without a GPU, the offline build patch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import restrict_to_local_arch, scale_trajectory, wheel_name  # noqa: E402


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                            "PYTHON": sys.executable})


def test_dry_run_prints_every_stage_and_exits_0():
    result = gpu_check("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for stage in ("install", "drills", "resume", "parity", "speed"):
        assert any(line.startswith(f"gpu_check: would run {stage}:") for line in lines), stage
    only = gpu_check("--dry-run", "--only", "drills,resume").stdout
    assert "would run drills" in only and "would run parity" not in only


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_in_one_line():
    result = gpu_check("--only", "drills")
    assert result.returncode == 2
    assert result.stdout.strip().count("\n") == 0 and "no CUDA GPU" in result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_stage_is_named():
    result = gpu_check("--only", "drils", "--dry-run")
    assert result.returncode == 2 and "drils" in result.stdout


SETUP = '''
cc_flag = []
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if version >= 12:
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
'''


def test_build_is_restricted_to_the_local_architecture(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text(SETUP)
    assert restrict_to_local_arch(setup, "90")
    flags = []
    exec(compile(setup.read_text(), str(setup), "exec"), {"version": 12, "cc_flag": flags})
    assert "arch=compute_90,code=sm_90" in setup.read_text()
    assert "compute_80" not in setup.read_text() and "compute_100" not in setup.read_text()
    setup.write_text(SETUP)
    assert not restrict_to_local_arch(setup, "75") and setup.read_text() == SETUP  # unknown: build them all


def test_wheel_names_are_normalised():
    assert wheel_name(Path("typing_extensions-4.16.0-py3-none-any.whl")) == "typing-extensions"
    assert wheel_name(Path("mamba_ssm-2.3.1.tar.gz")) == "mamba-ssm"
    assert wheel_name(Path("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl")) == "pyyaml"


def test_expected_scale_trajectory_follows_deepspeeds_hysteresis_rule():
    got = scale_trajectory(range(1, 10), {3, 5, 6}, 1024.0, 2, 2)
    assert got[3] == (1024.0, 1)  # an isolated overflow costs hysteresis only
    assert got[4] == (1024.0, 2)  # consecutive_hysteresis refills it on a clean step
    assert got[6] == (512.0, 1)   # two in a row halve the scale
    assert got[8] == (512.0, 2)
    assert got[9] == (1024.0, 2)  # the window of 2 overflow-free steps after the last overflow doubles it
