"""bench/gpu_check.sh: the plan on any machine, one clear refusal without a GPU, the offline build patch, the
speed stage's checks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import Check, record_speed, stage_kernels, restrict_to_local_arch, scale_trajectory, wheel_name  # noqa: E402


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                            "PYTHON": sys.executable})


def test_dry_run_prints_every_stage_and_exits_0():
    result = gpu_check("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for stage in ("install", "drills", "resume", "kernels", "parity", "speed"):
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


def speed_results(**changes) -> dict:
    """What bench/gpu_model_check.py writes for the speed stage (shape only; the numbers are made up)."""
    res = {"rehearsal": False, "rows": [{"T": 1024, "B": 16, "ratio_cuda": 0.6, "ratio_torch": 0.3}],
           "targets": [{"name": "ratio_at_1024", "value": 0.6, "target": ">= 0.5", "pass": True},
                       {"name": "mfu_at_1024", "value": 0.1, "target": ">= 15%", "pass": False},
                       {"name": "drop_1024_to_4096", "value": 0.2, "target": "<= 25%", "pass": True}],
           "breakdown": {"seconds": {"mamba": 0.5, "cross": 0.2, "head": 0.1, "optimizer": 0.1, "other": 0.1,
                                     "step": 1.0}},
           "loop": {"ok": True, "loop_tok_s": 950.0, "bare_tok_s": 1000.0, "overhead": 0.05}}
    res.update(changes)
    return res


def test_speed_stage_records_one_check_per_target(tmp_path, capsys):
    report: dict = {}
    assert not record_speed(Check(report, "speed"), speed_results(), 0, tmp_path / "speed.log")  # MFU missed
    checks = report["speed"]["checks"]
    assert {n: c["status"] for n, c in checks.items()} == {
        "table": "ok", "ratio_at_1024": "ok", "mfu_at_1024": "FAIL", "drop_1024_to_4096": "ok", "breakdown": "ok",
        "loop_overhead": "ok"}
    assert "mamba 50%" in checks["breakdown"]["detail"] and "+5.0%" in checks["loop_overhead"]["detail"]
    assert "gpu_check: speed.mfu_at_1024: FAIL: 10.0%" in capsys.readouterr().out

    report = {}
    slow_loop = speed_results(loop={"ok": False, "loop_tok_s": 800.0, "bare_tok_s": 1000.0, "overhead": 0.25})
    slow_loop["targets"][1]["pass"] = True
    assert not record_speed(Check(report, "speed"), slow_loop, 0, tmp_path / "speed.log")
    assert report["speed"]["checks"]["loop_overhead"]["status"] == "FAIL"

    report = {}  # a CPU rehearsal shows the targets without judging them
    assert record_speed(Check(report, "speed"), speed_results(rehearsal=True), 0, tmp_path / "speed.log")
    assert {c["status"] for n, c in report["speed"]["checks"].items() if n not in ("table", "breakdown")} == {"skipped"}

    report = {}  # a crashed benchmark
    assert not record_speed(Check(report, "speed"), {}, 1, tmp_path / "speed.log")
    assert report["speed"]["checks"]["table"]["status"] == "FAIL"


def test_kernels_stage_counts_the_compiled_kernel_tests(tmp_path, monkeypatch):
    import gpu_check

    def fake_pytest(xml):
        def run(cmd, log, env=None, timeout=600):
            junit = next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]
            Path(junit).write_text(xml)
            return 0 if 'failures="0"' in xml else 1
        return run

    monkeypatch.setattr(gpu_check, "importable", lambda module: True)
    report = {"kernels": {"checks": {}}}
    monkeypatch.setattr(gpu_check, "run", fake_pytest(
        '<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="89" tests="175"></testsuite></testsuites>'))
    assert stage_kernels(None, tmp_path, report, {})
    check = report["kernels"]["checks"]["compiled_vs_pytorch"]
    assert check["status"] == "ok" and check["ran"] == 86 and check["passed"] == 86
    monkeypatch.setattr(gpu_check, "run", fake_pytest(
        '<testsuites><testsuite name="pytest" errors="0" failures="2" skipped="89" tests="175"></testsuite></testsuites>'))
    assert not stage_kernels(None, tmp_path, report, {})
    assert report["kernels"]["checks"]["compiled_vs_pytorch"]["passed"] == 84
    # Everything skipped (no GPU reached the tests) is a failure, not a pass.
    monkeypatch.setattr(gpu_check, "run", fake_pytest(
        '<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="175" tests="175"></testsuite></testsuites>'))
    assert not stage_kernels(None, tmp_path, report, {})
