"""Causal attention (self and cross-stream) through scaled_dot_product_attention, with a KV cache,
plus the RMSNorm used everywhere in the model."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import rms_norm_cpu


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (safe for fp16 modules), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64)
                and rms_norm_cpu() is not None):
            return _RMSNormCPU.apply(x, self.weight, self.eps)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm through the fused C++ kernel (kernels/rms_norm.cpp): one pass per row each way."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = rms_norm_cpu().forward(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        gx, gw = rms_norm_cpu().backward(x2, weight.contiguous(), rstd, gy.reshape(x2.shape).contiguous())
        return gx.view(gy.shape), gw, None


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """q (B, h, Tq, d) attends to k/v (B, h, Tk, d) where Tk >= Tq and the queries are the last Tq
    positions: query i sees keys j <= i + (Tk - Tq)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones((Tq, Tk), dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CausalAttention(nn.Module):
    """Multi-head causal attention; queries from ``x``, keys/values from ``kv`` (= x for self-attention).

    With a cache, new keys/values are written after the past ones and the new queries attend to
    everything up to their own position.  A cache is ``{"k", "v": (B, h, capacity, d) buffers,
    "len": filled positions}``; it is written in place (a state is consumed by the call that
    advances it: to branch a generation, deep-copy the state first)."""

    def __init__(self, dim: int, heads: int, out_std: float, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        for lin in (self.q_proj, self.kv_proj):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.out_proj.weight, std=out_std)

    def init_state(self, batch: int, device, dtype, max_len: int = 0) -> dict:
        """An empty cache with room for ``max_len`` positions (it grows by doubling beyond that)."""
        shape = (batch, self.heads, max_len, self.head_dim)
        return {"k": torch.empty(shape, device=device, dtype=dtype),
                "v": torch.empty(shape, device=device, dtype=dtype), "len": 0}

    def forward(self, x: Tensor, kv: Optional[Tensor] = None, cache: Optional[dict] = None,
                return_state: bool = False, rotary: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Optional[dict]]:
        """``rotary``: (cos, sin) of the new positions (``rotary_tables``), applied to the queries and to the
        keys before they enter the cache, so cached keys keep the positions they were written at."""
        Bsz, T, D = x.shape
        kv = x if kv is None else kv
        q = self.q_proj(x).view(Bsz, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(kv).view(Bsz, T, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is None and return_state:
            cache = self.init_state(Bsz, k.device, k.dtype, T)
        if cache is not None:
            k, v, cache = _append(cache, k, v)
        y = causal_sdpa(q, k, v, self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(Bsz, T, D))
        return y, (cache if return_state else None)


def rotary_tables(positions: Tensor, head_dim: int, dtype: torch.dtype, base: float = 10000.0
                  ) -> Tuple[Tensor, Tensor]:
    """cos and sin (T, head_dim / 2) of rotary position embeddings (RoFormer) at ``positions`` (T,),
    computed in float32 (an fp16 angle of position 1000 is off by a whole radian) and cast to ``dtype``."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[..., i], x[..., i + d/2]) of x (B, h, T, d) by the angle of its position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _append(cache: dict, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, dict]:
    """Write k, v (B, h, T, d) after the cache's ``len`` positions; returns the filled keys and
    values (views of the buffers) and the advanced cache."""
    n, T = cache["len"], k.shape[2]
    kb, vb = cache["k"], cache["v"]
    if n + T > kb.shape[2] or kb.dtype != k.dtype or kb.device != k.device:
        # Doubling keeps an unsized cache at amortised O(1) copying per token.
        cap = max(n + T, 2 * kb.shape[2])
        grown = [torch.empty((*k.shape[:2], cap, k.shape[3]), device=k.device, dtype=k.dtype)
                 for _ in range(2)]
        for new, old in zip(grown, (kb, vb)):
            new[:, :, :n] = old[:, :, :n]
        kb, vb = grown
    elif k.requires_grad or kb.requires_grad:
        # Under autograd an in-place write would invalidate the graph that read these buffers
        # before; a differentiable (training-time) call pays one copy instead.
        kb, vb = kb.clone(), vb.clone()
    kb[:, :, n:n + T] = k
    vb[:, :, n:n + T] = v
    return kb[:, :, :n + T], vb[:, :, :n + T], {"k": kb, "v": vb, "len": n + T}
