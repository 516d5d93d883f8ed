"""Fill an offline wheelhouse for bench/gpu_check.sh, on a machine with internet, for a GPU machine without it.

    bash bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]          # PYTHON_VERSION of the GPU machine, default 3.12
    PYTHON=/path/to/python bash bench/gpu_wheelhouse.sh DIR 3.12

What it builds with: the Python in $PYTHON (default .venv/bin/python, else python3). That Python needs torch
(deepspeed's and mamba-ssm's setup.py import it), setuptools >= 70.1 or `wheel` (to build the deepspeed wheel)
and pip >= 23.1 (`--dry-run --report` for another platform); it is checked first, with one line naming what is
missing. It needs the package index (internet or a mirror pip is configured for).

What DIR holds afterwards:
* a deepspeed wheel built without ops (DS_BUILD_OPS=0: pure Python; the GPU machine JIT-builds ops it uses);
* every other wheel of the full dependency closure of bench/gpu_requirements.txt for CPython PYTHON_VERSION on
  manylinux x86_64, as pip's resolver pins it (`pip install --dry-run --report`), so pydantic and pydantic-core,
  typeshed-client and what it needs, typing-extensions etc. come in versions made for each other;
* the source distributions of mamba-ssm and causal-conv1d (compiled on the GPU machine for its own GPU);
* wheelhouse.json: the pins, the target Python and platform, the Python that built it.
Never torch, triton or numpy: the GPU machine ships them (PROVIDED below). The resolver is told they are present
through stub wheels with a `+provided` local version kept outside DIR, so their own dependency trees (CUDA
libraries, sympy, ...) stay out of DIR while what needs them still resolves.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench/gpu_requirements.txt"
# The lent GPU machine's own versions (docs/GPU_CHECK.md, "The machine"): present, never fetched nor replaced.
PROVIDED = ("torch==2.11.0", "triton==3.6.0", "numpy==2.5.2")
# Shipped there too, and needed, but required by nothing in the closure, so neither stubbed nor fetched (40 MB).
ALSO_SHIPPED = ("pyarrow",)
SDISTS = ("mamba-ssm==2.3.1", "causal-conv1d==1.6.0")
DEEPSPEED = re.compile(r"^deepspeed==(\S+)$", re.M)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_of(path: Path) -> tuple[str, str]:
    """(normalised name, version) of a wheel or sdist file name."""
    stem = path.name[:-len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem
    name, version = stem.split("-")[:2]
    return norm(name), version


def platforms(max_glibc: str) -> list[str]:
    """Every manylinux x86_64 tag up to max_glibc: pip download matches each tag exactly."""
    top = int(max_glibc.split(".")[1])
    return ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + \
        [f"manylinux_2_{n}_x86_64" for n in range(5, top + 1)]


def target_flags(python_version: str, max_glibc: str) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms(max_glibc):
        flags += ["--platform", tag]
    return flags


def stub_wheel(folder: Path, pin: str, files: dict | None = None) -> Path:
    """A wheel NAME-VERSION that requires nothing and holds `files` ({path: text}), none by default: the
    resolver's stand-in for a package the GPU machine already has (VERSION+provided), or a rehearsal's build."""
    name, version = pin.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in (files or {}).items():
            whl.writestr(member, text)
        whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheelhouse\n"
                                                "Root-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def pip(py: str, *args: str, env: dict | None = None) -> None:
    cmd = [py, "-m", "pip", *args, "--disable-pip-version-check"]
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"gpu_wheelhouse: error: this pip command failed: {' '.join(cmd)}")


def check_builder(py: str) -> str:
    probe = subprocess.run([py, "-c", (
        "import sys, importlib.util as u; from importlib.metadata import version as v\n"
        "pip = tuple(int(x) for x in v('pip').split('.')[:2])\n"
        "st = tuple(int(x) for x in v('setuptools').split('.')[:2]) if u.find_spec('setuptools') else (0, 0)\n"
        "missing = [m for m, ok in (('torch', u.find_spec('torch')), ('pip >= 23.1', pip >= (23, 1)),\n"
        "    ('setuptools >= 70.1 or wheel', st >= (70, 1) or u.find_spec('wheel'))) if not ok]\n"
        "print(sys.version.split()[0], ';'.join(missing))")], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"gpu_wheelhouse: error: {py} does not run: {probe.stderr.strip()[-300:]}")
    version, missing = (probe.stdout.strip().split(" ", 1) + [""])[:2]
    if missing:
        sys.exit(f"gpu_wheelhouse: error: {py} (Python {version}) lacks {missing.replace(';', ', ')}; "
                 "set PYTHON to a Python that has them")
    return version


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="the wheelhouse folder (made if absent; stale files are removed)")
    parser.add_argument("python_version", nargs="?", default="3.12", help="the GPU machine's Python, e.g. 3.12")
    parser.add_argument("--max-glibc", default="2.39", help="the GPU machine's glibc (manylinux tags up to it)")
    parser.add_argument("--provided", nargs="*", default=list(PROVIDED),
                        help="NAME==VERSION of packages the GPU machine has and the wheelhouse must not hold")
    parser.add_argument("--no-sdists", action="store_true", help="leave out mamba-ssm and causal-conv1d")
    args = parser.parse_args(argv)
    default = ROOT / ".venv/bin/python"
    py = os.environ.get("PYTHON") or (str(default) if default.is_file() else "python3")
    built_with = check_builder(py)
    print(f"gpu_wheelhouse: building with {py} (Python {built_with}) for CPython {args.python_version}, "
          f"manylinux x86_64 up to glibc {args.max_glibc}; provided there: {', '.join(args.provided)}", flush=True)
    out = args.dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    flags = target_flags(args.python_version, args.max_glibc)

    deepspeed = DEEPSPEED.search(REQUIREMENTS.read_text()).group(1)
    if not list(out.glob(f"deepspeed-{deepspeed}-*.whl")):
        pip(py, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), f"deepspeed=={deepspeed}",
            env=dict(os.environ, DS_BUILD_OPS="0"))

    with tempfile.TemporaryDirectory() as tmp:
        stubs = Path(tmp) / "stubs"
        stubs.mkdir()
        for pin in args.provided:
            stub_wheel(stubs, f"{pin}+provided")
        report = Path(tmp) / "report.json"
        pip(py, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *flags,
            "--find-links", str(out), "--find-links", str(stubs), "-r", str(REQUIREMENTS),
            *(f"{pin}+provided" for pin in args.provided))
        resolved = json.loads(report.read_text())["install"]
    pins = {norm(r["metadata"]["name"]): r["metadata"]["version"] for r in resolved
            if not r["metadata"]["version"].endswith("+provided")}
    fetch = [f"{name}=={version}" for name, version in sorted(pins.items())
             if not list(out.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
             and not any(dist_of(p) == (name, version) for p in out.glob("*.whl"))]
    if fetch:
        pip(py, "download", "-q", "--no-deps", "-d", str(out), *flags, *fetch)

    sdists = {} if args.no_sdists else {norm(s.split("==")[0]): s.split("==")[1] for s in SDISTS}
    missing_sdists = [f"{n}=={v}" for n, v in sdists.items() if not any(
        dist_of(p) == (n, v) for p in out.glob("*.tar.gz"))]
    if missing_sdists:
        # The *_SKIP_CUDA_BUILD switches let their setup.py report metadata on a machine without nvcc.
        pip(py, "download", "-q", "--no-deps", "--no-build-isolation", "--no-binary=:all:", "-d", str(out),
            *missing_sdists, env=dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", CAUSAL_CONV1D_SKIP_CUDA_BUILD="TRUE"))

    # One version of each package: a stale one would make the offline install ambiguous.
    keep = {**pins, **sdists}
    for path in list(out.glob("*.whl")) + list(out.glob("*.tar.gz")):
        name, version = dist_of(path)
        if keep.get(name) != version:
            print(f"gpu_wheelhouse: removing {path.name} (not in the resolved set)")
            path.unlink()
    wheels = sorted(p.name for p in out.glob("*.whl"))
    absent = sorted(set(pins) - {dist_of(Path(w))[0] for w in wheels})
    if absent:
        sys.exit(f"gpu_wheelhouse: error: resolved but not downloaded: {', '.join(absent)}")
    (out / "wheelhouse.json").write_text(json.dumps({
        "python_version": args.python_version, "implementation": "cp", "max_glibc": args.max_glibc,
        "built_with": {"python": py, "version": built_with}, "requirements": REQUIREMENTS.read_text(),
        "provided": args.provided, "pins": pins, "sdists": sdists}, indent=2))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"gpu_wheelhouse: {len(wheels)} wheels + {len(sdists)} source distributions, {size:.1f} MiB in {out}:")
    for name in wheels + sorted(p.name for p in out.glob("*.tar.gz")):
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
