"""pipeline/model/kernels: the dispatch table and the one switch that forces the reference path."""
from __future__ import annotations

import torch

from pipeline.model import kernels
from pipeline.model.mamba import cuda_kernels


class _FakeCuda(torch.Tensor):
    is_cuda = True


def test_the_table_names_every_device_for_every_recurrence():
    names = " ".join(kernels.DISPATCH)
    for recurrence in ("diagonal scan", "liquid", "LIF", "Mamba", "RMSNorm"):
        assert recurrence in names
    assert all(len(row) == 3 and all(row) for row in kernels.DISPATCH.values())  # CUDA, CPU, reference


def test_reference_switch_turns_off_triton_cpp_and_mamba_ssm(monkeypatch):
    cuda32 = torch.Tensor._make_subclass(_FakeCuda, torch.zeros(1))
    monkeypatch.delenv("PIPELINE_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(kernels, "_TRITON_INSTALLED", [True])
    assert kernels.use_triton(cuda32)
    monkeypatch.setenv("PIPELINE_REFERENCE_KERNELS", "1")
    assert not kernels.use_triton(cuda32)
    monkeypatch.setattr(kernels, "_modules", {})  # nothing loaded yet in this process
    assert kernels.load("rms_norm") is None and kernels.rms_norm_cpu() is None
    assert cuda_kernels() is None


def test_the_first_build_says_what_it_builds(monkeypatch, caplog, tmp_path):
    """A build folder without the library: the loader logs the kernel, then builds (here: a stand-in build)."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("PIPELINE_REFERENCE_KERNELS", raising=False)
    monkeypatch.delenv("PIPELINE_DISABLE_CPP_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(cpp, "load", lambda name, **kw: name)
    with caplog.at_level("INFO", logger="pipeline.model.kernels"):
        assert kernels.load("rms_norm").startswith("pipeline_rms_norm_")
    assert "compiling the C++ rms_norm kernel (rms_norm.cpp" in caplog.text and "once per machine" in caplog.text
