"""Which implementation serves each recurrence on each device, and the kernels themselves.

DISPATCH below is the one table; the model modules ask `use_triton(x)` and the `*_cpu()` loaders, nothing else.
PIPELINE_REFERENCE_KERNELS=1 forces the tensor-op reference path everywhere (no Triton, no C++ build, no
mamba-ssm); the narrower PIPELINE_DISABLE_TRITON=1 / PIPELINE_DISABLE_CPP_KERNELS=1 turn off one family.

The C++ kernels are compiled on first use with the machine's C++ compiler, once per machine and source version
(cached under torch's extension folder; the first run logs what it builds). DeepSpeed already needs that compiler
on CPU machines (it JIT-builds its shared-memory comm op), so this adds no new requirement; if the build fails
anyway, callers fall back to tensor ops with one warning, never silently.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
_modules: dict = {}

# recurrence -> (CUDA, CPU, reference: every device's fallback), each with why; docs/MODEL.md explains the kernels.
DISPATCH = {
    "diagonal scan (liquid scan, LIF membrane, STDP traces)": (
        "Triton triton_scan.py: one launch per direction, where a blocked scan is many small launches",
        "C++ diag_scan.cpp: one fused pass each way, vectorised for this CPU", "tensor ops: scan.py's blocked scan"),
    "liquid CfC cell": ("Triton triton_liquid.py: gates, decays, scan and tau metrics in one kernel",
                        "tensor ops, the scan through diag_scan.cpp", "tensor ops"),
    "LIF neurons": ("Triton triton_lif.py: the reset makes the recurrence nonlinear, so one sequential kernel",
                    "C++ lif_sweep.cpp for hard spikes in fp32/fp64, else tensor ops", "tensor ops: chunked scan + reset"),
    "Mamba selective scan": ("mamba-ssm's selective_scan_fn when importable (model.mamba_backend auto/cuda)",
                             "C++ selective_scan.cpp: the state never leaves the cache", "tensor ops: chunked scan"),
    "RMSNorm": ("tensor ops: the GPU's elementwise kernels suffice", "C++ rms_norm.cpp: one pass per row each way",
                "tensor ops"),
}


def reference_forced() -> bool:
    return os.environ.get("PIPELINE_REFERENCE_KERNELS", "0") == "1"


_TRITON_INSTALLED: list = []


def use_triton(x: torch.Tensor) -> bool:
    """Whether the model's recurrences on x run as the fused Triton kernels (kernels/triton_*.py):
    CUDA tensors in fp32 or half precision, with triton installed, unless switched off (module docstring).
    Only CUDA tensors get past the first test, so a CPU run never looks for (or imports) triton."""
    if (not x.is_cuda or x.dtype == torch.float64 or os.environ.get("PIPELINE_DISABLE_TRITON", "0") == "1"
            or reference_forced()):
        return False
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _built(name: str) -> bool:
    root = _build_root()
    return any(root.glob(f"*/{name}/{name}.so")) or (root / name / f"{name}.so").is_file()


def _stable_source(source: Path, build_name: str) -> Path:
    """The source copied to a path named after its content: torch rebuilds whenever the source path in its build
    file changes, so building each checkout's own path made checkouts of one version rebuild over each other."""
    copy = _build_root() / "sources" / f"{build_name}.cpp"
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, copy)  # complete or absent
    return copy


# Per-kernel compiler flags.  The fused passes are built for this CPU's vector units (their inner
# loops are the whole cost); the build name then carries the CPU's identity, so a home directory
# shared by machines of different CPUs never hands one of them another's instructions.
_NATIVE = ["-O3", "-march=native", "-fopenmp-simd"]
_FLAGS = {"lif_sweep": ["-O3"], "selective_scan": _NATIVE, "diag_scan": _NATIVE, "rms_norm": _NATIVE}


def _cpu_identity() -> bytes:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor().encode() + platform.machine().encode()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep))).encode()


def load(name: str):
    """The compiled extension `name` (from `<name>.cpp` here), or None if it cannot be built."""
    if name in _modules:
        return _modules[name]
    module = None
    if os.environ.get("PIPELINE_DISABLE_CPP_KERNELS", "0") != "1" and not reference_forced():
        try:
            from torch.utils.cpp_extension import load as build

            source = _HERE / f"{name}.cpp"
            flags = _FLAGS.get(name, ["-O3"])
            # The build folder is keyed by name: naming it after the source's content lets checkouts of
            # different versions keep their own builds instead of rebuilding over each other.
            key = source.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()
            if "-march=native" in flags:
                key += _cpu_identity()
            build_name = f"pipeline_{name}_{hashlib.sha256(key).hexdigest()[:10]}"
            if not _built(build_name):
                log.info("compiling the C++ %s kernel (%s, %s): once per machine and source version, about a "
                         "minute; later runs load the cached build", name, source.name, " ".join(flags))
            module = build(name=build_name, sources=[str(_stable_source(source, build_name))], extra_cflags=flags,
                           verbose=False)
        except Exception as err:  # a missing compiler must not stop training: say so once, run slower
            log.warning("could not build the fused %s kernel (%s); using the tensor-op path instead", name,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
    _modules[name] = module
    return module


_MODES = {"subtract": 0, "zero": 1, "none": 2}


def lif_sweep(I: torch.Tensor, v0: torch.Tensor, beta: float, thr: float, mode: str) -> Optional[torch.Tensor]:
    """Fused hard spikes for CPU tensors, or None where the kernel does not apply or is unavailable."""
    if I.device.type != "cpu" or I.dtype not in (torch.float32, torch.float64):
        return None
    module = load("lif_sweep")
    if module is None:
        return None
    return module.lif_sweep(I.contiguous(), v0.contiguous(), float(beta), float(thr), _MODES[mode])



def selective_scan_cpu():
    """The fused CPU selective-scan extension (forward / backward), or None where it cannot be built."""
    return load("selective_scan")


def diag_scan_cpu():
    """The fused CPU diagonal-recurrence extension (forward / backward), or None where it cannot be built."""
    return load("diag_scan")


def rms_norm_cpu():
    """The fused CPU RMSNorm extension (forward / backward), or None where it cannot be built."""
    return load("rms_norm")
