"""The Triton kernels (pipeline/model/kernels/triton_*.py) equal the PyTorch paths they replace,
forward and backward, and the model picks them exactly for CUDA tensors.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors ("cpu" cases).  triton.jit
reads TRITON_INTERPRET when a kernel is defined, so it is set here, before anything imports triton.
On a machine with a GPU it is left unset, and the same tests run the compiled kernels on CUDA
tensors ("cuda" cases; the "cpu" ones are then skipped unless TRITON_INTERPRET=1 is set by hand).
"""
from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton has wheels for Linux only")

from pipeline.model import liquid, scan, spiking  # noqa: E402
from pipeline.model.kernels import triton_liquid, triton_lif, triton_scan  # noqa: E402
from pipeline.model.kernels.triton_lif import lif_forward_triton  # noqa: E402
from pipeline.model.kernels.triton_liquid import liquid_scan_triton  # noqa: E402
from pipeline.model.kernels.triton_scan import diag_scan_triton  # noqa: E402
from pipeline.model.liquid import LiquidScan  # noqa: E402
from pipeline.model.scan import diag_scan, diag_scan_ref, use_triton  # noqa: E402
from pipeline.model.spiking import LIF, SpikeEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                                  reason="needs a CUDA device and compiled kernels")),
]
# fp16 as well: the fp16 drills of the GPU check (bench/gpu_check.py) run these kernels in fp16.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype, device: str) -> float:
    """Both sides compute in fp32; half-precision results differ by at most one rounding of the
    result (2^-8 of it for bf16, 2^-11 for fp16), and on a GPU Triton's exp/division are the fast approximate ones."""
    if dtype != torch.float32:
        return 1e-2
    return 1e-5 if device == "cpu" else 1e-4


@contextlib.contextmanager
def pytorch_path():
    """The reference: the model's PyTorch path, as PIPELINE_DISABLE_TRITON=1 selects it on CUDA."""
    old = os.environ.get("PIPELINE_DISABLE_TRITON")
    os.environ["PIPELINE_DISABLE_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PIPELINE_DISABLE_TRITON"]
        else:
            os.environ["PIPELINE_DISABLE_TRITON"] = old


def leaf(x: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    return x.to(device=device, dtype=dtype).requires_grad_()


def compare_grads(outs, refs, inputs, dtype, device, seed=0):
    """A random linear loss on every output; the gradients of every input agree."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r.shape, generator=g).to(r.device) for r in refs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), inputs)
    exp = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, ws)), inputs)
    for i, (x, y, inp) in enumerate(zip(got, exp, inputs)):
        assert x.dtype == y.dtype == inp.dtype and x.shape == y.shape == inp.shape, i
        assert torch.isfinite(x).all(), i
        assert rel_err(x, y) < tol(inp.dtype if inp.dtype != torch.float32 else dtype, device), i


# ----------------------------------------------------------------------------------------------
# LIF
# ----------------------------------------------------------------------------------------------

def lif_case(T, S, K, reset, surrogate, dtype, with_v0, device, seed=0, Bsz=2):
    g = torch.Generator().manual_seed(seed)
    lif = LIF(beta=0.9, threshold=1.0, num_steps=K, reset=reset, surrogate=surrogate, slope=2.0)
    current = leaf(0.4 + 0.8 * torch.randn(Bsz, T, S, generator=g), dtype, device)
    v0 = leaf(torch.randn(Bsz, S, generator=g), torch.float32, device) if with_v0 else None
    return lif, current, v0


def check_lif(lif, current, v0, device, used=(0, 1, 2)):
    out = lif_forward_triton(current, v0, lif.beta, lif.threshold, lif.num_steps, lif.reset, lif.surrogate,
                             lif.slope)
    with pytorch_path():
        ref = lif(current, v0)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
    rate, ref_rate = out[0].detach(), ref[0].detach()
    if device == "cpu":  # the membrane arithmetic is the reference sweep's: identical hard spikes
        assert torch.equal(rate, ref_rate)
    else:  # (a fused multiply-add may round differently from PyTorch's CUDA loop at the threshold)
        assert (rate != ref_rate).float().mean().item() <= 1e-3
    assert rel_err(out[1], ref[1]) < 1e-5 and rel_err(out[2], ref[2]) < 1e-5
    assert abs(out[3].item() - ref[3].item()) < 1e-6
    inputs = [current] + ([v0] if v0 is not None else [])
    compare_grads([out[i] for i in used], [ref[i] for i in used], inputs, current.dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_v0", [False, True])
def test_lif_matches_the_pytorch_path(device, reset, surrogate, K, dtype, with_v0):
    check_lif(*lif_case(9, 37, K, reset, surrogate, dtype, with_v0, device), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,S,K,reset", [(1, 5, 3, "zero"), (7, 130, 1, "subtract"), (33, 5, 3, "subtract"),
                                         (33, 130, 1, "zero"), (257, 37, 1, "none"), (257, 5, 3, "zero")])
def test_lif_odd_lengths_and_widths(device, T, S, K, reset):
    check_lif(*lif_case(T, S, K, reset, "atan", torch.float32, True, device, seed=T), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 2)])
def test_lif_outputs_left_out_of_the_loss(device, used):
    # Unused outputs reach the backward pass as None gradients, which the kernel skips.
    check_lif(*lif_case(8, 37, 3, "zero", "fast_sigmoid", torch.float32, True, device), device, used)


@pytest.mark.parametrize("device", DEVICES)
def test_lif_state_carried_across_calls(device):
    # Two halves, the second starting from the first's final membrane, equal one whole call.
    lif, current, v0 = lif_case(20, 37, 3, "subtract", "atan", torch.float32, True, device)
    whole = lif_forward_triton(current, v0, 0.9, 1.0, 3, "subtract", "atan", 2.0)
    first = lif_forward_triton(current[:, :11], v0, 0.9, 1.0, 3, "subtract", "atan", 2.0)
    second = lif_forward_triton(current[:, 11:], first[2], 0.9, 1.0, 3, "subtract", "atan", 2.0)
    assert torch.equal(torch.cat([first[0], second[0]], 1), whole[0])
    assert torch.equal(torch.cat([first[1], second[1]], 1), whole[1]) and torch.equal(second[2], whole[2])


# ----------------------------------------------------------------------------------------------
# Diagonal recurrence
# ----------------------------------------------------------------------------------------------

def scan_case(T, feat, a_kind, dtype, with_h0, device, seed=0, Bsz=2):
    g = torch.Generator().manual_seed(seed)
    a_shape = {"full": (Bsz, T, *feat), "unit": (Bsz, 1, *feat), "scalar": (1, 1) + (1,) * len(feat)}[a_kind]
    a = leaf(0.5 + 0.5 * torch.rand(a_shape, generator=g), dtype, device)
    b = leaf(torch.randn(Bsz, T, *feat, generator=g), dtype, device)
    h0 = leaf(torch.randn(Bsz, *feat, generator=g), dtype, device) if with_h0 else None
    return a, b, h0


def check_scan(a, b, h0, device):
    h = diag_scan_triton(a, b, h0)
    with pytorch_path():
        ref = diag_scan(a, b, h0)
    assert h.dtype == ref.dtype == torch.float32 and h.shape == ref.shape
    assert rel_err(h, ref) < tol(torch.float32, device)
    assert rel_err(h, diag_scan_ref(a.float(), b.float(), h0.float() if h0 is not None else None)) < 1e-5
    compare_grads([h, h[:, -1]], [ref, ref[:, -1]], [x for x in (a, b, h0) if x is not None], b.dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_kind", ["full", "unit", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_diag_scan_matches_the_pytorch_path(device, a_kind, dtype, with_h0):
    check_scan(*scan_case(9, (37,), a_kind, dtype, with_h0, device), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,feat", [(1, (5,)), (7, (130,)), (33, (5,)), (257, (37,)), (33, (3, 5))])
def test_diag_scan_odd_lengths_widths_and_feature_dims(device, T, feat):
    check_scan(*scan_case(T, feat, "full", torch.float32, True, device, seed=T), device)
    check_scan(*scan_case(T, feat, "scalar", torch.float32, True, device, seed=T), device)


def test_a_broadcast_decay_is_read_with_stride_0_not_expanded(monkeypatch):
    seen = []
    real = triton_scan._diag_scan_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(a, *args, **kwargs):
                seen.append((a.stride(), a.untyped_storage().nbytes()))
                return real[grid](a, *args, **kwargs)
            return launch

    monkeypatch.setattr(triton_scan, "_diag_scan_fwd", Spy())
    a, b, _ = scan_case(9, (37,), "scalar", torch.float32, False, "cpu" if INTERPRET else "cuda")
    diag_scan_triton(a, b)
    assert seen == [((0, 0, 0), 4)]


# ----------------------------------------------------------------------------------------------
# Liquid cell
# ----------------------------------------------------------------------------------------------

def liquid_case(T, L, dtype, with_h0, device, seed=0, Bsz=2, in_dim=12):
    torch.manual_seed(seed)
    cell = LiquidScan(in_dim, L).to(device)
    with torch.no_grad():  # larger weights than at init: conductances and tanh over their whole range
        cell.in_proj.weight.normal_(0.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    u = leaf(torch.randn(Bsz, T, in_dim, generator=g), dtype, device)
    h0 = leaf(torch.randn(Bsz, L, generator=g), torch.float32, device) if with_h0 else None
    return cell.to(dtype=dtype), u, h0


def check_liquid(cell, u, h0, device):
    h, h_last, obs = liquid_scan_triton(cell.in_proj(u), cell.log_tau, h0)
    out = (h.to(u.dtype), h_last)
    with pytorch_path():
        ref = cell(u, h0)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert rel_err(o, r) < tol(u.dtype, device)
    assert obs.keys() == cell.last_obs.keys()
    for k in obs:
        assert not obs[k].requires_grad, k
        assert abs(obs[k].item() / cell.last_obs[k].item() - 1) < tol(torch.float32, device), k
    inputs = [u, cell.in_proj.weight, cell.in_proj.bias, cell.log_tau] + ([h0] if h0 is not None else [])
    compare_grads(out, ref, inputs, u.dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_liquid_matches_the_pytorch_path(device, dtype, with_h0):
    check_liquid(*liquid_case(9, 37, dtype, with_h0, device), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,L", [(1, 5), (7, 130), (33, 5), (257, 37)])
def test_liquid_odd_lengths_and_widths(device, T, L):
    check_liquid(*liquid_case(T, L, torch.float32, True, device, seed=T), device)


@pytest.mark.parametrize("device", DEVICES)
def test_liquid_decay_rate_near_zero_stays_finite(device):
    # 1/tau and the conductance underflow: lam -> 0, where (1 - e^-lam) / lam is 0/0 in closed form.
    cell, u, h0 = liquid_case(7, 37, torch.float32, True, device)
    with torch.no_grad():
        cell.log_tau.fill_(90.0)
        cell.in_proj.weight.mul_(0.01)
        cell.in_proj.bias[:37].fill_(-60.0)
        cell.in_proj.bias[37:37 + 10].fill_(30.0)  # and tanh saturated for some units
    check_liquid(cell, u, h0, device)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what use_triton decides for one (no GPU needed)."""
    is_cuda = True


def test_use_triton_picks_cuda_tensors_unless_disabled(monkeypatch):
    cuda32 = torch.Tensor._make_subclass(_FakeCuda, torch.zeros(1))
    cuda64 = torch.Tensor._make_subclass(_FakeCuda, torch.zeros(1, dtype=torch.float64))
    monkeypatch.delenv("PIPELINE_DISABLE_TRITON", raising=False)
    assert use_triton(cuda32) and not use_triton(cuda64) and not use_triton(torch.zeros(1))
    monkeypatch.setenv("PIPELINE_DISABLE_TRITON", "1")
    assert not use_triton(cuda32)
    monkeypatch.setenv("PIPELINE_DISABLE_TRITON", "0")
    assert use_triton(cuda32)


def spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def set_dispatch(monkeypatch, decide):
    """Installs `decide` as every call site's dispatch decision."""
    for module in (scan, spiking, liquid):
        monkeypatch.setattr(module, "use_triton", decide)


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_layers_dispatch_to_the_kernels(device, monkeypatch):
    calls = [spy(monkeypatch, triton_lif, "lif_forward_triton"),
             spy(monkeypatch, triton_liquid, "liquid_scan_triton"),
             spy(monkeypatch, triton_scan, "diag_scan_triton")]
    lif, current, v0 = lif_case(6, 5, 1, "zero", "atan", torch.float32, True, device)
    cell, u, h0 = liquid_case(6, 5, torch.float32, True, device)
    enc = SpikeEncoder("temporal", tau=4.0, window=3)

    def run():
        rate, mem, v_end, _ = lif(current, v0)
        e, e_last = enc(rate, mem, torch.zeros_like(v_end))
        h, h_last = cell(u, h0)
        return rate, mem, v_end, e, e_last, h, h_last

    if device == "cpu":  # forced, so the interpreter runs the path CUDA tensors take
        set_dispatch(monkeypatch, lambda x: True)
    fused = run()
    assert [len(c) for c in calls] == [1, 1, 1]
    set_dispatch(monkeypatch, use_triton)
    if device == "cpu":  # the real decision for CPU tensors
        plain = run()
    else:
        with pytorch_path():
            plain = run()
    assert [len(c) for c in calls] == [1, 1, 1]  # the PyTorch path never reaches the kernels
    for x, y in zip(fused, plain):
        assert x.dtype == y.dtype and rel_err(x, y) < tol(torch.float32, device)
    compare_grads(fused, plain, [current, v0, u, h0, cell.log_tau], torch.float32, device)


def test_cpu_runs_never_import_triton():
    code = """
import sys, torch
from pipeline.config import ModelConfig
from pipeline.model import HybridLM
cfg = ModelConfig(vocab_size=61, hidden_dim=16, num_layers=1, liquid_units=8, spiking_units=8,
                  num_attention_heads=2, mamba_d_state=4, mamba_expand=2, num_gate_heads=2,
                  cross_attn_heads=2, spike_to_mamba_method="temporal", num_spike_steps=2)
HybridLM(cfg)(torch.randint(0, 61, (1, 5))).float().sum().backward()
assert "triton" not in sys.modules, "triton imported on CPU"
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
