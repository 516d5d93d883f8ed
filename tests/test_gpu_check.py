"""bench/gpu_check.sh: the plan on any machine, one clear refusal without a GPU, the deadline, process groups,
the background mamba-ssm build, what --out holds, the offline build patch, the speed stage's checks, and the
wheelhouse (bench/gpu_wheelhouse.sh) installed offline into a fresh folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from gpu_check import (Budget, Check, Context, alive, dist_of, record_speed, restrict_to_local_arch,  # noqa: E402
                       scale_trajectory, stage_kernels)


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    """A rehearsal's context (installs go to a --target folder) with a 60 s deadline."""
    context = Context(tmp_path / "out", tmp_path / "work", Budget(60), rehearsal=True)
    monkeypatch.setattr(gpu_check, "CTX", context, raising=False)
    return context


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                            "PYTHON": sys.executable})


def test_dry_run_prints_every_stage_and_exits_0():
    result = run_script("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stages = ("install", "kernels", "drills", "resume", "speed", "parity", "speed-mamba")  # the order of value
    runs = [line.split()[3] for line in lines if line.startswith("gpu_check: would run ")]
    assert runs == list(stages)
    assert "deadline 540 s" in result.stdout
    only = run_script("--dry-run", "--only", "resume,drills").stdout  # the order stays, whatever --only says
    assert [line.split()[3] for line in only.splitlines() if "would run" in line] == ["drills", "resume"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_in_one_line():
    result = run_script("--only", "drills")
    assert result.returncode == 2
    assert result.stdout.strip().count("\n") == 0 and "no CUDA GPU" in result.stdout
    assert "Traceback" not in result.stderr


def test_unknown_stage_is_named():
    result = run_script("--only", "drils", "--dry-run")
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
    assert dist_of(Path("typing_extensions-4.16.0-py3-none-any.whl")) == ("typing-extensions", "4.16.0")
    assert dist_of(Path("mamba_ssm-2.3.1.tar.gz")) == ("mamba-ssm", "2.3.1")
    assert dist_of(Path("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl")) == ("pyyaml", "6.0.4")


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


def test_kernels_stage_counts_the_compiled_kernel_tests(ctx, monkeypatch):
    def fake_pytest(xml):
        def run(cmd, log, env=None, timeout=600, tick=None):
            junit = next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]
            Path(junit).write_text(xml)
            return 0 if 'failures="0"' in xml else 1
        return run

    suite = '<testsuites><testsuite name="pytest" errors="0" failures="{}" skipped="{}" tests="175"></testsuite></testsuites>'
    monkeypatch.setattr(gpu_check, "run", fake_pytest(suite.format(0, 89)))
    assert stage_kernels(None, ctx, Check(ctx.report, "kernels"))
    check = ctx.report["kernels"]["checks"]["compiled_vs_pytorch"]
    assert check["status"] == "ok" and check["ran"] == 86 and check["passed"] == 86
    monkeypatch.setattr(gpu_check, "run", fake_pytest(suite.format(2, 89)))
    assert not stage_kernels(None, ctx, Check(ctx.report, "kernels"))
    assert ctx.report["kernels"]["checks"]["compiled_vs_pytorch"]["passed"] == 84
    # Everything skipped (no GPU reached the tests) is a failure, not a pass.
    monkeypatch.setattr(gpu_check, "run", fake_pytest(suite.format(0, 175)))
    assert not stage_kernels(None, ctx, Check(ctx.report, "kernels"))


# ---- processes and the deadline ------------------------------------------------------------------------
def test_a_timed_out_stage_leaves_neither_child_nor_grandchild(ctx):
    t = time.monotonic()
    assert gpu_check.stage_processes(ctx, Check(ctx.report, "processes"))
    assert time.monotonic() - t < 15
    child, grandchild = map(int, (ctx.work / "processes.pids").read_text().split())
    assert not alive(child) and not alive(grandchild)
    assert "process group" in (ctx.logs / "processes.log").read_text()


def test_leftover_group_members_are_killed_when_the_child_exits(ctx):
    """A rank or compiler worker left behind by a child that exited normally does not outlive the stage."""
    pid_file = ctx.work / "orphan.pid"
    code = ("import subprocess, sys; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "open(sys.argv[1], 'w').write(str(g.pid))")
    assert gpu_check.run([sys.executable, "-c", code, str(pid_file)], ctx.logs / "orphan.log", ctx.env, 30) == 0
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan)


def test_subprocess_timeouts_are_capped_by_the_deadline(ctx, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESERVE", 0)
    ctx.budget = Budget(2)
    t = time.monotonic()
    assert gpu_check.run(["sleep", "30"], ctx.logs / "sleep.log", ctx.env, timeout=600) == 124
    assert time.monotonic() - t < 10


def test_a_stage_that_cannot_finish_in_time_is_skipped_not_started(ctx, monkeypatch):
    started = []

    def stage(name, seconds):
        def fn(args, context, check):
            started.append(name)
            time.sleep(seconds)
            return check.record("done", True, name)
        return fn

    monkeypatch.setattr(gpu_check, "RESERVE", 0)
    monkeypatch.setattr(gpu_check, "NEEDS_CPU", {"install": 1, "drills": 1, "resume": 30})
    monkeypatch.setattr(gpu_check, "STAGE_FUNCTIONS", {"install": stage("install", 0), "drills": stage("drills", 1.5),
                                                       "resume": stage("resume", 0)})
    ctx.budget = Budget(10)
    args = type("Args", (), {"build_mamba_background": False})()
    ctx.report["stages"] = ["install", "drills", "resume"]
    assert not gpu_check.run_stages(args, ctx, ["install", "drills", "resume"])
    assert started == ["install", "drills"]
    assert ctx.report["resume"]["status"] == "skipped: deadline"
    assert ctx.report["resume"]["checks"]["deadline"]["detail"].startswith("deadline: ")
    saved = json.loads((ctx.out / "gpu_check.json").read_text())  # written after every stage
    assert saved["drills"]["status"] == "ok" and saved["resume"]["status"] == "skipped: deadline"


# ---- the background build --------------------------------------------------------------------------------
def test_background_build_returns_at_once_and_a_later_call_waits_for_it(ctx):
    args = type("Args", (), {"stand_in_seconds": 3, "wheelhouse": None})()
    t = time.monotonic()
    assert gpu_check.start_background_build(args, ctx, Check(ctx.report, "install"))
    assert time.monotonic() - t < 3
    pid = json.loads((ctx.work / "mamba-build.json").read_text())["pid"]
    assert alive(pid) and os.getsid(pid) == pid != os.getsid(0)  # its own session: it outlives the command
    assert gpu_check.start_background_build(args, ctx, Check(ctx.report, "again"))  # not started twice
    assert "not started again" in ctx.report["again"]["checks"]["mamba_build"]["detail"]
    # A second call (a new context on the same --work) waits for it within its deadline, installs its wheel.
    later = Context(ctx.out, ctx.work, Budget(60), rehearsal=True)
    later.report["stages"] = ["parity"]
    gpu_check.CTX = later
    assert gpu_check.ensure_mamba(args, later, Check(later.report, "parity"), "parity")
    checks = later.report["parity"]["checks"]
    assert checks["mamba_build"]["status"] == "ok" and checks["mamba_build"]["waited"] >= 1
    assert checks["mamba_install"]["status"] == "ok"
    assert list((ctx.work / "pydeps").glob("mamba_ssm_standin*"))  # the --target folder, not this environment


def test_waiting_for_the_build_stops_at_the_deadline(ctx, monkeypatch):
    args = type("Args", (), {"stand_in_seconds": 60, "wheelhouse": None})()
    gpu_check.start_background_build(args, ctx, Check(ctx.report, "install"))
    pid = json.loads((ctx.work / "mamba-build.json").read_text())["pid"]
    try:
        monkeypatch.setattr(gpu_check, "NEEDS_CPU", {**gpu_check.NEEDS_CPU, "parity": 1, "speed-mamba": 1})
        ctx.budget = Budget(gpu_check.RESERVE + 4)
        ctx.report["stages"] = ["parity", "speed-mamba"]
        assert gpu_check.ensure_mamba(args, ctx, Check(ctx.report, "parity"), "parity") is None
        check = ctx.report["parity"]["checks"]["mamba_build"]
        assert check["status"] == "skipped" and check["detail"].startswith("deadline: the background build")
        assert alive(pid)  # left running for a later call
    finally:
        gpu_check.kill_group(pid)


# ---- what comes back -------------------------------------------------------------------------------------
def test_out_holds_only_the_json_the_log_and_one_tarball(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    code = gpu_check.main(["--rehearse-on-cpu", "--call", "--only", "processes", "--out", str(out), "--work", str(work),
                           "--deadline", "60"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "logs.tgz"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["processes"]["checks"]["group_kill"]["status"] == "ok"
    assert "processes.group_kill: ok" in (out / "gpu_check.log").read_text()
    with tarfile.open(out / "logs.tgz") as tar:
        assert "logs/processes.log" in tar.getnames()
    assert gpu_check.main(["--dry-run", "--out", str(out), "--work", str(out / "w")]) == 2  # work inside out


def test_speed_rows_reach_gpu_check_json_while_the_benchmark_runs(ctx, monkeypatch, tmp_path):
    """A benchmark killed by the deadline after its first row keeps that row in gpu_check.json."""
    fake_root = tmp_path / "root"
    (fake_root / "bench").mkdir(parents=True)
    (fake_root / "bench/gpu_model_check.py").write_text(
        "import json, sys, time\n"
        "path = sys.argv[sys.argv.index('--json') + 1]\n"
        "json.dump({'speed': {'rows': [{'T': 256, 'B': 32, 'ratio_torch': 0.04}]}}, open(path, 'w'))\n"
        "print('row 1', flush=True)\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "ROOT", fake_root)
    monkeypatch.setattr(gpu_check, "RESERVE", 0)
    ctx.rehearsal = False
    ctx.budget = Budget(6)
    ctx.report["stages"] = ["speed"]
    assert not gpu_check.stage_model("speed", None, ctx, Check(ctx.report, "speed"))
    saved = json.loads((ctx.out / "gpu_check.json").read_text())
    assert saved["speed"]["results"]["speed"]["rows"][0]["ratio_torch"] == 0.04
    assert ctx.report["speed"]["checks"]["table"]["status"] == "FAIL"  # exit 124: the table is incomplete


# ---- the wheelhouse ----------------------------------------------------------------------------------------
def provided_folder(folder: Path, names) -> Path:
    """Links to what the GPU machine ships (torch, triton, numpy, pyarrow and what they need) from this
    environment: the only packages an import test may see besides the wheelhouse."""
    from importlib import metadata

    from packaging.requirements import Requirement

    folder.mkdir(parents=True, exist_ok=True)
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


@pytest.mark.launch
def test_wheelhouse_installs_offline_into_a_fresh_target_and_everything_imports(tmp_path):
    """The wheelhouse for this machine's Python (cached between runs; needs the package registry once):
    installed with --no-index into an empty folder, it is all the pipeline needs beside what the GPU machine
    ships. The imports run in an interpreter that sees only that folder, the shipped packages and the stdlib."""
    import hashlib
    import tempfile

    from gpu_wheelhouse import ALSO_SHIPPED, PROVIDED

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in
                                  ("bench/gpu_wheelhouse.py", "bench/gpu_requirements.txt"))).hexdigest()[:12]
    house = Path(tempfile.gettempdir()) / f"gpu_wheelhouse-py{version}-{key}"
    import platform
    glibc = platform.libc_ver()[1] or "2.17"
    if not (house / "wheelhouse.json").is_file():
        built = subprocess.run(["bash", str(ROOT / "bench/gpu_wheelhouse.sh"), str(house), version, "--no-sdists",
                                "--max-glibc", glibc], env=dict(os.environ, PYTHON=sys.executable),
                               capture_output=True, text=True, timeout=1200)
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    manifest = json.loads((house / "wheelhouse.json").read_text())
    assert manifest["python_version"] == version and {"deepspeed", "pydantic", "pydantic-core", "jsonargparse",
                                                       "typeshed-client", "typing-extensions"} <= set(manifest["pins"])
    assert not {"torch", "triton", "numpy"} & set(manifest["pins"])
    names = [p.name.split("-")[0].lower() for p in house.glob("*.whl")]
    assert len(names) == len(set(names))  # one version of each
    target = tmp_path / "target"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                              "--disable-pip-version-check", "--target", str(target), *map(str, house.glob("*.whl"))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    shipped = provided_folder(tmp_path / "shipped", [p.split("==")[0] for p in PROVIDED] + list(ALSO_SHIPPED))
    code = ("import sys, runpy, importlib\n"
            "sys.path[:0] = sys.argv[1:4]\n"
            "for m in sys.argv[4:]:\n"
            "    importlib.import_module(m)\n"
            "assert all(not (p.endswith('site-packages') and 'target' not in p) for p in sys.path), sys.path\n"
            "sys.argv = ['launch/train.py', '--config', 'launch/presets/tiny.yaml', '--print_config']\n"
            "runpy.run_path('launch/train.py', run_name='__main__')\n")
    # -I: no PYTHONPATH, no user site; -S: no site-packages of this environment at all.
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(target), str(shipped), str(ROOT),
                             *gpu_check.NEEDED], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, PIPELINE_DISABLE_CPP_KERNELS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mamba_backend" in result.stdout


def test_the_speed_benchmark_saves_after_every_row(one_thread, monkeypatch):
    """bench/gpu_model_check.py calls save() as each row is measured: what gpu_check.json picks up mid-run.
    (The timings are stubbed: only the order of saving and measuring is under test; test_bench.py times.)"""
    sys.path.insert(0, str(ROOT))
    from bench.bench_model import hybrid_config
    from bench import gpu_model_check

    seen, measured = [], []

    def time_interleaved(runs, vocab, B, T, *rest):
        measured.append(T)
        return {name: [0.01 * T] for name in runs}

    monkeypatch.setattr(gpu_model_check, "time_interleaved", time_interleaved)
    monkeypatch.setattr(gpu_model_check, "breakdown", lambda *a, **k: {"mamba": 0.5, "other": 0.5, "step": 1.0})
    monkeypatch.setattr(gpu_model_check.Peak, "measure", lambda self, seconds=0.5: setattr(self, "value", 1e12))
    monkeypatch.setattr(gpu_model_check, "print_breakdown", lambda *a, **k: None)
    res = gpu_model_check.speed(hybrid_config(32, 512, preset="tiny"), [(16, 2), (32, 1), (64, 1)], "cpu", None,
                                reps=1, warmup=1, rehearsal=True, backends="torch",
                                save=lambda: seen.append((len(measured), len(gpu_model_check.RESULTS["speed"]["rows"]))))
    assert len(res["rows"]) == 3 and set(res["step_seconds"]) == {"16", "32", "64"}
    # Each point's step times are saved as soon as they are measured, before the next point is timed.
    assert seen[:3] == [(1, 0), (2, 0), (3, 0)] and seen[-1] == (3, 3)
    assert [rows for _, rows in seen][3:6] == [1, 2, 3]
