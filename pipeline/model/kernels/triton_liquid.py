"""Triton kernels for liquid.LiquidScan on the GPU: gates, decay and scan in one pass each way.

From z = in_proj(u) = [f_pre, v_pre] (B, T, 2L) and 1/tau (L,), per unit and token:
    f = softplus(f_pre),  v = tanh(v_pre),  lam = 1/tau + f,  a = exp(-lam),
    b = (1 - exp(-lam)) / lam * f * v,      h_t = a_t h_{t-1} + b_t,
with h in fp32 registers; only h (B, T, L) is written (f, v, lam, a, b are never materialised).
The backward pass walks back in time recomputing the gates from z, so it saves only z and h.  The
metrics LiquidScan.last_obs reports (mean / min / max of 1/lam) are reduced per unit inside the
forward kernel.

The transcendentals avoid tl.log and cancellations near 0 (tl.exp / tl.log are the fast
approximate instructions on NVIDIA GPUs): log1p by its atanh series, tanh and (1 - e^-x)/x by
Taylor series for small arguments.  See triton_scan.py for why these are our own kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_scan import launch_config

_INF = tl.constexpr(float("inf"))


@triton.jit
def _softplus(x):
    """torch's F.softplus (threshold 20) as max(x, 0) + log1p(exp(-|x|)), and its derivative
    sigmoid(x), both from e = exp(-|x|) <= 1 (no overflow).  log1p(e) is 2 atanh(s), s = e / (2 + e)
    <= 1/3, whose series to s^17 is exact in fp32."""
    e = tl.exp(-tl.abs(x))
    s = e / (2.0 + e)
    s2 = s * s
    p = 0.11764705882352941  # 2/17
    p = p * s2 + 0.13333333333333333  # 2/15
    p = p * s2 + 0.15384615384615385  # 2/13
    p = p * s2 + 0.18181818181818182  # 2/11
    p = p * s2 + 0.2222222222222222  # 2/9
    p = p * s2 + 0.2857142857142857  # 2/7
    p = p * s2 + 0.4
    p = p * s2 + 0.6666666666666666
    p = p * s2 + 2.0
    sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + s * p)
    sig = tl.where(x > 20.0, 1.0, tl.where(x >= 0.0, 1.0, e) / (1.0 + e))
    return sp, sig


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = x * x  # below 0.2 the series to x^9 is exact in fp32 where 1 - t would cancel
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(ax < 0.2, small, tl.where(x < 0.0, -big, big))


@triton.jit
def _one_minus_exp_over(lam, a):
    """(1 - exp(-lam)) / lam and its derivative (a = exp(-lam)); Taylor series below 0.5, where the
    closed forms cancel (and are 0/0 at lam = 0, which liquid._one_minus_exp_over also guards)."""
    big = tl.maximum(lam, 0.5)  # the unused branch stays finite
    om_big = (1.0 - a) / big
    dom_big = (a - om_big) / big
    om = 2.7557319223985893e-06  # 1/9!, the coefficients of sum_k (-lam)^k / (k+1)!
    om = om * lam - 2.48015873015873e-05
    om = om * lam + 0.0001984126984126984
    om = om * lam - 0.001388888888888889
    om = om * lam + 0.008333333333333333
    om = om * lam - 0.041666666666666664
    om = om * lam + 0.16666666666666666
    om = om * lam - 0.5
    om = om * lam + 1.0
    dom = 2.2045855379188714e-05  # 8/9!: the derivative's
    dom = dom * lam - 0.00017361111111111112
    dom = dom * lam + 0.0011904761904761906
    dom = dom * lam - 0.006944444444444444
    dom = dom * lam + 0.03333333333333333
    dom = dom * lam - 0.125
    dom = dom * lam + 0.3333333333333333
    dom = dom * lam - 0.5
    small = lam < 0.5
    return tl.where(small, om, om_big), tl.where(small, dom, dom_big)


@triton.jit
def _liquid_fwd(Z, INV_TAU, H0, H, H_LAST, TAU_SUM, TAU_MIN, TAU_MAX, T, L,
                HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    inv_tau = tl.load(INV_TAU + cols, mask=mask, other=1.0)
    if HAS_H0:
        h = tl.load(H0 + row * L + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    tau_sum = tl.zeros([BLOCK], dtype=tl.float32)
    tau_min = tl.full([BLOCK], _INF, tl.float32)
    tau_max = tl.full([BLOCK], -_INF, tl.float32)
    z_off = row.to(tl.int64) * T * 2 * L + cols
    h_off = row.to(tl.int64) * T * L + cols
    for _t in range(T):
        f, _sig = _softplus(tl.load(Z + z_off, mask=mask, other=0.0).to(tl.float32))
        v = _tanh(tl.load(Z + z_off + L, mask=mask, other=0.0).to(tl.float32))
        lam = inv_tau + f
        a = tl.exp(-lam)
        om, _dom = _one_minus_exp_over(lam, a)
        h = a * h + om * f * v
        tl.store(H + h_off, h, mask=mask)
        tau = 1.0 / lam
        tau_sum += tau
        tau_min = tl.minimum(tau_min, tau)
        tau_max = tl.maximum(tau_max, tau)
        z_off += 2 * L
        h_off += L
    out = row * L + cols
    tl.store(H_LAST + out, h, mask=mask)
    tl.store(TAU_SUM + out, tau_sum, mask=mask)
    tl.store(TAU_MIN + out, tau_min, mask=mask)
    tl.store(TAU_MAX + out, tau_max, mask=mask)


@triton.jit
def _liquid_bwd(Z, INV_TAU, H0, H, G_H, G_LAST, G_Z, G_INV_TAU, G_H0, T, L,
                HAS_H0: tl.constexpr, HAS_G_H: tl.constexpr, HAS_G_LAST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < L
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    inv_tau = tl.load(INV_TAU + cols, mask=mask, other=1.0)
    if HAS_H0:
        h0 = tl.load(H0 + row * L + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h0 = zero
    if HAS_G_LAST:
        g_last = tl.load(G_LAST + row * L + cols, mask=mask, other=0.0)
    else:
        g_last = zero
    z_off = (row.to(tl.int64) * T + T - 1) * 2 * L + cols
    h_off = (row.to(tl.int64) * T + T - 1) * L + cols
    carry = zero  # a_{t+1} * dL/dh_{t+1}
    g_lam_sum = zero  # sum over t of dL/dlam_t = dL/d(1/tau) from this row
    for i in range(T):
        t = T - 1 - i
        g = carry + tl.where(t == T - 1, g_last, 0.0)
        if HAS_G_H:
            g += tl.load(G_H + h_off, mask=mask, other=0.0)
        # (a block, not a scalar, in the mask: the interpreter cannot `&` a scalar into it)
        later = (tl.zeros([BLOCK], dtype=tl.int32) + t) > 0
        h_prev = tl.where(later, tl.load(H + h_off - L, mask=mask & later, other=0.0), h0)
        f_pre = tl.load(Z + z_off, mask=mask, other=0.0).to(tl.float32)
        v_pre = tl.load(Z + z_off + L, mask=mask, other=0.0).to(tl.float32)
        f, sig = _softplus(f_pre)
        v = _tanh(v_pre)
        lam = inv_tau + f
        a = tl.exp(-lam)
        om, dom = _one_minus_exp_over(lam, a)
        g_lam = g * (dom * f * v - a * h_prev)
        g_f = g * om * v + g_lam
        g_v = g * om * f
        tl.store(G_Z + z_off, g_f * sig, mask=mask)
        tl.store(G_Z + z_off + L, g_v * (1.0 - v * v), mask=mask)
        g_lam_sum += g_lam
        carry = a * g
        z_off -= 2 * L
        h_off -= L
    tl.store(G_INV_TAU + row * L + cols, g_lam_sum, mask=mask)
    if HAS_H0:
        tl.store(G_H0 + row * L + cols, carry, mask=mask)


class _LiquidTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, inv_tau: Tensor, h0: Optional[Tensor]):
        Bsz, T, L2 = z.shape
        L = L2 // 2
        z = z.contiguous()
        h0c = h0.contiguous() if h0 is not None else None
        h = torch.empty((Bsz, T, L), dtype=torch.float32, device=z.device)
        h_last, tau_sum, tau_min, tau_max = (h.new_empty((Bsz, L)) for _ in range(4))
        block, warps = launch_config(Bsz, L, z)
        _liquid_fwd[(Bsz, triton.cdiv(L, block))](
            z, inv_tau, h0c if h0c is not None else z, h, h_last, tau_sum, tau_min, tau_max, T, L,
            HAS_H0=h0c is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(z, inv_tau, h0c, h)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(tau_sum, tau_min, tau_max)
        return h, h_last, tau_sum, tau_min, tau_max

    @staticmethod
    def backward(ctx, g_h: Optional[Tensor], g_last: Optional[Tensor], *_):
        z, inv_tau, h0c, h = ctx.saved_tensors
        Bsz, T, L = h.shape
        # fp32 gradients, cast below: the CPU interpreter truncates bf16 stores where torch rounds.
        g_z = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        g_inv_tau = h.new_empty((Bsz, L))
        g_h0 = h.new_empty((Bsz, L)) if h0c is not None else None
        block, warps = launch_config(Bsz, L, z)
        _liquid_bwd[(Bsz, triton.cdiv(L, block))](
            z, inv_tau, h0c if h0c is not None else z, h,
            g_h.float().contiguous() if g_h is not None else h,
            g_last.float().contiguous() if g_last is not None else h,
            g_z, g_inv_tau, g_h0 if g_h0 is not None else h, T, L,
            HAS_H0=h0c is not None, HAS_G_H=g_h is not None, HAS_G_LAST=g_last is not None,
            BLOCK=block, num_warps=warps)
        g_h0 = g_h0.to(h0c.dtype) if (g_h0 is not None and ctx.needs_input_grad[2]) else None
        return g_z.to(z.dtype), g_inv_tau.sum(0).to(inv_tau.dtype), g_h0


def liquid_scan_triton(z: Tensor, log_tau: Tensor, h0: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, dict]:
    """LiquidScan's recurrence from its projected input z (B, T, 2L) (f_pre, v_pre halves), its log
    time constants (L,) and h0 (B, L) or None -> (h (B, T, L) fp32, final state (B, L) fp32, the
    detached `last_obs` metrics: mean / min / max effective time constant 1/lam)."""
    if z.dtype == torch.float64:
        raise TypeError("liquid_scan_triton computes in fp32; float64 goes through LiquidScan's PyTorch path")
    inv_tau = torch.exp(-log_tau.float())  # here, so autograd carries dL/d(1/tau) on to log_tau
    h, h_last, tau_sum, tau_min, tau_max = _LiquidTriton.apply(z, inv_tau, h0)
    obs = {"liquid_tau": tau_sum.sum() / (z.shape[1] * tau_sum.numel()), "liquid_tau_min": tau_min.amin(),
           "liquid_tau_max": tau_max.amax()}
    return h, h_last, obs
