"""Fusion of the liquid and Mamba streams: the adaptive per-head gate and the causal cross-attention."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import CausalAttention, RMSNorm


class AdaptiveGate(nn.Module):
    """Per-token, per-head sigmoid gate between two streams (the old LiquidMambaGate, token-wise so causal).

    g_h = sigmoid(<W_q l, W_k m>_h / sqrt(d_h) + b_h);  out = g * l + (1 - g) * m  (g broadcast per head).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(heads))
        nn.init.normal_(self.q.weight, std=0.02)
        nn.init.normal_(self.k.weight, std=0.02)
        self.norm_l = RMSNorm(dim)
        self.norm_m = RMSNorm(dim)

    def forward(self, l: Tensor, m: Tensor) -> Tuple[Tensor, Tensor]:
        Bsz, T, D = l.shape
        ql = self.q(self.norm_l(l)).view(Bsz, T, self.heads, self.head_dim)
        km = self.k(self.norm_m(m)).view(Bsz, T, self.heads, self.head_dim)
        score = (ql * km).sum(-1) / math.sqrt(self.head_dim) + self.bias.to(ql.dtype)
        g = torch.sigmoid(score).unsqueeze(-1)                                  # (B, T, h, 1)
        out = g * l.view(Bsz, T, self.heads, -1) + (1 - g) * m.view(Bsz, T, self.heads, -1)
        return out.view(Bsz, T, D), g.detach().mean()


class CrossStreamAttention(nn.Module):
    """Causal cross-attention: queries from one stream, keys/values from the other (pre-normed).

    Position t attends to positions <= t of the other stream (masked), so it stays causal; in
    generation the other stream's keys/values are cached like a self-attention KV cache."""

    def __init__(self, dim: int, heads: int, out_std: float, dropout: float = 0.0):
        super().__init__()
        self.norm_q = RMSNorm(dim)
        self.norm_kv = RMSNorm(dim)
        self.attn = CausalAttention(dim, heads, out_std, dropout)

    def init_state(self, batch: int, device, dtype, max_len: int = 0) -> dict:
        return self.attn.init_state(batch, device, dtype, max_len)

    def forward(self, q_stream: Tensor, kv_stream: Tensor, cache: Optional[dict] = None,
                return_state: bool = False):
        return self.attn(self.norm_q(q_stream), self.norm_kv(kv_stream), cache, return_state)
