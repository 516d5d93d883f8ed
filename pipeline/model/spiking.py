"""Leaky integrate-and-fire neurons whose membranes are carried across tokens, and spike encoders.

LIF dynamics (one sub-step n; each token is integrated for ``num_spike_steps`` = K sub-steps with
its input current held constant, so a sequence of T tokens is T*K sub-steps):

    U_n = beta * V_{n-1} + I_n           (charge; U is the membrane before the reset)
    S_n = Heaviside(U_n - threshold)      (spike)
    V_n = U_n - threshold * S_n           (reset "subtract")   |  U_n * (1 - S_n)  ("zero")  |  U_n ("none")

The reset is detached from the gradient (as in snntorch), and the spike's gradient is a surrogate.

How the sequence is processed (the reset makes the membrane nonlinear):

1. *Which* neurons spike is a threshold decision with no gradient.  :func:`lif_spikes` makes it with
   a sequential sweep over the T*K sub-steps that carries no autograd graph.  On CPU the sweep is a
   fused C++ kernel (`kernels/lif_sweep.cpp`: one pass per batch row; 0.28 ms where the tensor-op
   loop takes 11.6 ms for B8 x 1024 x 128, `bench/bench_model.py --components`); elsewhere, or without a compiler, it is a loop of three
   in-place ops on a (B, S) slab per sub-step, time-major so every slab is contiguous.  (On CUDA
   none of this runs: LIF.forward is one fused Triton kernel each way, `kernels/triton_lif.py`.)
   The sweep was chosen because it measured fastest: an exact *chunked* alternative
   (``method="chunked"``: all chunks of ~sqrt(T*K) sub-steps run at once from guessed incoming
   membranes, the exact membrane implied by those spikes is recomputed with one blocked linear scan,
   every spike is checked against it, and the chunks are rerun from the corrected edge membranes
   until nothing changes; each round fixes at least one more chunk) needs ~10 rounds at beta = 0.95
   because the membranes remember across chunks, and was 3-5x slower (bench numbers in
   docs/MODEL.md).  At beta <= 0.5 both cost the same.
2. Given those (detached) spikes the membrane is a *linear* recurrence in the input current:
   subtract: U_n = beta U_{n-1} + I_n - beta*thr*S_{n-1};  zero: U_n = beta (1 - S_{n-1}) U_{n-1} + I_n.
   It is computed, differentiably, with the blocked :func:`diag_scan` (no per-token loop), and so is
   the backward pass.
3. The spikes' values are the hard spikes; their gradient is the surrogate at U - threshold.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import lif_sweep, use_triton
from .scan import chunk_size, compute_dtype, diag_scan, scan_core


# ----------------------------------------------------------------------------------------------
# Surrogate spike function
# ----------------------------------------------------------------------------------------------

class _Spike(torch.autograd.Function):
    """Forward: the given hard spikes.  Backward: surrogate derivative at x = U - threshold."""

    @staticmethod
    def forward(ctx, x: Tensor, hard: Tensor, kind: str, slope: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.kind, ctx.slope = kind, slope
        return hard.to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        return g * surrogate_grad(x, ctx.kind, ctx.slope), None, None, None


def surrogate_grad(x: Tensor, kind: str, slope: float) -> Tensor:
    if kind == "atan":  # snntorch atan: (alpha/2) / (1 + (pi alpha x / 2)^2)
        return (slope / 2) / (1 + (math.pi * slope * x / 2) ** 2)
    if kind == "fast_sigmoid":  # snntorch fast_sigmoid: 1 / (slope |x| + 1)^2
        return 1.0 / (slope * x.abs() + 1.0) ** 2
    raise ValueError(f"unknown surrogate {kind!r}")


# ----------------------------------------------------------------------------------------------
# Hard spikes (no gradient)
# ----------------------------------------------------------------------------------------------

def _reset(u: Tensor, s: Tensor, thr: float, mode: str) -> Tensor:
    if mode == "subtract":
        return u - thr * s
    if mode == "zero":
        return u * (1 - s)
    return u


def lif_spikes_loop(I: Tensor, v0: Optional[Tensor], beta: float, thr: float, mode: str) -> Tensor:
    """Hard spikes of I (B, N, S), sub-step by sub-step (no autograd; time-major, in place)."""
    It = I.transpose(0, 1).contiguous()                        # (N, B, S)
    out = torch.empty_like(It)
    v = v0.clone() if v0 is not None else torch.zeros_like(It[0])
    for n in range(It.shape[0]):
        u = torch.add(It[n], v, alpha=beta)
        s = out[n]
        s.copy_(u >= thr)
        if mode == "subtract":
            v = u.sub_(s, alpha=thr)
        elif mode == "zero":
            v = u.mul_(1 - s)
        else:
            v = u
    return out.transpose(0, 1)


def _membrane_coeffs(I: Tensor, S: Tensor, beta: float, thr: float, mode: str):
    """(a, b) of the linear recurrence U_n = a_n U_{n-1} + b_n given detached spikes S (U_{-1} = v0)."""
    S_prev = torch.cat([torch.zeros_like(S[:, :1]), S[:, :-1]], dim=1)
    if mode == "subtract":
        return I.new_full((1, 1, 1), beta), I - (beta * thr) * S_prev
    if mode == "zero":
        return beta * (1 - S_prev), I
    return I.new_full((1, 1, 1), beta), I


@torch.no_grad()
def lif_spikes(I: Tensor, v0: Optional[Tensor], beta: float, thr: float, mode: str,
               method: str = "auto", max_rounds: Optional[int] = None) -> Tensor:
    """Exact hard spikes of the LIF recurrence for I (B, N, S) (see the module docstring).

    `auto`: the fused CPU kernel (one pass over time per batch row, ~50x the tensor-op loop) on CPU,
    the tensor-op loop elsewhere; `loop`; `chunked`."""
    Bsz, N, S = I.shape
    if method == "auto":
        fused = lif_sweep(I, v0 if v0 is not None else I.new_zeros((Bsz, S)), beta, thr, mode)
        if fused is not None:
            return fused
        method = "loop"
    if method == "loop" or N <= 16:
        return lif_spikes_loop(I, v0, beta, thr, mode)
    Q = chunk_size(N)
    nc = -(-N // Q)
    pad = nc * Q - N
    Ip = F.pad(I, (0, 0, 0, pad)) if pad else I
    It = Ip.view(Bsz, nc, Q, S).permute(2, 0, 1, 3).contiguous()  # (Q, B, nc, S)
    tol = (1e-9 if I.dtype == torch.float64 else 1e-4) * max(thr, 1.0)
    carry = torch.zeros((Bsz, nc, S), dtype=I.dtype, device=I.device)
    if v0 is not None:
        carry[:, 0] = v0
    St = torch.empty_like(It)
    rounds = max_rounds if max_rounds is not None else nc + 1
    for _ in range(rounds):
        v = carry
        for q in range(Q):
            u = torch.add(It[q], v, alpha=beta)
            sq = St[q]
            sq.copy_(u >= thr)
            v = _reset(u, sq, thr, mode)
        Sp = St.permute(1, 2, 0, 3).reshape(Bsz, nc * Q, S)
        a, b = _membrane_coeffs(Ip, Sp, beta, thr, mode)
        U = scan_core(a.expand_as(b).contiguous(), b.contiguous(), v0)
        bad = (Sp != (U >= thr).to(Sp.dtype)) & ((U - thr).abs() > tol)
        if not bool(bad.any()):
            break
        Uc = U.view(Bsz, nc, Q, S)[:, :-1, -1]
        Sc = Sp.view(Bsz, nc, Q, S)[:, :-1, -1]
        carry = carry.clone()
        carry[:, 1:] = _reset(Uc, Sc, thr, mode)
    return Sp[:, :N]


# ----------------------------------------------------------------------------------------------
# LIF layer
# ----------------------------------------------------------------------------------------------

class LIF(nn.Module):
    """Parameter-free LIF population; membranes carried across tokens (and across calls via state)."""

    def __init__(self, beta: float, threshold: float, num_steps: int, reset: str, surrogate: str,
                 slope: float):
        super().__init__()
        self.beta, self.threshold, self.num_steps = float(beta), float(threshold), int(num_steps)
        self.reset, self.surrogate, self.slope = reset, surrogate, float(slope)

    def forward(self, current: Tensor, v0: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """current (B, T, S) -> (spike rate per token (B, T, S) with surrogate gradient,
        membrane potential at the token's last sub-step (B, T, S), final membrane (B, S),
        hard spikes' mean (detached scalar))."""
        if use_triton(current):
            from .kernels.triton_lif import lif_forward_triton

            return lif_forward_triton(current, v0, self.beta, self.threshold, self.num_steps, self.reset,
                                      self.surrogate, self.slope)
        Bsz, T, S = current.shape
        K = self.num_steps
        cd = compute_dtype(current.dtype)
        I = current.to(cd)
        if K > 1:
            I = I.unsqueeze(2).expand(Bsz, T, K, S).reshape(Bsz, T * K, S)
        v0c = v0.to(cd) if v0 is not None else None
        hard = lif_spikes(I.detach(), v0c.detach() if v0c is not None else None,
                          self.beta, self.threshold, self.reset)
        a, b = _membrane_coeffs(I, hard, self.beta, self.threshold, self.reset)
        U = diag_scan(a, b, v0c)
        spikes = _Spike.apply(U - self.threshold, hard, self.surrogate, self.slope)
        # A copy: the membrane is kept as state and must not pin the whole (B, T*K, S) U.
        v_end = _reset(U[:, -1].clone(), hard[:, -1], self.threshold, self.reset)
        if K > 1:
            rate = spikes.view(Bsz, T, K, S).mean(2)
            mem = U.view(Bsz, T, K, S)[:, :, -1]
        else:
            rate, mem = spikes, U
        return rate, mem, v_end, hard.mean().detach()


# ----------------------------------------------------------------------------------------------
# Spike -> Mamba encoders (all causal)
# ----------------------------------------------------------------------------------------------

class SpikeEncoder(nn.Module):
    """Encodes the spike stream for the Mamba branch, looking only backwards.

    rate:      mean spike rate over the last ``window`` tokens (a trailing box filter).
    temporal:  exponentially decaying trace e_t = rho e_{t-1} + (1 - rho) s_t, rho = exp(-1/tau)
               (the causal exp(-k/tau) kernel, un-truncated, normalised to a rate).
    potential: the membrane potential itself (continuous, differentiable everywhere).
    """

    def __init__(self, method: str, tau: float, window: int):
        super().__init__()
        self.method, self.tau, self.window = method, float(tau), int(window)

    def init_state(self, batch: int, units: int, device, dtype):
        if self.method == "rate":
            return torch.zeros((batch, max(self.window - 1, 0), units), device=device, dtype=dtype)
        if self.method == "temporal":
            return torch.zeros((batch, units), device=device, dtype=dtype)
        return None

    def forward(self, spikes: Tensor, membrane: Tensor, state=None):
        if self.method == "potential":
            return membrane, None
        if self.method == "rate":
            W = self.window
            Bsz, T, S = spikes.shape
            if state is None:
                state = spikes.new_zeros((Bsz, W - 1, S))
            x = torch.cat([state.to(spikes.dtype), spikes], dim=1)       # (B, W-1+T, S)
            out = F.avg_pool1d(x.transpose(1, 2), kernel_size=W, stride=1).transpose(1, 2)
            return out, x[:, x.shape[1] - (W - 1):].clone()  # a copy: the window must not pin x
        rho = math.exp(-1.0 / self.tau)
        a = torch.full_like(spikes[:1, :1], rho)
        e = diag_scan(a, (1 - rho) * spikes, state)
        return e.to(spikes.dtype), e[:, -1].clone()  # a copy: the trace must not pin e
