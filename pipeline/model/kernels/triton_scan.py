"""Triton kernel for the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t (see scan.diag_scan).

One program owns BLOCK features of one batch row and walks the sequence in time with its state in
registers (fp32 whatever the input dtype), so the whole scan is one launch instead of the ~2 sqrt(T)
Python steps of the blocked scan.  The backward pass is the same walk in reverse time.  A decay `a`
that broadcasts (a scalar, or one value per unit) is read through stride-0 strides, never expanded.

Why our own kernel rather than a library's: each would be a new dependency for one recurrence, and
neither fits as is: accelerated-scan wants (batch, dim, time) tensors (its CUDA kernel also
power-of-two lengths), fla's HGRN scan takes the decay as a log (no a = 0, the LIF's zero reset),
and both want a full-size `a` where ours is often one broadcast value.

Imported only when a CUDA tensor reaches the model (or directly, by the tests, under
TRITON_INTERPRET=1), so CPU runs never import triton.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(rows: int, width: int, x: Tensor) -> Tuple[int, int]:
    """(BLOCK, num_warps) for a kernel with one program per (row, BLOCK units) that loops over time.

    The loop is latency-bound (each step waits for its loads), so on a GPU more, narrower programs
    beat fewer wide ones until every SM holds several; the CPU interpreter runs the programs one
    after another, so there the widest block is the fastest."""
    block = min(128, triton.next_power_of_2(width))
    if x.is_cuda:
        target = 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        while block > 32 and rows * triton.cdiv(width, block) < target:
            block //= 2
    return block, max(1, block // 32)


@triton.jit
def _diag_scan_fwd(A, B, H0, H, T, F, sa_b, sa_t, sa_f, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    if HAS_H0:
        h = tl.load(H0 + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK], dtype=tl.float32)
    a_ptrs = A + row.to(tl.int64) * sa_b + cols * sa_f
    off = row.to(tl.int64) * T * F + cols
    for _ in range(T):
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(B + off, mask=mask, other=0.0).to(tl.float32)
        h = a * h + x
        tl.store(H + off, h, mask=mask)
        a_ptrs += sa_t
        off += F


@triton.jit
def _diag_scan_bwd(A, H0, H, GH, GA, GB, GH0, T, F, sa_b, sa_t, sa_f,
                   HAS_H0: tl.constexpr, NEED_GA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    if HAS_H0:
        h0 = tl.load(H0 + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK], dtype=tl.float32)
    a_ptrs = A + row.to(tl.int64) * sa_b + cols * sa_f + (T - 1) * sa_t
    off = (row.to(tl.int64) * T + T - 1) * F + cols
    carry = tl.zeros([BLOCK], dtype=tl.float32)  # a_{t+1} * dL/dh_{t+1}
    for i in range(T):
        t = T - 1 - i
        g = carry + tl.load(GH + off, mask=mask, other=0.0)  # dL/dh_t, total
        tl.store(GB + off, g, mask=mask)
        if NEED_GA:
            # (a block, not a scalar, in the mask: the interpreter cannot `&` a scalar into it)
            later = (tl.zeros([BLOCK], dtype=tl.int32) + t) > 0
            h_prev = tl.where(later, tl.load(H + off - F, mask=mask & later, other=0.0), h0)
            tl.store(GA + off, g * h_prev, mask=mask)
        carry = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32) * g
        a_ptrs -= sa_t
        off -= F
    if HAS_H0:
        tl.store(GH0 + row * F + cols, carry, mask=mask)


class _DiagScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Optional[Tensor]) -> Tensor:
        Bsz, T = b.shape[:2]
        b = b.contiguous()
        F = b[0, 0].numel()
        # A view of `a` with stride 0 along every broadcast dim (reshape copies only where the
        # feature dims of `a` cannot be flattened into one stride).
        a3 = a.expand(b.shape).reshape(Bsz, T, F)
        h0c = h0.contiguous() if h0 is not None else None
        h = torch.empty(b.shape, dtype=torch.float32, device=b.device)
        block, warps = launch_config(Bsz, F, b)
        _diag_scan_fwd[(Bsz, triton.cdiv(F, block))](
            a3, b, h0c if h0c is not None else b, h, T, F, *a3.stride(),
            HAS_H0=h0c is not None, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(a3, h, h0c)
        ctx.a_shape, ctx.a_dtype, ctx.b_dtype = a.shape, a.dtype, b.dtype
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        a3, h, h0c = ctx.saved_tensors
        Bsz, T, F = a3.shape
        need_ga = ctx.needs_input_grad[0]
        gb = torch.empty_like(h)
        ga = torch.empty_like(h) if need_ga else gb
        gh0 = torch.empty(h0c.shape, dtype=torch.float32, device=h.device) if h0c is not None else gb
        block, warps = launch_config(Bsz, F, h)
        _diag_scan_bwd[(Bsz, triton.cdiv(F, block))](
            a3, h0c if h0c is not None else h, h, gh.float().contiguous(), ga, gb, gh0, T, F,
            *a3.stride(), HAS_H0=h0c is not None, NEED_GA=need_ga, BLOCK=block, num_warps=warps)
        # As autograd does for the PyTorch path: broadcast dims of `a` are summed, grads take their
        # input's dtype (the kernel writes fp32: the CPU interpreter truncates bf16 stores).
        ga = ga.sum_to_size(ctx.a_shape).to(ctx.a_dtype) if need_ga else None
        gb = gb.to(ctx.b_dtype) if ctx.needs_input_grad[1] else None
        gh0 = gh0.to(h0c.dtype) if (h0c is not None and ctx.needs_input_grad[2]) else None
        return ga, gb, gh0


def diag_scan_triton(a: Tensor, b: Tensor, h0: Optional[Tensor] = None) -> Tensor:
    """scan.diag_scan on the GPU: h_t = a_t * h_{t-1} + b_t along dim 1 of b (B, T, *F), with `a`
    broadcastable to b and h0 of shape (B, *F).  Returns fp32 h (the compute dtype of fp32 and half
    inputs; float64 is left to the PyTorch path)."""
    if b.dtype == torch.float64:
        raise TypeError("diag_scan_triton computes in fp32; float64 goes through scan.diag_scan's PyTorch path")
    return _DiagScanTriton.apply(a, b, h0)
