"""Triton kernels for the LIF layer (spiking.LIF) on the GPU: the whole sweep in one launch.

Forward: one program owns BLOCK units of one batch row and walks the T tokens x K sub-steps with the
membrane in fp32 registers:  U = beta*V + I,  S = [U >= thr],  V = reset(U, S).  It writes the spike
rate per token, U at each token's last sub-step (`mem`) and the final membrane.

Backward (reverse in time), the gradient of the PyTorch path exactly: the reset is detached, so given
the spikes the membrane is the linear recurrence U_n = a_n U_{n-1} + I_n + const with a_n = beta
(subtract, none) or beta*(1 - S_{n-1}) (zero), and a spike's gradient is the surrogate at U - thr.
Nothing is saved but `mem`: the membrane entering token t is reset(mem_{t-1}), from which the K
sub-steps are recomputed, and the token's K-step stretch of the reverse recurrence is folded into
two forward-running sums (see _lif_bwd), so the inner loop never runs backwards.

Why our own kernel: no library runs a LIF recurrence with a threshold and a reset (snntorch and
spikingjelly step in Python or through CuPy, one time step per call).  Imported only when a CUDA
tensor reaches the model (or directly by the tests, under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_scan import launch_config

_MODES = {"subtract": 0, "zero": 1, "none": 2}
_SURROGATES = {"atan": 0, "fast_sigmoid": 1}


@triton.jit
def _reset(u, s, thr, MODE: tl.constexpr):
    if MODE == 0:
        v = u - thr * s
    elif MODE == 1:
        v = u * (1.0 - s)
    else:
        v = u
    return v


@triton.jit
def _surrogate(x, slope, atan_scale, KIND: tl.constexpr):
    """spiking.surrogate_grad; atan_scale = pi * slope / 2."""
    if KIND == 0:
        w = atan_scale * x
        d = (slope * 0.5) / (1.0 + w * w)
    else:
        r = slope * tl.abs(x) + 1.0
        d = 1.0 / (r * r)
    return d


@triton.jit
def _lif_fwd(I, V0, RATE, MEM, VEND, T, S, K, beta, thr,
             MODE: tl.constexpr, HAS_V0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    if HAS_V0:
        v = tl.load(V0 + row * S + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
    off = row.to(tl.int64) * T * S + cols
    for _ in range(T):
        x = tl.load(I + off, mask=mask, other=0.0).to(tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.float32)
        u = v
        for _k in range(K):
            u = beta * v + x  # the C++ sweep's order, so the spikes are bit-identical in fp32
            s = (u >= thr).to(tl.float32)
            count += s
            v = _reset(u, s, thr, MODE)
        tl.store(RATE + off, count / K, mask=mask)
        tl.store(MEM + off, u, mask=mask)
        off += S
    tl.store(VEND + row * S + cols, v, mask=mask)


@triton.jit
def _lif_bwd(I, V0, MEM, G_RATE, G_MEM, G_VEND, G_I, G_V0, T, S, K, beta, thr, slope, atan_scale,
             MODE: tl.constexpr, SURROGATE: tl.constexpr, HAS_V0: tl.constexpr, HAS_G_RATE: tl.constexpr,
             HAS_G_MEM: tl.constexpr, HAS_G_VEND: tl.constexpr, BLOCK: tl.constexpr):
    # Within token t (sub-steps k = 0..K-1, then k = K: the next token's first) the total gradient
    # G_k = d_k + a_{k+1} G_{k+1}, with d_k the direct gradient on U_k.  Unrolled:
    #   sum_k G_k = sum_j C_j d_j + a_K C_{K-1} G_K,   C_j = a_j C_{j-1} + 1   (C_0 = 1)
    #   G_0       = sum_j P_j d_j + a_K P_{K-1} G_K,   P_j = a_j P_{j-1}       (P_0 = 1)
    # so one forward pass over the sub-steps gives dL/dI_t = sum_k G_k and the G_0 carried back.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < S
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_V0:
        v0 = tl.load(V0 + row * S + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        v0 = zero
    if HAS_G_VEND:
        g_vend = tl.load(G_VEND + row * S + cols, mask=mask, other=0.0)
    else:
        g_vend = zero
    off = (row.to(tl.int64) * T + T - 1) * S + cols
    G = zero  # dL/dU at the first sub-step of token t + 1
    for i in range(T):
        t = T - 1 - i
        # Membrane entering token t: reset of the previous token's last U, as in the forward pass.
        # (a block, not a scalar, in the mask: the interpreter cannot `&` a scalar into it)
        later = (tl.zeros([BLOCK], dtype=tl.int32) + t) > 0
        m_prev = tl.load(MEM + off - S, mask=mask & later, other=0.0)
        v = tl.where(later, _reset(m_prev, (m_prev >= thr).to(tl.float32), thr, MODE), v0)
        x = tl.load(I + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_G_RATE:
            g_spike = tl.load(G_RATE + off, mask=mask, other=0.0) / K
        else:
            g_spike = zero
        if HAS_G_MEM:
            g_mem = tl.load(G_MEM + off, mask=mask, other=0.0)
        else:
            g_mem = zero
        a = zero + 1.0
        C = zero
        P = zero + 1.0
        sum_c = zero
        sum_p = zero
        for k in range(K):
            u = beta * v + x
            s = (u >= thr).to(tl.float32)
            d = g_spike * _surrogate(u - thr, slope, atan_scale, SURROGATE)
            if MODE == 1:
                g_end = g_vend * (1.0 - s)  # v_end = U (1 - S)
            else:
                g_end = g_vend
            d += tl.where(k == K - 1, g_mem + tl.where(t == T - 1, g_end, 0.0), 0.0)
            C = a * C + 1.0
            P = a * P
            sum_c += C * d
            sum_p += P * d
            v = _reset(u, s, thr, MODE)
            if MODE == 1:
                a = beta * (1.0 - s)
            else:
                a = zero + beta
        tl.store(G_I + off, sum_c + a * C * G, mask=mask)
        G = sum_p + a * P * G
        off -= S
    if HAS_V0:
        tl.store(G_V0 + row * S + cols, beta * G, mask=mask)  # U_0 = beta v0 + I_0


class _LIFTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current: Tensor, v0: Optional[Tensor], beta: float, thr: float, K: int, mode: str,
                surrogate: str, slope: float):
        Bsz, T, S = current.shape
        current = current.contiguous()
        v0c = v0.contiguous() if v0 is not None else None
        rate = torch.empty((Bsz, T, S), dtype=torch.float32, device=current.device)
        mem = torch.empty_like(rate)
        v_end = rate.new_empty((Bsz, S))
        block, warps = launch_config(Bsz, S, current)
        _lif_fwd[(Bsz, triton.cdiv(S, block))](
            current, v0c if v0c is not None else current, rate, mem, v_end, T, S, K, beta, thr,
            MODE=_MODES[mode], HAS_V0=v0c is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(current, v0c, mem)
        ctx.params = (beta, thr, K, mode, surrogate, slope)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its loads are skipped
        return rate, mem, v_end

    @staticmethod
    def backward(ctx, g_rate: Optional[Tensor], g_mem: Optional[Tensor], g_vend: Optional[Tensor]):
        current, v0c, mem = ctx.saved_tensors
        beta, thr, K, mode, surrogate, slope = ctx.params
        Bsz, T, S = current.shape
        # fp32 gradients, cast below: the CPU interpreter truncates bf16 stores where torch rounds.
        g_current = torch.empty_like(mem)
        g_v0 = torch.empty((Bsz, S), dtype=torch.float32, device=mem.device) if v0c is not None else None
        block, warps = launch_config(Bsz, S, current)
        _lif_bwd[(Bsz, triton.cdiv(S, block))](
            current, v0c if v0c is not None else current, mem,
            *[g.float().contiguous() if g is not None else mem for g in (g_rate, g_mem, g_vend)],
            g_current, g_v0 if g_v0 is not None else mem, T, S, K, beta, thr, slope, math.pi * slope / 2,
            MODE=_MODES[mode], SURROGATE=_SURROGATES[surrogate], HAS_V0=v0c is not None,
            HAS_G_RATE=g_rate is not None, HAS_G_MEM=g_mem is not None, HAS_G_VEND=g_vend is not None,
            BLOCK=block, num_warps=warps)
        g_current = g_current.to(current.dtype) if ctx.needs_input_grad[0] else None
        g_v0 = g_v0.to(v0c.dtype) if (g_v0 is not None and ctx.needs_input_grad[1]) else None
        return g_current, g_v0, None, None, None, None, None, None


def lif_forward_triton(current: Tensor, v0: Optional[Tensor], beta: float, threshold: float, num_steps: int,
                       reset: str, surrogate: str, slope: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """spiking.LIF.forward on the GPU: current (B, T, S) fp32/bf16/fp16 and v0 (B, S) or None ->
    (rate (B, T, S) with the surrogate gradient, mem (B, T, S), v_end (B, S), hard spikes' mean),
    all fp32 (the compute dtype of these inputs)."""
    if current.dtype == torch.float64:
        raise TypeError("lif_forward_triton computes in fp32; float64 goes through LIF's PyTorch path")
    if reset not in _MODES or surrogate not in _SURROGATES:
        raise ValueError(f"unknown reset {reset!r} or surrogate {surrogate!r}")
    rate, mem, v_end = _LIFTriton.apply(current, v0, float(beta), float(threshold), int(num_steps), reset,
                                        surrogate, float(slope))
    # The rate is a mean of hard spikes over the K sub-steps, so its mean is the hard spikes' mean.
    return rate, mem, v_end, rate.detach().mean()
