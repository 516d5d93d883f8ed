"""The GPU check, offline, inside a time budget: install what the machine lacks, then check the pipeline on the GPU.

    bash bench/gpu_check.sh --wheelhouse W --out OUT --deadline 450 --build-mamba-background \\
        --only install,kernels,drills,resume,speed                      # call 1
    bash bench/gpu_check.sh --wheelhouse W --out OUT --deadline 240 --only parity,speed-mamba   # call 2
    bash bench/gpu_check.sh --dry-run                                    # the plan; any machine, exits 0
    bash bench/gpu_check.sh --rehearse-on-cpu --deadline 300             # both calls on a CPU (developers)

Stages, in order of value (`--only` picks some; the order stays):
  install      bench/gpu_requirements.txt from --wheelhouse (bench/gpu_wheelhouse.sh) with pip's resolver, offline:
               what is missing, and upgrades of what is older than required (never torch, triton, numpy); where
               the interpreter refuses, every wheel missing or older than pinned into a `--target` folder in
               --work; then imports every module the pipeline needs and parses a preset through
               launch/train.py --print_config
  kernels      tests/test_kernels.py with the Triton kernels compiled for this GPU (LIF, liquid, diagonal scan;
               fp32, bf16, fp16): values and gradients against the PyTorch path
  drills       launch/train.py with ds_configs/fp16_stable.json: NaN losses on chosen steps and on a random share
               of micro-batches, infinite gradients with the loss-scale trajectory checked against DeepSpeed's
               rule; all weights finite at the end
  resume       the same run stopped after a checkpoint and resumed with --train.resume auto: the losses after the
               stop equal the uninterrupted run's bit for bit
  speed        bench/gpu_model_check.py --backends torch: the hybrid with the pure-PyTorch Mamba against a
               same-size Transformer (tokens/s, MFU, ratio; the targets shown, judged in speed-mamba) and where a
               step goes
  parity       every Mamba layer through mamba-ssm's kernels vs the pure-PyTorch path; a CPU checkpoint on CUDA
  speed-mamba  the same table with mamba-ssm's kernels, PASS/FAIL of the targets (>= 0.5x and >= 15 % MFU at seq
               1024, <= 25 % slower per token at 4096), the breakdown, launch/train.py against the bare step
The drills and resume pin the pure-PyTorch Mamba path (--model.mamba_backend torch): mamba-ssm's backward
accumulates with atomicAdd, whose order varies, so a bit-exact resume is only defined without it.  C++ CPU
kernels are disabled in every stage (PIPELINE_DISABLE_CPP_KERNELS=1): a CUDA run does not use them and they
would JIT-build from cold.

Time: --deadline (default 540 s) bounds the whole command. Every subprocess's timeout is capped by what is
left; a stage whose estimated need (NEEDS) exceeds what is left is reported `skipped: deadline`, not started.
Every subprocess runs in its own session and its whole process group is killed when it times out or ends,
so no nvcc, ninja or rank outlives its stage and holds the GPU or a port.

mamba-ssm: --build-mamba-background starts its source build for this GPU's sm_XX in its own session and
returns at once (the build survives the command while the machine stays up); parity and speed-mamba wait for
it within the deadline, install the wheel it made, or build in the foreground when none was started.

Results: --out holds only gpu_check.json (rewritten after every stage and every measured speed row),
gpu_check.log (what was printed) and logs.tgz (the stage logs); everything else goes to --work.
Exit status: 0 all checks passed, 1 a check failed or was skipped for the deadline, 2 no GPU (or bad arguments).
Only the standard library is imported here.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench/gpu_requirements.txt"  # what the wheelhouse was resolved from
PLAN = {
    "install": "install what is missing or older than pinned from --wheelhouse (never torch); import every module "
               "the pipeline needs",
    "kernels": "the Triton kernels (LIF, liquid, diagonal scan) compiled for this GPU: tests/test_kernels.py "
               "against the PyTorch path, fp32/bf16/fp16, values and gradients",
    "drills": "fp16 NaN-loss, NaN-fraction and inf-gradient drills through launch/train.py; loss-scale trajectory",
    "resume": "stop after a checkpoint, resume with --train.resume auto: losses bit-exact vs the uninterrupted run",
    "speed": "tokens/s and MFU of the hybrid with the pure-PyTorch Mamba vs a same-size Transformer; breakdown",
    "parity": "every Mamba layer, mamba-ssm kernels vs the PyTorch path; a CPU checkpoint on CUDA",
    "speed-mamba": "the speed table with mamba-ssm's kernels, the targets judged, breakdown, launch/train.py vs "
                   "the bare step",
}
STAGES = tuple(PLAN)
# Seconds a stage needs at least on one H100/H200 (estimates from docs/GPU_CHECK.md; measured ones say so there),
# and on the 2-core development machine for --rehearse-on-cpu. A stage is started only when this much is left.
NEEDS = {"install": 20, "kernels": 60, "drills": 60, "resume": 75, "speed": 90, "parity": 45, "speed-mamba": 90}
NEEDS_CPU = {"processes": 10, "install": 20, "kernels": 45, "drills": 60, "resume": 90, "speed": 90,
             "parity": 5, "speed-mamba": 5}
MAMBA_STAGES = ("parity", "speed-mamba")
MAMBA_MODULE = "mamba_ssm.ops.selective_scan_interface"  # what pipeline/model/mamba.py imports
# What the pipeline and the check import beyond the standard library.
NEEDED = ("torch", "triton", "numpy", "deepspeed", "jsonargparse", "docstring_parser", "typeshed_client",
          "pydantic", "hjson", "yaml", "sentencepiece", "pyarrow", "tqdm", "einops", "msgpack", "cpuinfo", "psutil",
          "ninja", "pytest")
NEVER_INSTALL = re.compile(r"^(torch|triton|numpy|nvidia-.*)$", re.I)
DRILL_STEPS, STOP_AT = 12, 6
NAN_STEP, INF_STEPS = 3, (5, 6)
RESERVE = 8  # seconds kept back from the deadline for writing gpu_check.json and logs.tgz
LOG_TAIL = 3 << 20  # bytes of each log that go into logs.tgz (the tail: where the errors are)


class Budget:
    """What is left of --deadline; every timeout below is capped by it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds - RESERVE

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def cap(self, timeout: float) -> float:
        return max(1.0, min(timeout, self.left()))


class Context:
    """Where things go, and what every stage shares."""

    def __init__(self, out: Path, work: Path, budget: Budget, rehearsal: bool = False):
        self.out, self.work, self.budget, self.rehearsal = out, work, budget, rehearsal
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.pydeps = work / "pydeps"
        self.report: dict = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PIPELINE_DISABLE_CPP_KERNELS="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(self.pydeps), str(ROOT),
                                                               os.environ.get("PYTHONPATH", "")) if p))

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "gpu_check.log", "a") as f:
            f.write(text + "\n")

    def save(self) -> None:
        """gpu_check.json and logs.tgz as they stand: whatever ends the command, what ran is in --out."""
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out / "gpu_check.json")
        with tarfile.open(self.out / "logs.tgz.tmp", "w:gz") as tar:
            for log in sorted(self.logs.iterdir()):
                data = log.read_bytes()[-LOG_TAIL:]
                info = tarfile.TarInfo(f"logs/{log.name}")
                info.size, info.mtime = len(data), int(log.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        (self.out / "logs.tgz.tmp").replace(self.out / "logs.tgz")


CTX: Context  # set by main(); the tests make their own


class Check:
    """One stage's results: named checks with ok/detail, written to gpu_check.json."""

    def __init__(self, report: dict, stage: str):
        self.entries = report.setdefault(stage, {"checks": {}})
        self.entries.setdefault("checks", {})
        self.stage = stage

    def record(self, name: str, ok: bool | None, detail: str, **values) -> bool:
        status = "ok" if ok else ("skipped" if ok is None else "FAIL")
        self.entries["checks"][name] = {"status": status, "detail": detail, **values}
        line = f"gpu_check: {self.stage}.{name}: {status}: {detail}"
        CTX.say(line) if "CTX" in globals() else print(line, flush=True)
        return ok is not False


# ---- processes -------------------------------------------------------------------------------------
def group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies, waiting to be reaped, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def kill_group(pgid: int) -> None:
    """SIGTERM to the whole group, SIGKILL to what is left 5 s later."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.05)
        if not group_alive(pgid):
            return


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 600, tick=None) -> int:
    """cmd in its own session, output appended to log; on timeout (capped by the deadline) its whole process
    group is killed, and so is whatever of the group is left when it ends (ranks, compiler workers).
    tick() runs every 2 s while it runs. Returns the exit status, 124 on timeout."""
    timeout = CTX.budget.cap(timeout) if "CTX" in globals() else timeout
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    return proc.wait(timeout=max(0.01, min(2.0, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick()
                    if time.monotonic() >= end:
                        kill_group(proc.pid)
                        proc.wait()
                        f.write(f"\ntimed out after {timeout:.0f} s: process group {proc.pid} killed\n")
                        return 124
        finally:
            kill_group(proc.pid)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def python(code: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A short probe in the environment the stages see (the --target folder on PYTHONPATH), in its own process
    group like every stage's subprocess; exit status 124 when the deadline stops it."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env or CTX.env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CTX.budget.cap(timeout))
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, 124, out, err + "\ntimed out (the deadline)")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stage_processes(ctx: Context, check: Check) -> bool:
    """Rehearsal only: a child that starts a grandchild, both sleeping, timed out after 3 s: neither is left."""
    pids = ctx.work / "processes.pids"
    pids.unlink(missing_ok=True)
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); open(sys.argv[1], 'w').write(f'{__import__(\"os\").getpid()} {g.pid}'); "
            "time.sleep(120)")
    t = time.monotonic()
    rc = run([sys.executable, "-c", code, str(pids)], ctx.logs / "processes.log", ctx.env, timeout=3)
    seconds = time.monotonic() - t
    child, grandchild = map(int, pids.read_text().split()) if pids.is_file() else (0, 0)
    left = [p for p in (child, grandchild) if p and alive(p)]
    return check.record("group_kill", rc == 124 and child and grandchild and not left,
                        f"a child (pid {child}) and its sleeping grandchild (pid {grandchild}) timed out after "
                        f"{seconds:.1f} s (exit {rc}); alive afterwards: {left or 'none'}")


# ---- install ---------------------------------------------------------------------------------------
def dist_of(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) of a wheel or sdist file name (PEP 503 names)."""
    stem = path.name[:-len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem
    name, version = (stem.split("-") + [""])[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


VERSIONS = """
import json, sys
from importlib import metadata
try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version
out = {}
for item in sys.argv[1:]:
    name, wanted = item.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    out[name] = [have, have is None or Version(have) < Version(wanted)]
print(json.dumps(out))
"""


def pip_install(files: list[str], ctx: Context, log: Path) -> str:
    """pip into this interpreter; one that refuses (externally managed, read-only) gets the --target folder
    on PYTHONPATH instead. Returns where they went, or '' on failure."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    # A rehearsal leaves the developer's environment alone.
    if not ctx.rehearsal and run(base + files, log, ctx.env, timeout=300) == 0:
        return "the interpreter"
    ctx.pydeps.mkdir(parents=True, exist_ok=True)
    if run(base + ["--upgrade", "--target", str(ctx.pydeps)] + files, log, ctx.env, timeout=300) == 0:
        return str(ctx.pydeps)
    return ""


def stage_install(args, ctx: Context, check: Check) -> bool:
    log = ctx.logs / "install.log"
    ok = True
    if args.wheelhouse is None:
        check.record("wheelhouse", None, "no --wheelhouse: nothing installed, only checked")
    else:
        wheels = [p for p in sorted(args.wheelhouse.glob("*.whl")) if not NEVER_INSTALL.match(dist_of(p)[0])]
        probe = python(VERSIONS, *(f"{n}=={v}" for n, v in map(dist_of, wheels)))
        if probe.returncode != 0:
            return check.record("packages", False, f"could not read the installed versions: {probe.stderr[-300:]}")
        before = json.loads(probe.stdout.strip().splitlines()[-1])
        # pip's resolver, offline: installs what is missing and upgrades only what does not satisfy a requirement.
        pip_report = ctx.work / "pip-report.json"
        pip_report.unlink(missing_ok=True)
        code = 1 if ctx.rehearsal else run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(args.wheelhouse),
             "--disable-pip-version-check", "--report", str(pip_report), "-r", str(REQUIREMENTS)], log, ctx.env, 300)
        if code == 0:
            chosen = [(re.sub(r"[-_.]+", "-", r["metadata"]["name"]).lower(), r["metadata"]["version"])
                      for r in json.loads(pip_report.read_text())["install"]]
            where = "the interpreter"
        else:  # an interpreter that refuses: everything missing or older than pinned into the --target folder
            picked = [p for p in wheels if before[dist_of(p)[0]][1]]
            chosen = [dist_of(p) for p in picked]
            where = pip_install([str(p) for p in picked], ctx, log) if picked else "nowhere (all present)"
        upgraded = [f"{n} {before[n][0]} -> {v}" for n, v in chosen if before.get(n, [None])[0] is not None]
        ok = check.record("packages", bool(where), (
            f"{len(chosen)} of {len(wheels)} wheels from {args.wheelhouse} installed into {where}"
            + (f"; upgraded {', '.join(upgraded)}" if upgraded else "")) if where else f"pip failed (see {log.name})",
            installed=[n for n, _ in chosen], upgraded=upgraded)
    probe = python("import importlib, json, sys\nbad = {}\nfor m in sys.argv[1:]:\n    try:\n"
                   "        importlib.import_module(m)\n    except Exception as e:\n"
                   "        bad[m] = f'{type(e).__name__}: {e}'[:200]\nprint(json.dumps(bad))", *NEEDED, timeout=300)
    # The last line: importing deepspeed may print its own lines first.
    bad = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {
        "(probe)": probe.stderr[-300:]}
    ok &= check.record("imports", not bad, f"all of {len(NEEDED)} modules import" if not bad else
                       "; ".join(f"{m}: {e}" for m, e in bad.items()))
    # jsonargparse reads the config dataclasses' docstrings and types (docstring-parser, typeshed-client): the
    # whole launcher's argument parsing, through its CLI.
    code = run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "launch/presets/tiny.yaml"),
                "--print_config"], log, ctx.env, timeout=120)
    ok &= check.record("launcher_cli", code == 0, f"launch/train.py --print_config exited {code}")
    info = python("import torch; print(torch.__version__); print(torch.version.cuda); "
                  "print(''.join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else '')")
    lines = info.stdout.split("\n")
    check.record("torch", True, f"torch {lines[0]} (CUDA {lines[1]}) left as it is, never reinstalled",
                 version=lines[0], cuda=lines[1], arch=lines[2] if len(lines) > 2 else "")
    return ok


# ---- mamba-ssm: the source build, in the background or the foreground --------------------------------
def restrict_to_local_arch(setup_py: Path, arch: str) -> bool:
    """mamba-ssm's and causal-conv1d's setup.py compile ~10 GPU architectures; this one is what fits in the time.

    Drops every `-gencode arch=compute_XX,code=sm_XX` pair but the local one; leaves the file as it is
    (and returns False) when the local architecture is not among them."""
    text = setup_py.read_text()
    pair = re.compile(r'cc_flag\.append\("-gencode"\)(\s*)cc_flag\.append\("arch=compute_(\d+a?),code=sm_\d+a?"\)')
    if arch not in {m.group(2) for m in pair.finditer(text)}:
        return False
    setup_py.write_text(pair.sub(lambda m: m.group(0) if m.group(2) == arch else f"pass{m.group(1)}pass", text))
    return True


def build_command(args, ctx: Context) -> tuple[list[str], dict, str]:
    """The command that leaves a mamba-ssm wheel in <work>/mamba-build/dist, its environment, and the module
    it provides. A rehearsal's stand-in sleeps and writes a small wheel instead of compiling."""
    build = ctx.work / "mamba-build"
    dist = build / "dist"
    shutil.rmtree(build, ignore_errors=True)
    dist.mkdir(parents=True)
    if ctx.rehearsal:
        return ([sys.executable, str(Path(__file__).resolve()), "--stand-in-build", str(dist),
                 str(args.stand_in_seconds)], ctx.env, "mamba_ssm_standin")
    sdists = sorted(args.wheelhouse.glob("mamba_ssm-*.tar.gz")) + sorted(args.wheelhouse.glob("mamba-ssm-*.tar.gz"))
    if not sdists:
        raise FileNotFoundError(f"no mamba-ssm source distribution in {args.wheelhouse}")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(build / "src")
    source = next(p.parent for p in (build / "src").rglob("setup.py") if p.parent.parent == build / "src")
    arch = python("import torch; print(''.join(map(str, torch.cuda.get_device_capability())))").stdout.strip()
    if not restrict_to_local_arch(source / "setup.py", arch):
        (ctx.logs / "mamba-build.log").open("a").write(f"sm_{arch} is not in mamba-ssm's list: building all\n")
    # Leave cores to the stages that run beside the build.
    env = dict(ctx.env, MAX_JOBS=str(max(2, (os.cpu_count() or 8) - 4)), MAMBA_FORCE_BUILD="TRUE",
               TORCH_CUDA_ARCH_LIST=f"{arch[:-1]}.{arch[-1]}")
    return ([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-w", str(dist), str(source)], env, MAMBA_MODULE)


def start_background_build(args, ctx: Context, check: Check) -> bool:
    """Starts the build in its own session (it outlives this command) and returns at once."""
    state_file = ctx.work / "mamba-build.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if alive(state["pid"]) or Path(state["rc"]).is_file():
            return check.record("mamba_build", True, f"already started (pid {state['pid']}); not started again")
    if python(f"import {'mamba_ssm_standin' if ctx.rehearsal else MAMBA_MODULE}").returncode == 0:
        return check.record("mamba_build", True, "mamba-ssm is importable already: nothing to build")
    cmd, env, module = build_command(args, ctx)
    rc, log = ctx.work / "mamba-build.rc", ctx.logs / "mamba-build.log"
    rc.unlink(missing_ok=True)
    # sh writes the exit status when the build ends, whoever is still waiting for it then.
    wrapper = ["sh", "-c", 'log=$1 rc=$2; shift 2; "$@" >>"$log" 2>&1; echo $? >"$rc.tmp" && mv "$rc.tmp" "$rc"',
               "sh", str(log), str(rc), *cmd]
    proc = subprocess.Popen(wrapper, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state_file.write_text(json.dumps({"pid": proc.pid, "rc": str(rc), "module": module, "cmd": cmd,
                                      "started": time.time()}))
    return check.record("mamba_build", True, f"started in the background (session {proc.pid}): {shlex.join(cmd)[:160]}; "
                        f"log {log.name}", pid=proc.pid)


def stand_in_build(dist: Path, seconds: float) -> int:
    """The rehearsal's build: takes `seconds`, then leaves a wheel with an importable module."""
    time.sleep(seconds)
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_wheelhouse import stub_wheel

    stub_wheel(dist, "mamba-ssm-standin==0.0", {"mamba_ssm_standin/__init__.py": "BUILT = True\n"})
    return 0


def ensure_mamba(args, ctx: Context, check: Check, stage: str) -> bool | None:
    """True when mamba-ssm is importable (waiting for the background build, or building, within the deadline,
    and installing its wheel); None when the deadline or missing inputs leave it unbuilt; False on failure."""
    module = "mamba_ssm_standin" if ctx.rehearsal else MAMBA_MODULE
    if python(f"import {module}").returncode == 0:
        return True
    needs = NEEDS_CPU if ctx.rehearsal else NEEDS
    after = sum(needs[s] for s in ctx.report.get("stages", []) if s in MAMBA_STAGES)
    state_file = ctx.work / "mamba-build.json"
    log = ctx.logs / "mamba-build.log"
    t = time.monotonic()
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        rc = Path(state["rc"])
        while not rc.is_file() and alive(state["pid"]) and ctx.budget.left() > after:
            time.sleep(2)
        waited = time.monotonic() - t
        if not rc.is_file():
            if alive(state["pid"]):
                check.record("mamba_build", None, f"deadline: the background build (pid {state['pid']}) was "
                             f"still running after waiting {waited:.0f} s", waited=round(waited))
                return None
            return check.record("mamba_build", False, f"the background build (pid {state['pid']}) ended without an "
                                "exit status (killed?)")
        code = int(rc.read_text())
        took = rc.stat().st_mtime - state["started"]
        if not check.record("mamba_build", code == 0, f"background build exited {code} after {took:.0f} s; waited "
                            f"{waited:.0f} s for it here (log {log.name})", seconds=round(took), waited=round(waited)):
            return False
    elif args.wheelhouse is None and not ctx.rehearsal:
        check.record("mamba_build", None, "mamba-ssm is not importable and there is no --wheelhouse to build it from")
        return None
    else:
        if ctx.budget.left() - after < 60:
            check.record("mamba_build", None, "deadline: no time left to build mamba-ssm in the foreground")
            return None
        cmd, env, module = build_command(args, ctx)
        code = run(cmd, log, env, timeout=ctx.budget.left() - after)
        took = time.monotonic() - t
        if code == 124:
            check.record("mamba_build", None, f"deadline: the foreground build was stopped after {took:.0f} s")
            return None
        if not check.record("mamba_build", code == 0, f"built in the foreground in {took:.0f} s, exit {code}",
                            seconds=round(took)):
            return False
    wheels = sorted(str(p) for p in (ctx.work / "mamba-build/dist").glob("*.whl"))
    where = pip_install(wheels, ctx, log) if wheels else ""
    ok = bool(where) and python(f"import {module}").returncode == 0
    return check.record("mamba_install", ok, f"{', '.join(Path(w).name for w in wheels) or 'no wheel'} installed "
                        f"into {where or '(failed)'}; import {module}: {'ok' if ok else 'fails'}")


# ---- training drills through launch/train.py ---------------------------------------------------------
def prepare_data(ctx: Context) -> Path:
    data = ctx.work / "data"
    if not (data / "manifest.json").is_file():
        code = run([sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out_dir", str(data),
                    "--vocab_size", "2000", "--max_bytes", "3000000"], ctx.logs / "data.log", ctx.env, timeout=300)
        if code != 0:
            raise RuntimeError(f"data preparation exited {code} (see logs/data.log)")
    return data


def train(ctx: Context, name: str, data: Path, *extra: str, ds_config: str = "ds_configs/fp16_stable.json",
          fresh: bool = True) -> tuple[int, Path]:
    run_dir = ctx.work / "runs" / name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    preset = "launch/presets/tiny.yaml" if ctx.rehearsal else "launch/presets/small.yaml"
    rehearsal = ["--train.allow_cpu_fp16", "true"] if ctx.rehearsal else []
    sys.path.insert(0, str(ROOT))
    from pipeline.comm import free_port  # after the install stage: the pipeline's imports are there

    # The PyTorch Mamba path: mamba-ssm's atomicAdd backward is not bit-reproducible (see the module docstring).
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(ROOT / "launch/train.py"), "--deepspeed_config", str(ROOT / ds_config),
           "--config", str(ROOT / preset), "--model.vocab_size", "2000", "--model.mamba_backend", "torch",
           "--data.data_dir", str(data), "--data.sequence_length", "128", "--train.out_dir", str(run_dir),
           "--train.max_steps", str(DRILL_STEPS), "--train.micro_batch_size", "8",
           "--train.gradient_accumulation_steps", "2", "--train.log_interval", "1", "--train.eval_interval",
           str(DRILL_STEPS), "--train.eval_batches", "4", "--train.checkpoint_interval", str(STOP_AT),
           "--train.warmup_steps", "2", "--train.deterministic", "true", *rehearsal, *extra]
    return run(cmd, ctx.logs / f"{name}.log", ctx.env, timeout=420), run_dir


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["step"]: r for r in rows if r["kind"] == kind}


def scale_trajectory(steps, overflow_steps, initial, window, hysteresis) -> dict[int, tuple[float, int]]:
    """DeepSpeed's DynamicLossScaler rule with consecutive_hysteresis=true (the fp16_stable.json recipe)."""
    scale, left, last_overflow, trajectory = initial, hysteresis, -1, {}
    for i, step in enumerate(steps):
        if step in overflow_steps:
            scale, left = (max(scale / 2, 1), left) if left == 1 else (scale, left - 1)
            last_overflow = i
        else:
            left = hysteresis
            if i - last_overflow - 1 > 0 and (i - last_overflow - 1) % window == 0:
                scale *= 2
        trajectory[step] = (scale, left)
    return trajectory


DRILL_ARGS = ("--stability.drill_nan_loss", f"[{NAN_STEP}@*]", "--stability.drill_inf_grad_steps",
              f"[{','.join(map(str, INF_STEPS))}]", "--stability.drill_nan_fraction", "0.1")


def stage_drills(args, ctx: Context, check: Check) -> bool:
    data = prepare_data(ctx)
    code, run_dir = train(ctx, "drills", data, *DRILL_ARGS)
    if not check.record("run", code == 0, f"launch/train.py exited {code} (logs/drills.log)"):
        return False
    train_rows = records(run_dir, "train")
    quarantine = [json.loads(line) for line in (run_dir / "skipped_batches.jsonl").read_text().splitlines()]
    planned = [r for r in quarantine if r["step"] == NAN_STEP and r["attempt"] == 0 and r["reason"] == "nan"]
    ok = check.record("nan_loss", bool(planned) and sorted(train_rows) == list(range(1, DRILL_STEPS + 1)),
                      f"step {NAN_STEP}'s poisoned micro-batch skipped on every rank, quarantined "
                      f"({len(planned)} record), all {DRILL_STEPS} steps trained")
    random_skips = [r for r in quarantine if r["reason"] == "nan" and not (r["step"] == NAN_STEP and r["attempt"] == 0)]
    last = train_rows.get(DRILL_STEPS, {})
    trained = last.get("micro_batches_trained")
    ok &= check.record("nan_fraction", trained == DRILL_STEPS * 2 and last.get("skipped_nan") == len(planned) + len(random_skips),
                       f"{len(random_skips)} random NaN micro-batches skipped, {trained} trained "
                       f"(expected {DRILL_STEPS * 2}: every step keeps its full count)", skipped=len(random_skips))
    ds = json.loads((ROOT / "ds_configs/fp16_stable.json").read_text())["fp16"]
    expected = scale_trajectory(range(1, DRILL_STEPS + 1), set(INF_STEPS), 2.0 ** ds["initial_scale_power"],
                                ds["loss_scale_window"], ds["hysteresis"])
    got = {s: (r.get("loss_scale"), r.get("hysteresis")) for s, r in train_rows.items()}
    overflows = sorted(records(run_dir, "overflow"))
    ok &= check.record("inf_grad", got == expected and overflows == list(INF_STEPS),
                       f"overflow steps {overflows}, scale/hysteresis trajectory "
                       f"{'matches' if got == expected else 'differs from'} DeepSpeed's rule "
                       f"(after step {INF_STEPS[-1]}: {got.get(INF_STEPS[-1])}, expected {expected[INF_STEPS[-1]]})")
    finite = python("import sys, torch\nfrom pipeline.engine.checkpoint import load_for_inference\n"
                    "m, _, _ = load_for_inference(sys.argv[1])\n"
                    "bad = [n for n, p in m.named_parameters() if not torch.isfinite(p).all()]\n"
                    "print(len(bad)); sys.exit(1 if bad else 0)", str(run_dir))
    ok &= check.record("weights_finite", finite.returncode == 0,
                       f"non-finite parameter tensors after the drills: "
                       f"{(finite.stdout.strip().splitlines() or [finite.stderr[-300:]])[-1]}")
    return ok


def stage_resume(args, ctx: Context, check: Check) -> bool:
    data = prepare_data(ctx)
    reference = ctx.work / "runs" / "drills"
    if not (reference / "metrics.jsonl").is_file():
        code, reference = train(ctx, "drills", data, *DRILL_ARGS)
        if not check.record("reference", code == 0, f"uninterrupted run exited {code}"):
            return False
    code, run_dir = train(ctx, "stopped", data, *DRILL_ARGS, "--train.exit_after_steps", str(STOP_AT))
    if not check.record("stop", code == 0 and (run_dir / "checkpoints/latest").is_file(),
                        f"stopped after {STOP_AT} steps with a checkpoint (exit {code})"):
        return False
    code, run_dir = train(ctx, "stopped", data, *DRILL_ARGS, "--train.resume", "auto", fresh=False)
    expected = {s: r["loss"] for s, r in records(reference, "train").items()}
    got = {s: r["loss"] for s, r in records(run_dir, "train").items()}
    after = range(STOP_AT + 1, DRILL_STEPS + 1)
    diffs = [abs(got[s] - expected[s]) for s in after if s in got and s in expected]
    exact = code == 0 and len(diffs) == len(after) and max(diffs) == 0.0
    return check.record("bit_exact", exact, f"resumed run (exit {code}): losses of steps {after.start}-{DRILL_STEPS} "
                        f"{'equal' if exact else 'differ from'} the uninterrupted run's "
                        f"(max abs difference {max(diffs) if diffs else 'n/a'}; PyTorch Mamba path)")


# ---- model-level checks ----------------------------------------------------------------------------
def junit_counts(junit: Path) -> dict:
    suite = re.search(r'<testsuite [^>]*>', junit.read_text()) if junit.is_file() else None
    return {k: int(v) for k, v in re.findall(r'(tests|failures|errors|skipped)="(\d+)"', suite.group(0))} if suite else {}


def stage_kernels(args, ctx: Context, check: Check) -> bool:
    """The same tests CI runs in Triton's interpreter, here compiled for the GPU (the file picks the device:
    with a GPU it runs the CUDA cases and skips the interpreter ones). A rehearsal runs the fp16 cases only."""
    log, junit = ctx.logs / "kernels.log", ctx.work / "kernels.xml"
    junit.unlink(missing_ok=True)
    subset = ["-k", "fp16"] if ctx.rehearsal else []
    code = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                str(ROOT / "tests/test_kernels.py"), *subset], log, ctx.env, timeout=420)
    counts = junit_counts(junit)
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    bad = counts.get("failures", 0) + counts.get("errors", 0)
    return check.record("compiled_vs_pytorch", code == 0 and ran > 0,
                        f"{ran - bad} of {ran} {'interpreted' if ctx.rehearsal else 'compiled'}-kernel tests "
                        f"passed, {counts.get('skipped', 0)} skipped (exit {code}, logs/kernels.log)",
                        passed=ran - bad, ran=ran)


def stage_model(stage: str, args, ctx: Context, check: Check) -> bool:
    """parity, speed and speed-mamba: bench/gpu_model_check.py in a subprocess, its JSON merged as it grows."""
    if stage in MAMBA_STAGES:
        if not ensure_mamba(args, ctx, check, stage):  # recorded there: failed, or skipped for the deadline
            return False
        if ctx.rehearsal:
            return check.record("result", None, "rehearsal: mamba-ssm's kernels need CUDA (the wait and the "
                                "install of the stand-in build are what a rehearsal checks)")
    result_file = ctx.work / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    log = ctx.logs / f"{stage}.log"
    if stage == "parity":
        extra, timeout = ["--stage", "parity", "--widths", "128,640"], 300
    elif stage == "speed":
        extra, timeout = ["--stage", "speed", "--backends", "torch"], 420
    else:  # the loop-overhead part trains through launch/train.py on the drills' corpus
        extra, timeout = ["--stage", "speed", "--backends", "cuda", "--data", str(prepare_data(ctx)),
                          "--out", str(ctx.work / "runs" / "speed")], 420
    if ctx.rehearsal:
        extra = ["--stage", "speed", "--rehearse-on-cpu", "--vocab", "2000"]
    seen = [0.0]

    def merge() -> None:  # the speed table row by row into gpu_check.json
        if result_file.is_file() and result_file.stat().st_mtime != seen[0]:
            seen[0] = result_file.stat().st_mtime
            ctx.report[stage]["results"] = json.loads(result_file.read_text())
            ctx.save()

    start = log.stat().st_size if log.is_file() else 0
    code = run([sys.executable, str(ROOT / "bench/gpu_model_check.py"), "--json", str(result_file), *extra], log,
               ctx.env, timeout=timeout, tick=merge)
    merge()
    results = ctx.report[stage].get("results", {})
    if stage == "parity":
        rows = results.get("parity", [])
        worst = max((max(r["rel_out"], r["rel_grad"]) for r in rows), default=float("nan"))
        return check.record("mamba_layers", code == 0 and bool(rows) and all(r["ok"] for r in rows),
                            f"{len(rows)} layer comparisons, worst relative error {worst:.2e} (exit {code})")
    with open(log) as f:  # the table, the targets and the breakdown, as gpu_model_check.py printed them
        f.seek(start)
        ctx.say(f.read().rstrip())
    return record_speed(check, results.get("speed") or {}, code, log, judge=stage == "speed-mamba",
                        loop=stage == "speed-mamba")


def record_speed(check: Check, res: dict, code: int, log: Path, judge: bool = True, loop: bool = True) -> bool:
    """One check per line of gpu_model_check.py's speed results: the table, each target, the breakdown, the loop.
    judge=False shows the targets without judging them (the pure-PyTorch path, a CPU rehearsal)."""
    rows = res.get("rows", [])
    cells = "; ".join(f"T={r['T']}: " + ", ".join(f"{k[6:]} {v:.2f}x" for k, v in r.items() if k.startswith("ratio_"))
                      for r in rows)
    if not check.record("table", code == 0 and bool(rows), f"hybrid / Transformer tokens/s: {cells or 'no rows'} "
                        f"(exit {code}, logs/{log.name})"):
        return False
    judged = judge and not res.get("rehearsal")
    ok = bool(res.get("targets")) or check.record("targets", False, "the speed results have no targets")
    for t in res.get("targets", []):
        value = f"{t['value']:.2f}x" if t["name"].startswith("ratio") else f"{t['value']:.1%}"
        ok &= check.record(t["name"], t["pass"] if judged else None, f"{value} (target {t['target']})"
                           + ("" if judged or res.get("rehearsal") else "; judged with mamba-ssm in speed-mamba"),
                           value=t["value"])
    parts = (res.get("breakdown") or {}).get("seconds", {})
    top = sorted((k for k in parts if k not in ("step", "other")), key=parts.get, reverse=True)[:3]
    ok &= check.record("breakdown", bool(parts), "largest shares of one step: " + ", ".join(
        f"{k} {parts[k] / parts['step']:.0%}" for k in top) if parts else "missing")
    if not loop:
        return ok
    result = res.get("loop")
    if result is None:
        return check.record("loop_overhead", False, "launch/train.py was not run against the bare step") and ok
    ok &= check.record("loop_overhead", result["ok"] if judged else None,
                       f"launch/train.py {result['loop_tok_s']:.0f} tok/s vs bare step {result['bare_tok_s']:.0f} "
                       f"tok/s: {result['overhead']:+.1%} per step (target < 10 %)", value=result["overhead"])
    return ok


# ---- the plan ----------------------------------------------------------------------------------------
def run_stages(args, ctx: Context, stages: list[str]) -> bool:
    """Each stage in order, if what is left of the deadline covers its need; gpu_check.json after each."""
    needs = NEEDS_CPU if ctx.rehearsal else NEEDS
    ok = True
    for stage in stages:
        check = Check(ctx.report, stage)
        left = ctx.budget.left()
        if left < needs[stage]:
            check.entries["status"] = "skipped: deadline"
            check.record("deadline", None, f"deadline: {left:.0f} s left, the stage needs about "
                         f"{needs[stage]} s")
            ok = False
            ctx.save()
            continue
        t = time.monotonic()
        try:
            passed = STAGE_FUNCTIONS[stage](args, ctx, check)
        except Exception as err:  # one stage's crash is reported, and the others still run
            passed = check.record("error", False, f"{type(err).__name__}: {err}")
        check.entries["seconds"] = round(time.monotonic() - t, 1)
        statuses = {c["status"] for c in check.entries["checks"].values()}
        check.entries["status"] = "ok" if passed else ("FAIL" if "FAIL" in statuses or not statuses else "skipped")
        ok &= bool(passed)
        if stage == "install" and args.build_mamba_background:
            start_background_build(args, ctx, check)
        ctx.save()
    return ok


STAGE_FUNCTIONS = {
    "processes": lambda args, ctx, check: stage_processes(ctx, check),
    "install": stage_install, "kernels": stage_kernels, "drills": stage_drills, "resume": stage_resume,
    **{s: (lambda s: lambda args, ctx, check: stage_model(s, args, ctx, check))(s) for s in ("speed", *MAMBA_STAGES)},
}


def rehearse(args) -> int:
    """Both calls of the one-lease recipe on a CPU, against one deadline: call 1 (the process-group kill, install,
    kernels, drills, resume, speed, a stand-in mamba build in the background) with two thirds of it, call 2
    (parity, speed-mamba: waits for the build) with the rest; then the output layout of both."""
    t0 = time.monotonic()
    first = round(args.deadline * 2 / 3)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--rehearse-on-cpu", "--call", "--work", str(work)]
    # The stand-in build outlasts call 1 by a little: call 2 has to find it still running and wait.
    call1 = me + ["--out", str(args.out / "call1"), "--deadline", str(first), "--build-mamba-background",
                  "--stand-in-seconds", str(first + 15), "--only", "processes,install,kernels,drills,resume,speed"]
    print(f"gpu_check: rehearsal call 1: {shlex.join(call1[1:])}", flush=True)
    rc1 = subprocess.run(call1, cwd=ROOT).returncode
    t1 = time.monotonic() - t0
    state = json.loads((work / "mamba-build.json").read_text()) if (work / "mamba-build.json").is_file() else {}
    survived = bool(state) and alive(state["pid"])
    print(f"gpu_check: rehearsal: call 1 exited {rc1} after {t1:.0f} s (deadline {first} s); the background build "
          f"(pid {state.get('pid')}) {'is still running' if survived else 'is NOT running'} after it", flush=True)
    call2 = me + ["--out", str(args.out / "call2"), "--deadline", str(max(1, round(args.deadline - t1))),
                  "--only", "parity,speed-mamba"]
    print(f"gpu_check: rehearsal call 2: {shlex.join(call2[1:])}", flush=True)
    rc2 = subprocess.run(call2, cwd=ROOT).returncode
    total = time.monotonic() - t0
    layout = {d.name: sorted(p.name for p in d.iterdir()) for d in (args.out / "call1", args.out / "call2")}
    expected = ["gpu_check.json", "gpu_check.log", "logs.tgz"]
    layout_ok = all(files == expected for files in layout.values())
    reports = {n: json.loads((args.out / n / "gpu_check.json").read_text()) for n in layout}
    waited = reports["call2"].get("parity", {}).get("checks", {}).get("mamba_install", {}).get("status") == "ok"
    print("gpu_check: rehearsal summary (stage: status, seconds; the checks that did not pass):")
    for name, report in reports.items():
        for stage in report.get("stages", []):
            entry = report.get(stage, {})
            print(f"  {name} {stage}: {entry.get('status')}" + (f", {entry['seconds']:.0f} s" if "seconds" in entry else ""))
            for check, value in entry.get("checks", {}).items():
                if value["status"] != "ok":
                    print(f"      {check}: {value['status']}: {value['detail'][:150]}")
    print(f"  output layout: {layout} ({'ok' if layout_ok else 'WRONG'})")
    print(f"  background build survived call 1: {'yes' if survived else 'NO'}; call 2 waited for it and installed "
          f"its wheel: {'yes' if waited else 'NO'}")
    print(f"  total {total:.0f} s against a deadline of {args.deadline} s: {'ok' if total <= args.deadline else 'OVER'}")
    return 0 if layout_ok and survived and waited and total <= args.deadline + 5 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--wheelhouse", type=Path, help="folder made by bench/gpu_wheelhouse.sh (offline install)")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages among {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/gpu_check",
                        help="gpu_check.json, gpu_check.log and logs.tgz, nothing else")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check",
                        help="data, runs, builds, installs and the stage logs; kept between calls (the background "
                             "build is found there)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole command")
    parser.add_argument("--build-mamba-background", action="store_true",
                        help="after install, start mamba-ssm's build for this GPU in its own session and go on")
    parser.add_argument("--dry-run", action="store_true", help="print the stages that would run and exit 0")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="developers: both calls of the recipe on a CPU within --deadline (emulated fp16, the "
                             "tiny preset, a stand-in mamba build; the speed targets shown, not judged)")
    parser.add_argument("--call", action="store_true", help=argparse.SUPPRESS)  # one call of a rehearsal
    parser.add_argument("--stand-in-seconds", type=float, default=30, help=argparse.SUPPRESS)
    parser.add_argument("--stand-in-build", nargs=2, metavar=("DIST", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stand_in_build:
        return stand_in_build(Path(args.stand_in_build[0]), float(args.stand_in_build[1]))
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    known = STAGES + (("processes",) if args.rehearse_on_cpu else ())
    unknown = [s for s in stages if s not in known]
    if unknown:
        print(f"gpu_check: error: unknown stage(s) {', '.join(unknown)}; choose among {', '.join(STAGES)}")
        return 2
    stages = [s for s in ("processes",) + STAGES if s in stages]  # the order of value, whatever --only said
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        print(f"gpu_check: error: --wheelhouse {args.wheelhouse} is not a folder")
        return 2
    out, work = args.out.resolve(), args.work.resolve()
    if work == out or out in work.parents:
        print(f"gpu_check: error: --work {work} must lie outside --out {out} (only the results go there)")
        return 2
    if args.dry_run:
        for stage in stages:
            need = (NEEDS_CPU if args.rehearse_on_cpu else NEEDS)[stage]
            print(f"gpu_check: would run {stage} (needs about {need} s): {PLAN.get(stage, 'process-group kill')}")
        print(f"gpu_check: deadline {args.deadline:.0f} s; results would go to {out} (gpu_check.json, gpu_check.log, "
              f"logs.tgz), work files to {work}")
        return 0
    if args.rehearse_on_cpu and not args.call:
        return rehearse(args)
    if not args.rehearse_on_cpu:
        gpu = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                             capture_output=True)
        if gpu.returncode != 0:
            print("gpu_check: error: no CUDA GPU is visible here (torch.cuda.is_available() is false or torch is "
                  "missing); run it on a GPU machine, or --dry-run to see the plan")
            return 2
    global CTX
    for name in ("gpu_check.json", "gpu_check.log", "logs.tgz"):
        (out / name).unlink(missing_ok=True)
    CTX = ctx = Context(out, work, Budget(args.deadline), rehearsal=args.rehearse_on_cpu)
    for old in ctx.logs.glob("*.log"):
        if old.name != "mamba-build.log":  # a build from an earlier call may still be writing it
            old.unlink()
    ctx.report.update({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "deadline": args.deadline, "stages": stages,
                       "command": shlex.join(sys.argv), "work": str(work)})
    t0 = time.monotonic()
    if args.build_mamba_background and "install" not in stages:
        start_background_build(args, ctx, Check(ctx.report, "build"))
    ok = run_stages(args, ctx, stages)
    ctx.report["seconds"], ctx.report["ok"] = round(time.monotonic() - t0, 1), ok
    ctx.save()
    ctx.say(f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED OR WERE SKIPPED'} in "
            f"{ctx.report['seconds']:.0f} s (deadline {args.deadline:.0f} s); details in {out / 'gpu_check.json'}")
    ctx.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
