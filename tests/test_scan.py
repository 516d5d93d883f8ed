"""Every fast recurrence equals a plain sequential float64 reference, forward and backward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.liquid import CfC, LiquidScan, lecun_tanh
from pipeline.model.mamba import Mamba
from pipeline.model.scan import scan_core, diag_scan, diag_scan_ref, selective_scan, selective_scan_ref
from pipeline.model import kernels
from pipeline.model import scan as scan_module
from pipeline.model.spiking import LIF, SpikeEncoder, lif_spikes, surrogate_grad


pytestmark = pytest.mark.usefixtures("one_thread")

f64 = torch.float64


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


# Lengths that need padding to nc * Q (not multiples of ceil(sqrt(T))), at both levels of the
# recursion (100: the scan over its 10 chunk summaries pads), and exact fits.
PADDED_T = [1, 5, 8, 9, 31, 40, 100, 257, 333, 1000]


def final_state_loss(out, last, w_out, w_last):
    """A loss on the outputs and, with a larger weight, on the final state carried to the next call."""
    return (out * w_out).sum() + 10 * (last * w_last).sum()


@pytest.fixture(params=["fused", "blocked"])
def scan_impl(request, monkeypatch):
    """Runs a test on the fused C++ kernels (the CPU default) and on the blocked tensor-op fallback."""
    if request.param == "blocked":
        monkeypatch.setattr(scan_module, "_diag_scan_cpu", lambda: None)
        monkeypatch.setattr(scan_module, "_fused_cpu_available", lambda u: False)
    else:
        assert kernels.diag_scan_cpu() is not None and kernels.selective_scan_cpu() is not None
    return request.param


def test_the_fused_cpu_kernels_build_and_are_the_default():
    # A broken build would silently fall back to the slower path: on a machine with a compiler
    # (every CI machine, since DeepSpeed needs one) the kernels must be there and be used.
    for load in (kernels.diag_scan_cpu, kernels.selective_scan_cpu, kernels.rms_norm_cpu):
        assert load() is not None, load.__name__
    ins, _ = selective_scan_inputs(9)
    y, _ = selective_scan(*ins)
    assert type(y.grad_fn).__name__.startswith("_SelectiveScanCPU")
    h = diag_scan(torch.rand(2, 9, 3, requires_grad=True), torch.randn(2, 9, 3))
    nodes = [h.grad_fn] + [n for n, _ in h.grad_fn.next_functions if n is not None]
    assert any(type(n).__name__.startswith("_DiagScanCPU") for n in nodes)


@pytest.mark.parametrize("T", PADDED_T)
@pytest.mark.parametrize("with_h0", [False, True])
def test_diag_scan_matches_sequential_loop(T, with_h0, scan_impl):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(3, T, 7, generator=g, dtype=f64).requires_grad_()
    b = torch.randn(3, T, 7, generator=g, dtype=f64).requires_grad_()
    h0 = torch.randn(3, 7, generator=g, dtype=f64).requires_grad_() if with_h0 else None
    h, ref = diag_scan(a, b, h0), diag_scan_ref(a, b, h0)
    assert h.dtype == f64 and rel_err(h, ref) < 1e-6
    w, w_last = torch.randn(ref.shape, generator=g, dtype=f64), torch.randn(3, 7, generator=g, dtype=f64)
    ins = [a, b] + ([h0] if with_h0 else [])
    got = torch.autograd.grad(final_state_loss(h, h[:, -1], w, w_last), ins)
    exp = torch.autograd.grad(final_state_loss(ref, ref[:, -1], w, w_last), ins)
    for name, x, y in zip("a b h0".split(), got, exp):
        assert rel_err(x, y) < 1e-6, name


@pytest.mark.parametrize("T", PADDED_T)
def test_reverse_scan_carries_the_incoming_state_through_padding(T):
    # The backward passes run the scan in reverse from the gradient of the final state: the padded
    # tail is crossed first and must leave that state intact.
    g = torch.Generator().manual_seed(T)
    a, b = torch.rand(2, T, 5, generator=g, dtype=f64), torch.randn(2, T, 5, generator=g, dtype=f64)
    h_end = torch.randn(2, 5, generator=g, dtype=f64)
    h, ref = h_end, []
    for t in range(T - 1, -1, -1):
        h = a[:, t] * h + b[:, t]
        ref.append(h)
    ref = torch.stack(ref[::-1], 1)
    assert rel_err(scan_core(a, b, h_end, reverse=True), ref) < 1e-12


def selective_scan_inputs(T, with_h0=True, B=2, E=3, N=4):
    g = torch.Generator().manual_seed(T)
    u = torch.randn(B, T, E, generator=g, dtype=f64)
    delta = 0.05 + 0.5 * torch.rand(B, T, E, generator=g, dtype=f64)
    A = -0.2 - 2 * torch.rand(E, N, generator=g, dtype=f64)
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=f64), torch.randn(B, T, N, generator=g, dtype=f64)
    h0 = torch.randn(B, E, N, generator=g, dtype=f64) if with_h0 else None
    return [x.requires_grad_() if x is not None else None for x in (u, delta, A, Bm, Cm, h0)], g


@pytest.mark.parametrize("T", PADDED_T)
@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_scan_matches_sequential_reference_with_a_loss_on_the_final_state(T, with_h0, scan_impl):
    ins, g = selective_scan_inputs(T, with_h0)
    y, h_last = selective_scan(*ins)
    y_ref, h_ref = selective_scan_ref(*ins)
    assert y.dtype == h_last.dtype == f64
    assert rel_err(y, y_ref) < 1e-6 and rel_err(h_last, h_ref) < 1e-6
    w, w_last = torch.randn(y_ref.shape, generator=g, dtype=f64), torch.randn(h_ref.shape, generator=g, dtype=f64)
    wrt = [x for x in ins if x is not None]
    got = torch.autograd.grad(final_state_loss(y, h_last, w, w_last), wrt, retain_graph=True)
    exp = torch.autograd.grad(final_state_loss(y_ref, h_ref, w, w_last), wrt, retain_graph=True)
    for name, x, e in zip("u delta A B C h0".split(), got, exp):
        assert rel_err(x, e) < 1e-6, name
    # The final state alone (no gradient reaches y; C does not enter h_last).
    wrt = [x for i, x in enumerate(ins) if x is not None and i != 4]
    got = torch.autograd.grad((h_last * w_last).sum(), wrt)
    exp = torch.autograd.grad((h_ref * w_last).sum(), wrt)
    for name, x, e in zip("u delta A B h0".split(), got, exp):
        assert rel_err(x, e) < 1e-6, name


@pytest.mark.parametrize("E,N", [(37, 32), (16, 5), (1, 1)])
def test_fused_selective_scan_in_float32_at_odd_widths(E, N):
    # Channels are the kernel's vector lanes (16 a block): widths that leave a partial block.
    ins, g = selective_scan_inputs(70, True, B=3, E=E, N=N)
    ref_y, ref_h = selective_scan_ref(*ins)
    w = torch.randn(ref_y.shape, generator=g, dtype=f64)
    exp = torch.autograd.grad(final_state_loss(ref_y, ref_h, w, torch.ones_like(ref_h)), ins)
    ins32 = [x.detach().float().requires_grad_() for x in ins]
    y, h = selective_scan(*ins32, method="fused")
    got = torch.autograd.grad(final_state_loss(y, h, w.float(), torch.ones_like(h)), ins32)
    assert rel_err(y.double(), ref_y) < 1e-5 and rel_err(h.double(), ref_h) < 1e-5
    for name, x, e in zip("u delta A B C h0".split(), got, exp):
        assert rel_err(x.double(), e) < 1e-4, name


@pytest.mark.parametrize("impl", ["fused", "blocked"])
def test_a_nan_input_reaches_the_scan_outputs(impl):
    # The NaN-skipping guard needs a NaN in a batch to show in the loss, not be squashed.
    ins, _ = selective_scan_inputs(20, True, E=20, N=8)
    u = ins[0].detach().clone()
    u[1, 7, 3] = float("nan")
    y, h = selective_scan(u.float(), *[x.detach().float() for x in ins[1:]], method=impl)
    assert torch.isnan(y[1, 7:, 3]).all() and torch.isfinite(y[0]).all() and torch.isnan(h[1, 3]).all()


@pytest.mark.parametrize("with_h0", [False, True])
def test_fused_diag_scan_keeps_a_constant_decay_as_one_number(with_h0, scan_impl):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 1, generator=g, dtype=f64).requires_grad_()
    b = torch.randn(2, 33, 5, generator=g, dtype=f64).requires_grad_()
    h0 = torch.randn(2, 5, generator=g, dtype=f64).requires_grad_() if with_h0 else None
    ins = [a, b] + ([h0] if with_h0 else [])
    w = torch.randn(2, 33, 5, generator=g, dtype=f64)
    got = torch.autograd.grad((diag_scan(a, b, h0) * w).sum(), ins)
    exp = torch.autograd.grad((diag_scan_ref(a, b, h0) * w).sum(), ins)
    for name, x, e in zip("a b h0".split(), got, exp):
        assert x.shape == e.shape and rel_err(x, e) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.float32, f64, torch.bfloat16])
def test_rms_norm_fused_kernel_matches_the_formula(dtype):
    from pipeline.model.attention import RMSNorm

    norm = RMSNorm(37).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 5, 37, dtype=dtype)
    y = norm(x)
    gx, gw = torch.autograd.grad(y, [x, norm.weight], gy)
    xf = x.detach().double().requires_grad_()
    wf = norm.weight.detach().double().requires_grad_()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps) * wf
    rx, rw = torch.autograd.grad(ref, [xf, wf], gy.double())
    tol = 1e-12 if dtype == f64 else (1e-5 if dtype == torch.float32 else 2e-2)
    assert y.dtype == dtype
    for got, exp in ((y, ref), (gx, rx), (gw, rw)):
        assert rel_err(got.double(), exp.detach()) < tol


def test_diag_scan_half_inputs_scan_in_float32():
    a = torch.rand(2, 50, 4).half()
    b = torch.randn(2, 50, 4).half()
    h = diag_scan(a, b)
    assert h.dtype == torch.float32
    assert rel_err(h, diag_scan_ref(a.float(), b.float())) < 1e-5


# ---------------------------------------------------------------------------------------------
# Mamba: our own float64 transcription of mamba_ssm's selective_scan_ref (same argument layout)
# ---------------------------------------------------------------------------------------------

def selective_scan_ref_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, x0=None):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,).  Real A, ungrouped.
    x0 (b, d, n): the state before the first position (not in mamba_ssm's reference: zero there)."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    x = A.new_zeros((batch, dim, A.shape[1])) if x0 is None else x0
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[..., None]
    if z is not None:
        out = out * F.silu(z)
    return (out, x) if return_last_state else out


def mamba_reference_forward(m: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """mamba_ssm Mamba.forward's slow path (no inference cache), written from its math."""
    L = hidden.shape[1]
    xz = (hidden @ m.in_proj.weight.t()).transpose(1, 2)          # (b, 2d, l)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    A = -torch.exp(m.A_log)
    y = selective_scan_ref_mamba(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), m.D, z=z,
                                 delta_bias=m.dt_proj.bias, delta_softplus=True)
    return y.transpose(1, 2) @ m.out_proj.weight.t()


def mamba_reference_with_state(m: Mamba, hidden: torch.Tensor, conv0: torch.Tensor, ssm0: torch.Tensor):
    """The same math continuing from a state, as mamba_ssm's inference cache holds it: the last
    d_conv - 1 conv inputs (b, d, d_conv - 1) and the SSM state (b, d, n).  Returns the output and
    the state after the last position."""
    L = hidden.shape[1]
    x, z = (hidden @ m.in_proj.weight.t()).transpose(1, 2).chunk(2, dim=1)
    window = torch.cat([conv0, x], dim=-1)
    x = F.silu(F.conv1d(window, m.conv1d.weight, m.conv1d.bias, groups=m.d_inner))
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    y, last = selective_scan_ref_mamba(x, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2),
                                       m.D, z=z, delta_bias=m.dt_proj.bias, delta_softplus=True,
                                       return_last_state=True, x0=ssm0)
    return y.transpose(1, 2) @ m.out_proj.weight.t(), window[..., L:], last


MAMBA_SSM_SHAPES = {  # mamba_ssm.modules.mamba_simple.Mamba(d_model=16, d_state=8, d_conv=4, expand=2)
    "in_proj.weight": (64, 16), "conv1d.weight": (32, 1, 4), "conv1d.bias": (32,),
    "x_proj.weight": (1 + 16, 32), "dt_proj.weight": (32, 1), "dt_proj.bias": (32,),
    "A_log": (32, 8), "D": (32,), "out_proj.weight": (16, 32),
}


def test_mamba_parameter_names_and_shapes_match_mamba_ssm():
    m = Mamba(16, d_state=8, d_conv=4, expand=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_SHAPES
    assert torch.allclose(m.A_log[0].exp(), torch.arange(1, 9, dtype=torch.float32))  # S4D-real
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6                     # dt in [1e-3, 0.1]


@pytest.mark.parametrize("T", [1, 7, 40])
def test_mamba_torch_path_equals_selective_scan_ref(T):
    torch.manual_seed(T)
    m = Mamba(16, d_state=8, d_conv=4, expand=2, backend="torch").double()
    with torch.no_grad():
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.dt_proj.bias.add_(2.0)  # larger steps: decays far from 1
    hidden = torch.randn(2, T, 16, dtype=f64, requires_grad=True)
    out, _ = m(hidden)
    ref = mamba_reference_forward(m, hidden)
    assert rel_err(out, ref) < 1e-6
    w = torch.randn_like(ref)
    ins = [hidden] + list(m.parameters())
    for got, exp in zip(grads(out, ins, w), grads(ref, ins, w)):
        assert rel_err(got, exp) < 1e-6


@pytest.mark.parametrize("T", [5, 40, 100, 333])
def test_mamba_state_backpropagates_like_the_reference(T):
    # A loss on the returned state (as when a state is carried across calls and trained through).
    torch.manual_seed(T)
    m = Mamba(8, d_state=4, d_conv=4, expand=2, backend="torch").double()
    with torch.no_grad():
        m.dt_proj.bias.add_(1.0)
    hidden = torch.randn(2, T, 8, dtype=f64, requires_grad=True)
    conv0 = torch.randn(2, 16, 3, dtype=f64, requires_grad=True)
    ssm0 = torch.randn(2, 16, 4, dtype=f64, requires_grad=True)
    out, st = m(hidden, {"conv": conv0, "ssm": ssm0}, return_state=True)
    ref, conv_ref, ssm_ref = mamba_reference_with_state(m, hidden, conv0, ssm0)
    assert rel_err(out, ref) < 1e-6 and rel_err(st["ssm"], ssm_ref) < 1e-6
    assert torch.equal(st["conv"], conv_ref)
    w, w_ssm, w_conv = torch.randn_like(ref), torch.randn_like(ssm_ref), torch.randn_like(conv_ref)
    ins = [hidden, conv0, ssm0] + list(m.parameters())
    got = torch.autograd.grad((out * w).sum() + 10 * (st["ssm"] * w_ssm).sum() + (st["conv"] * w_conv).sum(), ins)
    exp = torch.autograd.grad((ref * w).sum() + 10 * (ssm_ref * w_ssm).sum() + (conv_ref * w_conv).sum(), ins)
    names = ["hidden", "conv0", "ssm0"] + [n for n, _ in m.named_parameters()]
    for name, x, e in zip(names, got, exp):
        assert rel_err(x, e) < 1e-6, name


def test_selective_scan_state_carry_and_cpu_path_never_imports_mamba_ssm():
    import sys
    torch.manual_seed(0)
    B, T, E, N = 2, 30, 6, 4
    u, delta = torch.randn(B, T, E, dtype=f64), torch.rand(B, T, E, dtype=f64)
    A = -torch.rand(E, N, dtype=f64) * 4
    Bm, Cm = torch.randn(B, T, N, dtype=f64), torch.randn(B, T, N, dtype=f64)
    y, h = selective_scan(u, delta, A, Bm, Cm)
    y1, h1 = selective_scan(u[:, :13], delta[:, :13], A, Bm[:, :13], Cm[:, :13])
    y2, h2 = selective_scan(u[:, 13:], delta[:, 13:], A, Bm[:, 13:], Cm[:, 13:], h1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12 and rel_err(h2, h) < 1e-12
    assert "mamba_ssm" not in sys.modules


# ---------------------------------------------------------------------------------------------
# LIF
# ---------------------------------------------------------------------------------------------

def lif_reference(I, v0, beta, thr, mode, kind, slope):
    """snntorch-style step loop: detached reset, surrogate spike gradient."""
    v = v0
    spikes, mems = [], []
    for I_n in I.unbind(1):
        u = beta * v + I_n
        hard = (u >= thr).to(u.dtype)
        x = u - thr
        sg = surrogate_grad(x, kind, slope)
        s = _STE.apply(x, hard, sg.detach())  # value: the hard spike; gradient: the surrogate
        spikes.append(s)
        mems.append(u)
        if mode == "subtract":
            v = u - thr * hard
        elif mode == "zero":
            v = u * (1 - hard)
        else:
            v = u
    return torch.stack(spikes, 1), torch.stack(mems, 1), v


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hard, sg):
        ctx.save_for_backward(sg)
        return hard.clone()

    @staticmethod
    def backward(ctx, g):
        (sg,) = ctx.saved_tensors
        return g * sg, None, None


def lif_spikes_naive(I, v0, beta, thr, mode):
    v, out = v0, []
    for n in range(I.shape[1]):
        u = beta * v + I[:, n]
        s = (u >= thr).to(I.dtype)
        out.append(s)
        v = u - thr * s if mode == "subtract" else (u * (1 - s) if mode == "zero" else u)
    return torch.stack(out, 1)


@pytest.mark.parametrize("mode", ["subtract", "zero", "none"])
@pytest.mark.parametrize("N", [3, 17, 200])
@pytest.mark.parametrize("beta", [0.5, 0.95])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_lif_spike_decision_is_exact_for_every_method(mode, N, beta, dtype):
    g = torch.Generator().manual_seed(N)
    I = ((1 - beta) * (0.6 + 2 * torch.randn(4, N, 32, generator=g, dtype=f64))).to(dtype)
    v0 = torch.randn(4, 32, generator=g, dtype=f64).to(dtype)
    ref = lif_spikes_naive(I, v0, beta, 1.0, mode)
    assert 0 < ref.mean() < 1
    assert kernels.load("lif_sweep") is not None, "the fused CPU kernel must build where the tests run"
    for method in ("auto", "loop", "chunked"):
        assert torch.equal(lif_spikes(I, v0, beta, 1.0, mode, method=method), ref), method


@pytest.mark.parametrize("mode,kind", [("subtract", "atan"), ("zero", "fast_sigmoid"), ("none", "atan")])
@pytest.mark.parametrize("K,T", [(1, 45), (3, 45), (1, 333)])
def test_lif_layer_matches_step_loop_fwd_and_bwd(mode, kind, K, T):
    torch.manual_seed(K)
    slope = 2.0 if kind == "atan" else 25.0
    lif = LIF(beta=0.8, threshold=0.7, num_steps=K, reset=mode, surrogate=kind, slope=slope)
    cur = (0.3 + 0.4 * torch.randn(2, T, 8, dtype=f64)).requires_grad_()
    v0 = torch.randn(2, 8, dtype=f64).requires_grad_()
    rate, mem, v_end, hard_rate = lif(cur, v0)
    I = cur.unsqueeze(2).expand(2, T, K, 8).reshape(2, T * K, 8)
    s_ref, u_ref, v_ref = lif_reference(I, v0, 0.8, 0.7, mode, kind, slope)
    rate_ref = s_ref.view(2, T, K, 8).mean(2)
    mem_ref = u_ref.view(2, T, K, 8)[:, :, -1]
    assert torch.equal(rate.detach(), rate_ref.detach())
    assert rel_err(mem, mem_ref) < 1e-6 and rel_err(v_end, v_ref) < 1e-6
    assert 0 < hard_rate.item() < 1
    # The final membrane is carried to the next call: weight its gradient up (it is one token of T).
    w1, w2, w3 = torch.randn_like(rate), torch.randn_like(mem), 10 * torch.randn_like(v_end)
    loss = (rate * w1).sum() + (mem * w2).sum() + (v_end * w3).sum()
    loss_ref = (rate_ref * w1).sum() + (mem_ref * w2).sum() + (v_ref * w3).sum()
    for got, exp in zip(torch.autograd.grad(loss, [cur, v0]), torch.autograd.grad(loss_ref, [cur, v0])):
        assert rel_err(got, exp) < 1e-6


def test_lif_threshold_and_beta_are_honoured():
    # Constant current 0.3, beta 0.5: membrane tends to 0.6, so a threshold of 0.55 fires and 0.65 never does.
    cur = torch.full((1, 30, 1), 0.3, dtype=f64)
    fires = LIF(0.5, 0.55, 1, "subtract", "atan", 2.0)(cur)[0]
    silent = LIF(0.5, 0.65, 1, "subtract", "atan", 2.0)(cur)[0]
    assert fires.sum() > 0 and silent.sum() == 0


# ---------------------------------------------------------------------------------------------
# Liquid
# ---------------------------------------------------------------------------------------------

def liquid_reference(cell: LiquidScan, u, h0):
    """The exact per-token update, written plainly and run token by token."""
    f_pre, v_pre = cell.in_proj(u).chunk(2, -1)
    f, v = F.softplus(f_pre), torch.tanh(v_pre)
    inv_tau = torch.exp(-cell.log_tau)
    x, xs = h0, []
    for f_t, v_t in zip(f.unbind(1), v.unbind(1)):
        lam = inv_tau + f_t
        a = torch.exp(-lam)
        x = a * x + (1 - a) * f_t * v_t / lam
        xs.append(x)
    return torch.stack(xs, 1), f, v, inv_tau


@pytest.mark.parametrize("T,slow", [(33, False), (333, False), (40, True)])
def test_liquid_scan_matches_loop_and_solves_the_ode(T, slow):
    torch.manual_seed(0)
    cell = LiquidScan(6, 5).double()
    if slow:  # time constants of ~500-3000 tokens: lambda < 1e-2, the series branch of the drive
        with torch.no_grad():
            cell.log_tau.copy_(torch.linspace(math.log(500), math.log(3000), 5))
            cell.in_proj.bias[:5].fill_(-12.0)
    u = torch.randn(2, T, 6, dtype=f64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=f64, requires_grad=True)
    h, h_last = cell(u, h0)
    # Sequential reference of the same exact update, and a fine RK4 integration of the ODE.
    ref, f, v, inv_tau = liquid_reference(cell, u, h0)
    assert rel_err(h, ref) < 1e-6 and rel_err(h_last, ref[:, -1]) < 1e-6
    w, w_last = torch.randn_like(ref), torch.randn_like(h0)
    ins = [u, h0, cell.log_tau, cell.in_proj.weight, cell.in_proj.bias]
    got = torch.autograd.grad(final_state_loss(h, h_last, w, w_last), ins)
    exp = torch.autograd.grad(final_state_loss(ref, ref[:, -1], w, w_last), ins)
    for name, x, e in zip(["u", "h0", "log_tau", "weight", "bias"], got, exp):
        assert rel_err(x, e) < 1e-6, name
    if T > 40:
        return
    with torch.no_grad():
        x = h0.clone()
        n = 400
        for t in range(5):
            rhs = lambda y: -y * inv_tau + f[:, t] * (v[:, t] - y)  # noqa: E731
            for _ in range(n):
                k1 = rhs(x); k2 = rhs(x + 0.5 / n * k1); k3 = rhs(x + 0.5 / n * k2); k4 = rhs(x + k3 / n)
                x = x + (k1 + 2 * k2 + 2 * k3 + k4) / (6 * n)
            assert rel_err(h[:, t].detach(), x) < 1e-6


def test_liquid_memory_at_initialisation_spans_the_configured_time_constants():
    torch.manual_seed(0)
    cell = LiquidScan(96, 64, tau_min=1.0, tau_max=64.0)
    u = torch.randn(4, 50, 96)            # unit-variance inputs, like the RMS-normed stream
    tau = cell.effective_tau(u).detach()  # (B, T, units): 1/lambda
    per_unit = tau.median(dim=1).values.median(dim=0).values
    # The longest memories reach the top of the range, the shortest its bottom, and the typical
    # unit is in between (log-uniform sampling: median sqrt(1 * 64) = 8).
    assert per_unit.max() > 32 and per_unit.min() < 2
    assert 3 < per_unit.median() < 20
    # The sampled tau is each unit's memory, up to the small conductance at initialisation.
    assert torch.allclose(per_unit, cell.log_tau.detach().exp(), rtol=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_liquid_scan_is_finite_when_lambda_underflows_to_zero(dtype):
    # 1/tau and the conductance both underflow: lambda = 0 exactly, where the drive (1 - a) f v / lambda
    # is 0/0 unless computed in a safe form.  The unit then holds its state.
    cell = LiquidScan(3, 4).to(dtype)
    big = 200.0 if dtype == torch.float32 else 800.0
    with torch.no_grad():
        cell.log_tau.fill_(big)
        cell.in_proj.weight.zero_()
        cell.in_proj.bias[:4].fill_(-big)
    u = torch.randn(2, 20, 3, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    h, h_last = cell(u, h0)
    assert torch.equal(h_last, h0.detach()) and torch.isfinite(h).all()
    (h.sum() + h_last.sum()).backward()
    for name, p in [("u", u), ("h0", h0)] + list(cell.named_parameters()):
        assert torch.isfinite(p.grad).all(), name
    assert torch.equal(h0.grad, torch.full_like(h0, 21.0))  # dh_t/dh0 = 1 for all 20 tokens + the state


def test_cfc_matches_ncps_cell_equations():
    torch.manual_seed(0)
    cell = CfC(4, 3, backbone_units=6).double()
    u = torch.randn(2, 9, 4, dtype=f64)
    hs, h_last = cell(u)
    h = torch.zeros(2, 3, dtype=f64)
    for t in range(9):
        x = lecun_tanh(cell.backbone(torch.cat([u[:, t], h], -1)))
        gate = torch.sigmoid(cell.time_a(x) * 1.0 + cell.time_b(x))
        h = torch.tanh(cell.ff1(x)) * (1 - gate) + gate * torch.tanh(cell.ff2(x))
        assert rel_err(hs[:, t], h) < 1e-9
    assert rel_err(h_last, h) < 1e-9


# ---------------------------------------------------------------------------------------------
# Spike encoders
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [5, 40, 333])
def test_temporal_encoder_state_backpropagates_like_the_loop(T):
    torch.manual_seed(T)
    s = torch.rand(2, T, 3, dtype=f64, requires_grad=True)   # real-valued: a rate with a gradient
    e0 = torch.randn(2, 3, dtype=f64, requires_grad=True)
    e, e_last = SpikeEncoder("temporal", 5.0, 10)(s, s, e0)
    rho = math.exp(-1 / 5.0)
    x, ref = e0, []
    for s_t in s.unbind(1):
        x = rho * x + (1 - rho) * s_t
        ref.append(x)
    ref = torch.stack(ref, 1)
    assert rel_err(e, ref) < 1e-6 and rel_err(e_last, ref[:, -1]) < 1e-6
    w, w_last = torch.randn_like(ref), torch.randn_like(e0)
    got = torch.autograd.grad(final_state_loss(e, e_last, w, w_last), [s, e0])
    exp = torch.autograd.grad(final_state_loss(ref, ref[:, -1], w, w_last), [s, e0])
    for x, y in zip(got, exp):
        assert rel_err(x, y) < 1e-6


def test_spike_encoders_are_causal_filters():
    torch.manual_seed(0)
    s = (torch.rand(2, 40, 3) < 0.3).double()
    rate, _ = SpikeEncoder("rate", 20.0, 10)(s, s)
    for t in range(40):
        assert torch.allclose(rate[:, t], s[:, max(0, t - 9): t + 1].sum(1) / 10)
    temporal, _ = SpikeEncoder("temporal", 5.0, 10)(s, s)
    rho = math.exp(-1 / 5.0)
    for t in (0, 7, 39):
        k = torch.tensor([rho ** (t - j) for j in range(t + 1)], dtype=f64)
        assert torch.allclose(temporal[:, t], (1 - rho) * torch.einsum("j,bjs->bs", k, s[:, : t + 1]))
    mem = torch.randn(2, 40, 3, dtype=f64)
    assert torch.equal(SpikeEncoder("potential", 5.0, 10)(s, mem)[0], mem)
