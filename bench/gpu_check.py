"""The GPU check, offline: install what the machine lacks from a wheelhouse, then check the pipeline on the GPU.

    bash bench/gpu_check.sh --wheelhouse /path/to/wheels --out outputs/gpu_check
    bash bench/gpu_check.sh --only drills,resume        # a subset of the stages
    bash bench/gpu_check.sh --dry-run                   # print the plan; any machine, exits 0

Stages (in order; `--only` picks some):
  install  pip-installs every wheel of the wheelhouse whose package is missing (`--no-index --no-deps`;
           never torch, triton or nvidia-*), and builds mamba-ssm from its source distribution for this
           GPU's architecture only when it is not importable (causal-conv1d only with --causal-conv1d)
  drills   through launch/train.py with ds_configs/fp16_stable.json on one GPU: NaN losses on chosen
           steps (`stability.drill_nan_loss`) and on a random share of micro-batches
           (`stability.drill_nan_fraction`), and infinite gradients (`stability.drill_inf_grad_steps`) with
           the loss-scale trajectory checked against DeepSpeed's rule; all weights finite at the end
  resume   the same run stopped after a checkpoint and resumed with --train.resume auto: the losses after
           the stop equal the uninterrupted run's bit for bit (deterministic kernels)
  kernels  tests/test_kernels.py with the Triton kernels compiled for this GPU (LIF, liquid, diagonal scan):
           values and gradients against the PyTorch path, fp32 and bf16 (CI runs them in Triton's interpreter)
  parity   every Mamba layer through mamba-ssm's kernels vs the pure-PyTorch path, and a CPU checkpoint on CUDA
  speed    bench/gpu_model_check.py --stage speed (printed here, numbers in gpu_check.json): one training step
           (bf16 autocast, fused AdamW) of the production preset at hidden 640 x 8 layers, vocab 32000, with the
           mamba-ssm kernels and in pure PyTorch, against a same-size pre-norm SDPA Transformer at seq x batch
           256x32, 1024x16, 4096x4: tokens/s, MFU (datasheet and measured bf16 peak), ratio; PASS/FAIL of
           >= 0.5x and >= 15 % MFU at seq 1024 and <= 25 % slower per token at 4096; where one step goes per
           component; launch/train.py (ds_configs/bf16.json) steady-state tokens/s against the bare step (< 10 %)

Writes `<out>/gpu_check.json` and one log per stage; prints one summary line per check.
Exit status: 0 all checks passed, 1 a check failed, 2 no GPU (or bad arguments).
Only the standard library is imported before the install stage has run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = {
    "install": "install missing packages from --wheelhouse (never torch); build mamba-ssm for this GPU if absent",
    "drills": "fp16 NaN-loss, NaN-fraction and inf-gradient drills through launch/train.py; loss-scale trajectory",
    "resume": "stop after a checkpoint, resume with --train.resume auto: losses bit-exact vs the uninterrupted run",
    "kernels": "the Triton kernels (LIF, liquid, diagonal scan) compiled for this GPU: tests/test_kernels.py "
               "against the PyTorch path, values and gradients",
    "parity": "every Mamba layer, mamba-ssm kernels vs the PyTorch path; a CPU checkpoint on CUDA",
    "speed": "tokens/s and MFU of the hybrid (both Mamba paths) vs a same-size Transformer, targets, per-component "
             "breakdown, launch/train.py vs the bare step",
}
STAGES = tuple(PLAN)
# What the pipeline imports beyond what a CUDA machine with torch usually has (module -> distribution).
NEEDED = {"deepspeed": "deepspeed", "jsonargparse": "jsonargparse", "sentencepiece": "sentencepiece",
          "pyarrow": "pyarrow", "yaml": "PyYAML", "hjson": "hjson", "pydantic": "pydantic",
          "docstring_parser": "docstring-parser", "typeshed_client": "typeshed-client", "einops": "einops",
          "msgpack": "msgpack", "cpuinfo": "py-cpuinfo", "psutil": "psutil", "ninja": "ninja"}
NEVER_INSTALL = re.compile(r"^(torch|triton|nvidia[-_].*)$", re.I)
DRILL_STEPS, STOP_AT = 12, 6
NAN_STEP, INF_STEPS = 3, (5, 6)


class Check:
    """One stage's results: named checks with ok/detail, written to gpu_check.json."""

    def __init__(self, report: dict, stage: str):
        self.entries = report.setdefault(stage, {"checks": {}})
        self.stage = stage

    def record(self, name: str, ok: bool | None, detail: str, **values) -> bool:
        status = "ok" if ok else ("skipped" if ok is None else "FAIL")
        self.entries["checks"][name] = {"status": status, "detail": detail, **values}
        print(f"gpu_check: {self.stage}.{name}: {status}: {detail}", flush=True)
        return ok is not False


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 600) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return 124


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


# ---- install ---------------------------------------------------------------------------------------
def wheel_name(path: Path) -> str:
    """Distribution name of a wheel or sdist file, normalised (PEP 503)."""
    stem = path.name[:-len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem
    return re.sub(r"[-_.]+", "-", stem.split("-")[0]).lower()


def pip_install(args: list[str], log: Path, env: dict, target: Path) -> bool:
    """pip into this interpreter; an externally managed one gets a --target folder on PYTHONPATH instead."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    if run(base + args, log, env, timeout=900) == 0:
        return True
    target.mkdir(parents=True, exist_ok=True)
    return run(base + ["--target", str(target)] + args, log, env, timeout=900) == 0


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


def build_from_sdist(name: str, wheelhouse: Path, work: Path, log: Path, env: dict, target: Path, arch: str,
                     timeout: int) -> str:
    sdists = sorted(wheelhouse.glob(f"{name.replace('-', '_')}-*.tar.gz")) + sorted(wheelhouse.glob(f"{name}-*.tar.gz"))
    if not sdists:
        return f"no {name} source distribution in {wheelhouse}"
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(work)
    source = next(p.parent for p in work.rglob("setup.py") if p.parent.parent == work)
    if not restrict_to_local_arch(source / "setup.py", arch):
        log.open("a").write(f"sm_{arch} is not in {name}'s list of architectures: building all of them\n")
    build_env = dict(env, MAX_JOBS=str(os.cpu_count() or 4), MAMBA_FORCE_BUILD="TRUE",
                     CAUSAL_CONV1D_FORCE_BUILD="TRUE", TORCH_CUDA_ARCH_LIST=f"{arch[:-1]}.{arch[-1]}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", str(source)]
    if run(cmd, log, build_env, timeout=timeout) != 0 and run(cmd + ["--target", str(target)], log, build_env,
                                                             timeout=timeout) != 0:
        return f"{name} did not build from {sdists[-1].name} (see {log})"
    return ""


def stage_install(args, out: Path, report: dict, env: dict) -> bool:
    check = Check(report, "install")
    log = out / "install.log"
    target = out / "pydeps"
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    missing = [dist for module, dist in NEEDED.items() if not importable(module)]
    ok = True
    if missing:
        if args.wheelhouse is None:
            return check.record("packages", False, f"missing {', '.join(missing)} and no --wheelhouse given")
        wheels = [p for p in sorted(args.wheelhouse.glob("*.whl")) if not NEVER_INSTALL.match(wheel_name(p))]
        wanted = {re.sub(r"[-_.]+", "-", d).lower() for d in missing}
        # Every wheel of the wheelhouse that is not installed yet: the missing packages' own dependencies too.
        chosen = [str(p) for p in wheels if wheel_name(p) in wanted or not installed(wheel_name(p))]
        ok = pip_install(chosen, log, env, target) if chosen else False
        still = [m for m in NEEDED if not importable_with(m, env)]
        ok = check.record("packages", ok and not still,
                          f"installed {len(chosen)} wheels from {args.wheelhouse}" +
                          (f"; still missing {', '.join(still)}" if still else ""))
    else:
        check.record("packages", True, "everything the pipeline imports is already installed")
    torch_info = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__); "
                                 "print(''.join(map(str, torch.cuda.get_device_capability())))"],
                                capture_output=True, text=True).stdout.split()
    check.record("torch", True, f"torch {torch_info[0]} left as it is (never reinstalled)", version=torch_info[0])
    arch = torch_info[1]
    for name, module, wanted in (("causal-conv1d", "causal_conv1d", args.causal_conv1d), ("mamba-ssm", "mamba_ssm", True)):
        if importable_with(module, env):
            check.record(name, True, "already importable")
            continue
        if not wanted:
            check.record(name, None, "not built (optional; --causal-conv1d builds it)")
            continue
        if args.wheelhouse is None:
            check.record(name, None, "not importable and no --wheelhouse: the Mamba layers use the PyTorch path")
            continue
        t = time.time()
        error = build_from_sdist(name, args.wheelhouse, out / "build" / name, log, env, target, arch,
                                 timeout=args.build_timeout)
        seconds = round(time.time() - t)
        built = not error and importable_with(module, env)
        # Without mamba-ssm training still runs (pure PyTorch); only the parity stage has nothing to compare.
        check.record(name, True if built else None,
                     f"built for sm_{arch} in {seconds} s" if built else f"{error or 'built but not importable'}; "
                     "the Mamba layers use the PyTorch path", seconds=seconds)
    return ok


def installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def importable_with(module: str, env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, env=env).returncode == 0


# ---- training drills through launch/train.py ---------------------------------------------------------
def prepare_data(out: Path, env: dict) -> Path:
    data = out / "data"
    if not (data / "manifest.json").is_file():
        code = run([sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out_dir", str(data),
                    "--vocab_size", "2000", "--max_bytes", "3000000"], out / "data.log", env)
        if code != 0:
            raise RuntimeError(f"data preparation failed (see {out / 'data.log'})")
    return data


# Developers rehearse the drill, resume and speed stages on a CPU (emulated fp16, the tiny preset): --rehearse-on-cpu.
REHEARSAL: list[str] = []


def train(out: Path, name: str, data: Path, env: dict, *extra: str, ds_config: str = "ds_configs/fp16_stable.json",
          fresh: bool = True) -> tuple[int, Path]:
    run_dir = out / "runs" / name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    preset = "launch/presets/tiny.yaml" if REHEARSAL else "launch/presets/small.yaml"
    sys.path.insert(0, str(ROOT))
    from pipeline.comm import free_port  # after the install stage: the pipeline's imports are there

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(ROOT / "launch/train.py"), "--deepspeed_config", str(ROOT / ds_config),
           "--config", str(ROOT / preset), "--model.vocab_size", "2000",
           "--data.data_dir", str(data), "--data.sequence_length", "128", "--train.out_dir", str(run_dir),
           "--train.max_steps", str(DRILL_STEPS), "--train.micro_batch_size", "8",
           "--train.gradient_accumulation_steps", "2", "--train.log_interval", "1", "--train.eval_interval",
           str(DRILL_STEPS), "--train.eval_batches", "4", "--train.checkpoint_interval", str(STOP_AT),
           "--train.warmup_steps", "2", "--train.deterministic", "true", *REHEARSAL, *extra]
    return run(cmd, out / f"{name}.log", env, timeout=420), run_dir


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


def stage_drills(args, out: Path, report: dict, env: dict) -> bool:
    check = Check(report, "drills")
    data = prepare_data(out, env)
    code, run_dir = train(out, "drills", data, env, *DRILL_ARGS)
    if not check.record("run", code == 0, f"launch/train.py exited {code} (log {out / 'drills.log'})"):
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
    finite = subprocess.run([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, sys.argv[2]);"
        "from pipeline.engine.checkpoint import load_for_inference;"
        "m, _, _ = load_for_inference(sys.argv[1]);"
        "bad = [n for n, p in m.named_parameters() if not torch.isfinite(p).all()];"
        "print(len(bad)); sys.exit(1 if bad else 0)"), str(run_dir), str(ROOT)], capture_output=True, text=True,
        env=env, cwd=ROOT)
    ok &= check.record("weights_finite", finite.returncode == 0,
                       f"non-finite parameter tensors after the drills: "
                       f"{(finite.stdout.strip().splitlines() or [finite.stderr[-300:]])[-1]}")
    return ok


def stage_resume(args, out: Path, report: dict, env: dict) -> bool:
    check = Check(report, "resume")
    data = prepare_data(out, env)
    reference = out / "runs" / "drills"
    if not (reference / "metrics.jsonl").is_file():
        code, reference = train(out, "drills", data, env, *DRILL_ARGS)
        if not check.record("reference", code == 0, f"uninterrupted run exited {code}"):
            return False
    code, run_dir = train(out, "stopped", data, env, *DRILL_ARGS, "--train.exit_after_steps", str(STOP_AT))
    if not check.record("stop", code == 0 and (run_dir / "checkpoints/latest").is_file(),
                        f"stopped after {STOP_AT} steps with a checkpoint (exit {code})"):
        return False
    code, run_dir = train(out, "stopped", data, env, *DRILL_ARGS, "--train.resume", "auto", fresh=False)
    expected = {s: r["loss"] for s, r in records(reference, "train").items()}
    got = {s: r["loss"] for s, r in records(run_dir, "train").items()}
    after = range(STOP_AT + 1, DRILL_STEPS + 1)
    diffs = [abs(got[s] - expected[s]) for s in after if s in got and s in expected]
    exact = code == 0 and len(diffs) == len(after) and max(diffs) == 0.0
    return check.record("bit_exact", exact, f"resumed run (exit {code}): losses of steps {after.start}-{DRILL_STEPS} "
                        f"{'equal' if exact else 'differ from'} the uninterrupted run's "
                        f"(max abs difference {max(diffs) if diffs else 'n/a'})")


# ---- model-level checks ----------------------------------------------------------------------------
def stage_kernels(args, out: Path, report: dict, env: dict) -> bool:
    """The same tests CI runs in Triton's interpreter, here compiled for the GPU (the file picks the
    device: with a GPU it runs the CUDA cases and skips the interpreter ones)."""
    check = Check(report, "kernels")
    if not importable("triton"):
        return check.record("triton", False, "triton is not importable: the model would fall back to tensor ops")
    log = out / "kernels.log"
    junit = out / "kernels.xml"
    code = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                str(ROOT / "tests/test_kernels.py")], log, env, timeout=420)
    counts = {}
    if junit.is_file():
        suite = re.search(r'<testsuite [^>]*>', junit.read_text())
        if suite:
            counts = {k: int(v) for k, v in re.findall(r'(tests|failures|errors|skipped)="(\d+)"', suite.group(0))}
    ran = counts.get("tests", 0) - counts.get("skipped", 0)
    bad = counts.get("failures", 0) + counts.get("errors", 0)
    return check.record("compiled_vs_pytorch", code == 0 and ran > 0,
                        f"{ran - bad} of {ran} compiled-kernel tests passed, {counts.get('skipped', 0)} skipped "
                        f"(exit {code}, log {log})", passed=ran - bad, ran=ran)


def stage_model(stage: str, args, out: Path, report: dict, env: dict) -> bool:
    check = Check(report, stage)
    result_file = out / f"{stage}.json"
    result_file.unlink(missing_ok=True)
    log = out / f"{stage}.log"
    if stage == "parity":
        extra, timeout = ["--widths", "128,640"], 420
    else:
        # The loop-overhead part trains through launch/train.py on the drills' corpus.
        extra, timeout = ["--data", str(prepare_data(out, env)), "--out", str(out / "runs" / "speed")], 600
        if REHEARSAL:
            extra += ["--rehearse-on-cpu", "--vocab", "2000"]
    start = log.stat().st_size if log.is_file() else 0
    code = run([sys.executable, str(ROOT / "bench/gpu_model_check.py"), "--stage", stage, "--json", str(result_file),
                *extra], log, env, timeout=timeout)
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}
    report[stage]["results"] = results
    if stage == "parity":
        rows = results.get("parity", [])
        if code == 0 and not rows:
            return check.record("mamba_layers", None, "mamba-ssm is not importable: nothing to compare")
        worst = max((max(r["rel_out"], r["rel_grad"]) for r in rows), default=float("nan"))
        return check.record("mamba_layers", code == 0 and all(r["ok"] for r in rows),
                            f"{len(rows)} layer comparisons, worst relative error {worst:.2e} (exit {code})")
    with open(log) as f:  # the table, the targets and the breakdown, as gpu_model_check.py printed them
        f.seek(start)
        print(f.read().rstrip(), flush=True)
    return record_speed(check, results.get("speed") or {}, code, log)


def record_speed(check: Check, res: dict, code: int, log: Path) -> bool:
    """One check per line of gpu_model_check.py's speed results: the table, each target, the breakdown, the loop."""
    rows = res.get("rows", [])
    cells = "; ".join(f"T={r['T']}: " + ", ".join(f"{k[6:]} {v:.2f}x" for k, v in r.items() if k.startswith("ratio_"))
                      for r in rows)
    if not check.record("table", code == 0 and bool(rows), f"hybrid / Transformer tokens/s: {cells or 'no rows'} "
                        f"(exit {code}, log {log})"):
        return False
    # A CPU rehearsal shows the GPU's targets without judging them.
    judged = not res.get("rehearsal")
    ok = bool(res.get("targets")) or check.record("targets", False, "the speed results have no targets")
    for t in res.get("targets", []):
        value = f"{t['value']:.2f}x" if t["name"].startswith("ratio") else f"{t['value']:.1%}"
        ok &= check.record(t["name"], t["pass"] if judged else None, f"{value} (target {t['target']})",
                           value=t["value"])
    parts = (res.get("breakdown") or {}).get("seconds", {})
    top = sorted((k for k in parts if k not in ("step", "other")), key=parts.get, reverse=True)[:3]
    ok &= check.record("breakdown", bool(parts), "largest shares of one step: " + ", ".join(
        f"{k} {parts[k] / parts['step']:.0%}" for k in top) if parts else "missing")
    loop = res.get("loop")
    if loop is None:
        return check.record("loop_overhead", False, "launch/train.py was not run against the bare step") and ok
    ok &= check.record("loop_overhead", loop["ok"] if judged else None,
                       f"launch/train.py {loop['loop_tok_s']:.0f} tok/s vs bare step {loop['bare_tok_s']:.0f} tok/s: "
                       f"{loop['overhead']:+.1%} per step (target < 10 %)", value=loop["overhead"])
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--wheelhouse", type=Path, help="folder of wheels and source distributions (offline install)")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages among {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/gpu_check", help="gpu_check.json and logs go here")
    parser.add_argument("--dry-run", action="store_true", help="print the stages that would run and exit 0")
    parser.add_argument("--causal-conv1d", action="store_true", help="also build causal-conv1d when it is absent")
    parser.add_argument("--build-timeout", type=int, default=300, help="seconds allowed for building mamba-ssm")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="developers: run the drills, resume and speed stages on a CPU (emulated fp16 and the "
                             "tiny preset; the speed targets are shown, not judged)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"gpu_check: error: unknown stage(s) {', '.join(unknown)}; choose among {', '.join(STAGES)}")
        return 2
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        print(f"gpu_check: error: --wheelhouse {args.wheelhouse} is not a folder")
        return 2
    if args.dry_run:
        for stage in stages:
            print(f"gpu_check: would run {stage}: {PLAN[stage]}")
        print(f"gpu_check: results would go to {args.out / 'gpu_check.json'}")
        return 0
    gpu = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                         capture_output=True)
    if args.rehearse_on_cpu:
        REHEARSAL.extend(["--train.allow_cpu_fp16", "true"])
        stages = [s for s in stages if s in ("drills", "resume", "speed")]
    elif gpu.returncode != 0:
        print("gpu_check: error: no CUDA GPU is visible here (torch.cuda.is_available() is false or torch is "
              "missing); run it on a GPU machine, or --dry-run to see the plan")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": stages}
    ok, t0 = True, time.time()
    for stage in stages:
        t = time.time()
        report.setdefault(stage, {"checks": {}})
        try:
            if stage == "install":
                passed = stage_install(args, args.out, report, env)
            elif stage == "drills":
                passed = stage_drills(args, args.out, report, env)
            elif stage == "resume":
                passed = stage_resume(args, args.out, report, env)
            elif stage == "kernels":
                passed = stage_kernels(args, args.out, report, env)
            else:
                passed = stage_model(stage, args, args.out, report, env)
        except Exception as err:  # one stage's crash is reported, and the others still run
            passed = Check(report, stage).record("error", False, f"{type(err).__name__}: {err}")
        report[stage]["seconds"] = round(time.time() - t, 1)
        ok &= passed
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    report["seconds"], report["ok"] = round(time.time() - t0, 1), ok
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {report['seconds']:.0f} s; "
          f"details in {args.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
