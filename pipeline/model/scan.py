"""Blocked scans for the model's recurrences, with no per-token Python loop.

Two recurrences live here:

* ``diag_scan(a, b, h0)``: the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` over the time
  axis (dim 1), used by the liquid cell, the LIF membranes and the temporal spike encoder.
* ``selective_scan(u, delta, A, B, C, h0)``: Mamba-1's selective scan
  ``h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t``, ``y_t = C_t . h_t``, fused so the
  (batch, time, d_inner, d_state) tensors of ``selective_scan_ref`` are never materialised in the
  forward pass.

Both use the same *blocked* algorithm.  The sequence of length T is cut into ``nc`` chunks of
``Q ~ sqrt(T)`` tokens.  Pass 1 runs over the Q positions of every chunk at once (each Python step
advances all ``nc`` chunks by one token) and yields each chunk's local end state and total decay.
A (recursive, hence also blocked) scan over the ``nc`` chunk summaries gives every chunk's exact
incoming state; pass 2 repeats the Q steps from those states and writes the outputs.  So a sequence
of T tokens costs about ``2*sqrt(T)`` Python steps instead of T, the arithmetic is the same as the
sequential loop (no log-space tricks, no division by decays, exact in any precision), and the
backward pass is the same algorithm run in reverse time, written by hand (no autograd tape inside).

Everything is computed in float32 when the inputs are float16/bfloat16 (and in float64 when they
are float64), so half-precision training keeps decays and accumulations in full precision.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .kernels import diag_scan_cpu, selective_scan_cpu, use_triton  # noqa: F401 (use_triton: for callers)

# Below this length the carry scan over chunk summaries is a plain loop (it is already short).
_SMALL = 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is scanned in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_size(T: int) -> int:
    return max(1, int(math.ceil(math.sqrt(T))))


# ----------------------------------------------------------------------------------------------
# Diagonal linear recurrence
# ----------------------------------------------------------------------------------------------

def scan_core(a: Tensor, b: Tensor, h0: Optional[Tensor], reverse: bool = False) -> Tensor:
    """No-autograd blocked scan of h_t = a_t h_{t-1} + b_t over dim 1 of (B, T, F) tensors.

    With ``reverse`` the recurrence runs backwards in time: h_t = a_t h_{t+1} + b_t, and ``h0`` is the
    state after the last position.
    """
    Bsz, T, F = b.shape
    if T <= _SMALL:
        out = torch.empty_like(b)
        h = h0 if h0 is not None else torch.zeros((Bsz, F), dtype=b.dtype, device=b.device)
        order = range(T - 1, -1, -1) if reverse else range(T)
        for t in order:
            h = torch.addcmul(b[:, t], a[:, t], h)
            out[:, t] = h
        return out
    Q = chunk_size(T)
    nc = -(-T // Q)
    pad = nc * Q - T
    if pad:
        # Padding sits after the end, so in reverse it is crossed before any real position: it must
        # be the identity step (decay 1, input 0), or it would wipe out the incoming state h0.
        a = torch.nn.functional.pad(a, (0, 0, 0, pad), value=1.0)
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    # Time-position-major layout: one contiguous (B, nc, F) slab per position inside the chunks.
    at = a.view(Bsz, nc, Q, F).permute(2, 0, 1, 3).contiguous()
    bt = b.view(Bsz, nc, Q, F).permute(2, 0, 1, 3).contiguous()
    order = range(Q - 1, -1, -1) if reverse else range(Q)
    # Pass 1: local summary of every chunk (state reached from a zero start) and total decay.
    s = torch.zeros((Bsz, nc, F), dtype=b.dtype, device=b.device)
    for q in order:
        s = torch.addcmul(bt[q], at[q], s)
    P = at.prod(dim=0)
    # Carries: exact state entering each chunk, from a scan over the chunk summaries.
    ends = scan_core(P, s, h0, reverse)  # state at the far edge of each chunk
    carry = torch.empty_like(s)
    if reverse:
        carry[:, :-1] = ends[:, 1:]
        carry[:, -1] = h0 if h0 is not None else 0.0
    else:
        carry[:, 1:] = ends[:, :-1]
        carry[:, 0] = h0 if h0 is not None else 0.0
    # Pass 2: rerun every chunk from its exact carry, writing the outputs.
    out = torch.empty_like(bt)
    h = carry
    for q in order:
        h = torch.addcmul(bt[q], at[q], h, out=out[q])
    out = out.permute(1, 2, 0, 3).reshape(Bsz, nc * Q, F)
    return out[:, :T] if pad else out


class _DiagScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
        h = scan_core(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, h, h0 = ctx.saved_tensors
        # g_t = dL/dh_t (total) satisfies g_t = gh_t + a_{t+1} g_{t+1}: the same scan, reversed.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        g = scan_core(a_next, gh.contiguous(), None, reverse=True)
        if ctx.has_h0:
            h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        else:
            h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        ga = g * h_prev if ctx.needs_input_grad[0] else None
        gh0 = a[:, 0] * g[:, 0] if (ctx.has_h0 and ctx.needs_input_grad[2]) else None
        return ga, g, gh0


def _diag_scan_cpu():
    return diag_scan_cpu()


class _DiagScanCPU(torch.autograd.Function):
    """diag_scan through the fused C++ kernel; ``a`` is (B, T, F) or one element."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
        h0_arg = h0 if h0 is not None else b.new_empty(0)
        h = _diag_scan_cpu().forward(a, b, h0_arg)
        ctx.save_for_backward(a, h, h0_arg)
        ctx.has_h0 = h0 is not None
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, h, h0_arg = ctx.saved_tensors
        need_ga = ctx.needs_input_grad[0]
        g, ga, gh0 = _diag_scan_cpu().backward(a, h, h0_arg, gh.contiguous(), need_ga)
        if need_ga and a.numel() == 1 and h.numel() != 1:
            ga = ga.sum().reshape(a.shape)
        return (ga if need_ga else None), g, (gh0 if ctx.has_h0 and ctx.needs_input_grad[2] else None)


def diag_scan(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1 for a, b of shape (B, T, *F); h0 of shape (B, *F).

    Returns h (B, T, *F) in the compute dtype (float32 for half inputs, float64 for float64).
    On CUDA this is one Triton kernel launch (see use_triton); on CPU one pass of the fused C++
    kernel (kernels/diag_scan.cpp) when it builds; else the blocked scan."""
    if use_triton(b):
        from .kernels.triton_scan import diag_scan_triton

        return diag_scan_triton(a, b, h0)
    Bsz, T = b.shape[:2]
    feat = b.shape[2:]
    cd = compute_dtype(b.dtype)
    if b.device.type == "cpu" and _diag_scan_cpu() is not None:
        # A constant decay stays one element (the kernel broadcasts it), or it is expanded.
        a2 = a.to(cd).reshape(1, 1, 1) if a.numel() == 1 else a.to(cd).expand(b.shape).reshape(Bsz, T, -1)
        b2 = b.to(cd).reshape(Bsz, T, -1)
        h02 = h0.to(cd).reshape(Bsz, -1) if h0 is not None else None
        h = _DiagScanCPU.apply(a2.contiguous(), b2.contiguous(), h02)
        return h.view(Bsz, T, *feat)
    a2 = a.to(cd).expand(b.shape).reshape(Bsz, T, -1)
    b2 = b.to(cd).reshape(Bsz, T, -1)
    h02 = h0.to(cd).reshape(Bsz, -1) if h0 is not None else None
    h = _DiagScan.apply(a2.contiguous(), b2.contiguous(), h02)
    return h.view(Bsz, T, *feat)


def diag_scan_ref(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """Plain sequential reference (autograd through an unbind/stack loop); for tests."""
    h = h0 if h0 is not None else torch.zeros_like(b[:, 0])
    outs = []
    for a_t, b_t in zip(a.expand(b.shape).unbind(1), b.unbind(1)):
        h = a_t * h + b_t
        outs.append(h)
    return torch.stack(outs, dim=1)


# ----------------------------------------------------------------------------------------------
# Mamba-1 selective scan (fused, blocked)
# ----------------------------------------------------------------------------------------------

def _ss_layout(x: Tensor, nc: int, Q: int, pad: int) -> Tensor:
    """(B, T, D) -> (Q, B, nc, D), zero-padded at the end."""
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    Bsz, Tp, D = x.shape
    return x.view(Bsz, nc, Q, D).permute(2, 0, 1, 3).contiguous()


def _ss_unlayout(x: Tensor, T: int) -> Tensor:
    Q, Bsz, nc, D = x.shape
    return x.permute(1, 2, 0, 3).reshape(Bsz, nc * Q, D)[:, :T]


# Per-step working set of the selective scan (elements of one (B, nc, E, N) slab): small enough to
# stay in the last-level cache, which matters more on CPU than the number of Python steps.
_SLAB = 1 << 20
# Materialise all decays exp(delta A) once (instead of recomputing them in every pass) up to this
# many elements; beyond it they are recomputed per step to bound memory.
_CACHE_DECAYS = 1 << 27


def _ss_chunk(T: int, row: int) -> int:
    """Chunk length for a selective scan whose per-token state has ``row`` elements (B * E * N)."""
    return min(T, max(chunk_size(T), -(-T * row // _SLAB)))


_WORKSPACE: dict = {}


def _workspace(name: str, shape, like: Tensor) -> Tensor:
    """A reusable scratch buffer (contents undefined).  Large fresh allocations on CPU are mmap-ed
    and page-faulted on every call, which costs as much as the arithmetic; reusing them does not."""
    numel = math.prod(shape)
    key = (name, like.dtype, like.device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _WORKSPACE[key] = buf
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Free the scratch buffers kept between calls (they hold about B*T*E*N floats per kind)."""
    _WORKSPACE.clear()


class _Decays:
    """exp(delta_q A) for position q of every chunk, optionally materialised once in a workspace."""

    def __init__(self, dl: Tensor, A: Tensor, cache: bool):
        self.dl, self.A = dl, A
        self.full = None
        if cache and dl.numel() * A.shape[1] <= _CACHE_DECAYS:
            self.full = _workspace("decays", (*dl.shape, A.shape[1]), dl)
            torch.mul(dl.unsqueeze(-1), A, out=self.full).exp_()

    def __getitem__(self, q: int) -> Tensor:
        if self.full is not None:
            return self.full[q]
        return torch.exp(self.dl[q].unsqueeze(-1) * self.A)


class _SelectiveScan(torch.autograd.Function):
    """y_t[e] = sum_n C_t[n] h_t[e, n],  h_t = exp(delta_t[e] A[e, n]) h_{t-1} + delta_t[e] u_t[e] B_t[n].

    Inputs (compute dtype): u, delta (B, T, E); A (E, N); Bm, Cm (B, T, N); h0 (B, E, N) or None.
    Outputs: y (B, T, E), h_last (B, E, N).
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0):
        Bsz, T, E = u.shape
        N = A.shape[1]
        Q = _ss_chunk(T, Bsz * E * N)
        nc = -(-T // Q)
        pad = nc * Q - T
        # Padded steps have delta = 0: decay 1, input 0, so they carry the state unchanged.
        dl = _ss_layout(delta, nc, Q, pad)            # (Q, B, nc, E)
        du = _ss_layout(delta * u, nc, Q, pad)        # (Q, B, nc, E)
        Bl = _ss_layout(Bm, nc, Q, pad)               # (Q, B, nc, N)
        Cl = _ss_layout(Cm, nc, Q, pad)
        dA = _Decays(dl, A, cache=True)
        # Pass 1: local chunk end states from zero, and the chunks' total decays.
        if nc > 1:
            s = torch.zeros((Bsz, nc, E, N), dtype=u.dtype, device=u.device)
            for q in range(Q):
                s.mul_(dA[q])
                s.addcmul_(du[q].unsqueeze(-1), Bl[q].unsqueeze(-2))
            P = torch.exp(dl.sum(0).unsqueeze(-1) * A)    # (B, nc, E, N)
            ends = scan_core(P.view(Bsz, nc, E * N), s.view(Bsz, nc, E * N),
                              h0.reshape(Bsz, E * N) if h0 is not None else None).view(Bsz, nc, E, N)
            carry = torch.empty_like(s)
            carry[:, 1:] = ends[:, :-1]
            carry[:, 0] = h0 if h0 is not None else 0.0
        else:
            carry = (h0.unsqueeze(1).clone() if h0 is not None
                     else torch.zeros((Bsz, 1, E, N), dtype=u.dtype, device=u.device))
        # Pass 2: rerun from exact carries, contracting with C as we go.
        y = torch.empty((Q, Bsz, nc, E), dtype=u.dtype, device=u.device)
        h = carry.clone()
        for q in range(Q):
            h.mul_(dA[q])
            h.addcmul_(du[q].unsqueeze(-1), Bl[q].unsqueeze(-2))
            torch.matmul(h, Cl[q].unsqueeze(-1), out=y[q].unsqueeze(-1))
        h_last = h[:, -1].clone()
        ctx.save_for_backward(u, delta, A, Bm, Cm, carry)
        ctx.has_h0 = h0 is not None
        ctx.meta = (Q, nc, pad)
        return _ss_unlayout(y, T), h_last

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, A, Bm, Cm, carry = ctx.saved_tensors
        Q, nc, pad = ctx.meta
        Bsz, T, E = u.shape
        N = A.shape[1]
        if gy is None:
            gy = torch.zeros_like(u)
        dl = _ss_layout(delta, nc, Q, pad)
        ul = _ss_layout(u, nc, Q, pad)
        du = dl * ul
        Bl = _ss_layout(Bm, nc, Q, pad)
        Cl = _ss_layout(Cm, nc, Q, pad)
        gyl = _ss_layout(gy.contiguous(), nc, Q, pad)
        dA = _Decays(dl, A, cache=True)
        # Recompute all states (one (Q, B, nc, E, N) buffer, reused across calls).
        H = _workspace("states", (Q, Bsz, nc, E, N), u)
        h = carry
        for q in range(Q):
            h = torch.mul(h, dA[q], out=H[q])
            h.addcmul_(du[q].unsqueeze(-1), Bl[q].unsqueeze(-2))
        # Let G_t = dL/dh_{t-1} through the recurrence = dA_t * (G_{t+1} + C_t gy_t).
        Gin = torch.zeros((Bsz, nc, E, N), dtype=u.dtype, device=u.device)
        if gh_last is not None:
            Gin[:, -1] = gh_last
        if nc > 1:
            # Pass 1 (reverse): local G at each chunk's first position from a zero incoming gradient.
            s = torch.zeros((Bsz, nc, E, N), dtype=u.dtype, device=u.device)
            for q in range(Q - 1, -1, -1):
                s.addcmul_(gyl[q].unsqueeze(-1), Cl[q].unsqueeze(-2))
                s.mul_(dA[q])
            P = torch.exp(dl.sum(0).unsqueeze(-1) * A)
            g_end = gh_last.reshape(Bsz, E * N) if gh_last is not None else None
            starts = scan_core(P.view(Bsz, nc, E * N), s.view(Bsz, nc, E * N), g_end,
                                reverse=True).view(Bsz, nc, E, N)
            Gin[:, :-1] = starts[:, 1:]
        # Pass 2 (reverse): exact gradients, position by position across all chunks.
        g_du = torch.empty((Q, Bsz, nc, E), dtype=u.dtype, device=u.device)
        g_B = torch.empty((Q, Bsz, nc, N), dtype=u.dtype, device=u.device)
        g_C = torch.empty((Q, Bsz, nc, N), dtype=u.dtype, device=u.device)
        g_dlogA = torch.empty((Q, Bsz, nc, E), dtype=u.dtype, device=u.device)
        accA = torch.zeros((Bsz, nc, E, N), dtype=u.dtype, device=u.device)
        X = torch.empty((Bsz, nc, E, N), dtype=u.dtype, device=u.device)
        G = Gin
        for q in range(Q - 1, -1, -1):
            gh = torch.addcmul(G, gyl[q].unsqueeze(-1), Cl[q].unsqueeze(-2))   # dL/dh_q
            torch.matmul(gyl[q].unsqueeze(-2), H[q], out=g_C[q].unsqueeze(-2))
            torch.matmul(gh, Bl[q].unsqueeze(-1), out=g_du[q].unsqueeze(-1))
            torch.matmul(du[q].unsqueeze(-2), gh, out=g_B[q].unsqueeze(-2))
            G = gh.mul_(dA[q])                                                  # dL/dh_{q-1}
            torch.mul(G, H[q - 1] if q > 0 else carry, out=X)                   # dL/d(delta_q A)
            accA.addcmul_(X, dl[q].unsqueeze(-1))
            X.mul_(A)
            torch.sum(X, dim=-1, out=g_dlogA[q])
        g_du = _ss_unlayout(g_du, T)
        g_u = g_du * delta
        g_delta = g_du * u + _ss_unlayout(g_dlogA, T)
        g_A = accA.sum(dim=(0, 1))
        g_Bm = _ss_unlayout(g_B, T)
        g_Cm = _ss_unlayout(g_C, T)
        g_h0 = G[:, 0] if ctx.has_h0 else None
        return g_u, g_delta, g_A, g_Bm, g_Cm, g_h0


class _SelectiveScanCPU(torch.autograd.Function):
    """The same scan through the fused C++ kernel (`kernels/selective_scan.cpp`): one pass over time
    per (batch row, channel) with the state in registers; the backward recomputes the states."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0):
        h0_arg = h0 if h0 is not None else u.new_empty(0)
        y, h_last = selective_scan_cpu().forward(u, delta, A, Bm, Cm, h0_arg)
        ctx.save_for_backward(u, delta, A, Bm, Cm, h0_arg)
        ctx.has_h0 = h0 is not None
        return y, h_last

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, A, Bm, Cm, h0_arg = ctx.saved_tensors
        gy = gy.contiguous() if gy is not None else torch.zeros_like(u)
        gh = gh_last.contiguous() if gh_last is not None else u.new_empty(0)
        g_u, g_delta, g_A, g_B, g_C, g_h0 = selective_scan_cpu().backward(u, delta, A, Bm, Cm, h0_arg, gy, gh)
        return g_u, g_delta, g_A, g_B, g_C, (g_h0 if ctx.has_h0 else None)


def _fused_cpu_available(u: Tensor) -> bool:
    return u.device.type == "cpu" and selective_scan_cpu() is not None


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor,
                   h0: Optional[Tensor] = None, method: str = "auto") -> Tuple[Tensor, Tensor]:
    """Mamba-1 selective scan without the D skip and the z gate.

    u, delta: (B, T, E) (delta already softplus-ed); A: (E, N) (negative); Bm, Cm: (B, T, N);
    h0: (B, E, N).  Returns y (B, T, E) and the final state (B, E, N), in the compute dtype.
    ``method``: "auto" (the fused C++ kernel on CPU when it builds, else the blocked scan),
    "fused" or "blocked"."""
    cd = compute_dtype(u.dtype)
    args = [t.to(cd).contiguous() for t in (u, delta, A, Bm, Cm)]
    h0c = h0.to(cd).contiguous() if h0 is not None else None
    if method == "fused" or (method == "auto" and _fused_cpu_available(u)):
        return _SelectiveScanCPU.apply(*args, h0c)
    return _SelectiveScan.apply(*args, h0c)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor,
                       h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The sequential math of mamba_ssm's ``selective_scan_ref`` (real A, ungrouped B/C, no D/z)."""
    deltaA = torch.exp(torch.einsum("bte,en->bten", delta, A))
    deltaBu = torch.einsum("bte,btn,bte->bten", delta, Bm, u)
    h = h0 if h0 is not None else torch.zeros_like(deltaA[:, 0])
    ys = []
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(1), deltaBu.unbind(1), Cm.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append(torch.einsum("ben,bn->be", h, C_t))
    return torch.stack(ys, dim=1), h
