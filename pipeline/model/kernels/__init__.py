"""Small fused CPU kernels, compiled on first use with the machine's C++ compiler (cached afterwards).

DeepSpeed already needs that compiler on CPU machines (it JIT-builds its shared-memory comm op), so
this adds no new requirement; if the build fails anyway, callers fall back to tensor ops with one
warning, never silently.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
_HERE = Path(__file__).resolve().parent
_modules: dict = {}


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


def _build_root() -> Path:
    """Where torch's JIT builds go: TORCH_EXTENSIONS_DIR, else its per-Python cache folder."""
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def load(name: str):
    """The compiled extension `name` (from `<name>.cpp` here), or None if it cannot be built."""
    if name in _modules:
        return _modules[name]
    module = None
    if os.environ.get("PIPELINE_DISABLE_CPP_KERNELS", "0") != "1":
        try:
            from torch.utils.cpp_extension import load as build

            source = _HERE / f"{name}.cpp"
            flags = _FLAGS.get(name, ["-O3"])
            # The build folder is keyed by name: naming it after the source's content lets checkouts of
            # different versions keep their own builds instead of rebuilding over each other.
            key = source.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()
            if "-march=native" in flags:
                key += _cpu_identity()
            digest = hashlib.sha256(key).hexdigest()[:10]
            # Built from a copy of the source inside the build folder: ninja also rebuilds when the
            # source's *path* changes, so two checkouts of the same version would rebuild each other's.
            build_dir = _build_root() / f"pipeline_{name}_{digest}"
            build_dir.mkdir(parents=True, exist_ok=True)
            stable = build_dir / f"{name}.cpp"
            if not stable.is_file() or stable.read_bytes() != source.read_bytes():
                tmp = build_dir / f".{name}.cpp.{os.getpid()}"
                tmp.write_bytes(source.read_bytes())
                os.replace(tmp, stable)  # ranks building at once each write a whole file
            module = build(name=f"pipeline_{name}_{digest}", sources=[str(stable)], extra_cflags=flags,
                           build_directory=str(build_dir), verbose=False)
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
