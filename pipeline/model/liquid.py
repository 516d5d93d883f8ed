"""Liquid (continuous-time) units with input-dependent time constants.

``LiquidScan`` (backbone ``scan``, the default and fast form).  Each unit obeys the LTC-style ODE

    dx/dt = -x / tau  +  f(u_t) * (v(u_t) - x)

with a learned time constant tau > 0 per unit, an input-dependent conductance f = softplus(W_f u) >= 0
and an input-dependent reversal potential v = tanh(W_v u) (LTC's fixed E_rev made input-dependent).
Because f and v depend on the input only, the ODE is linear in x over one token, and its exact
solution for a step of length dt = 1 with the input held constant is

    x_t = a_t x_{t-1} + (1 - a_t) xbar_t,   a_t = exp(-lambda_t),  lambda_t = 1/tau + f_t,
    xbar_t = f_t v_t / lambda_t,

a diagonal linear recurrence computed with the blocked :func:`diag_scan` (no per-token loop).  The
effective time constant 1/lambda_t is input-dependent: that is what makes the cell "liquid".

``CfC`` (backbone ``cfc``): the closed-form continuous-time cell of ncps (mode "default"), whose gates
depend on the previous hidden state:  x = lecun_tanh(W [u, h]);  t = sigmoid(time_a(x) * ts + time_b(x));
h' = tanh(ff1(x)) (1 - t) + t tanh(ff2(x)).  Because of h in the gates it cannot be written as a
scan; it runs a token loop (unbind/stack, input projections hoisted out of the loop).  It is offered
for fidelity to the old model; it costs about one Python step of ~8 ops per token and layer.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import compute_dtype, diag_scan


class LiquidScan(nn.Module):
    def __init__(self, in_dim: int, units: int, tau_min: float = 1.0, tau_max: float = 64.0):
        super().__init__()
        self.units = units
        self.in_proj = nn.Linear(in_dim, 2 * units)
        # Time constants log-uniform in [tau_min, tau_max] tokens: a spread of memory lengths.
        log_tau = torch.empty(units).uniform_(math.log(tau_min), math.log(tau_max))
        self.log_tau = nn.Parameter(log_tau)

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros((batch, self.units), device=device, dtype=compute_dtype(dtype))

    def forward(self, u: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        z = self.in_proj(u)
        cd = compute_dtype(z.dtype)
        f_pre, v_pre = z.to(cd).chunk(2, dim=-1)
        f = F.softplus(f_pre)
        v = torch.tanh(v_pre)
        lam = torch.exp(-self.log_tau.to(cd)) + f
        a = torch.exp(-lam)
        b = -torch.expm1(-lam) * (f * v / lam)
        h = diag_scan(a, b, h0)
        return h.to(u.dtype), h[:, -1]


def lecun_tanh(x: Tensor) -> Tensor:
    return 1.7159 * torch.tanh(0.666 * x)


class CfC(nn.Module):
    """ncps CfCCell (mode "default", one backbone layer, timespan 1) run over the sequence."""

    def __init__(self, in_dim: int, units: int, backbone_units: Optional[int] = None):
        super().__init__()
        bb = backbone_units or units
        self.units, self.in_dim = units, in_dim
        self.backbone = nn.Linear(in_dim + units, bb)
        self.ff1 = nn.Linear(bb, units)
        self.ff2 = nn.Linear(bb, units)
        self.time_a = nn.Linear(bb, units)
        self.time_b = nn.Linear(bb, units)
        for lin in (self.backbone, self.ff1, self.ff2, self.time_a, self.time_b):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros((batch, self.units), device=device, dtype=compute_dtype(dtype))

    def forward(self, u: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        Bsz, T, _ = u.shape
        cd = compute_dtype(u.dtype)
        W_u = self.backbone.weight[:, : self.in_dim]
        W_h = self.backbone.weight[:, self.in_dim:].to(cd)
        pre = F.linear(u, W_u, self.backbone.bias).to(cd)          # input part, all tokens at once
        W_heads = torch.cat([self.ff1.weight, self.ff2.weight, self.time_a.weight,
                             self.time_b.weight]).to(cd)
        b_heads = torch.cat([self.ff1.bias, self.ff2.bias, self.time_a.bias, self.time_b.bias]).to(cd)
        h = h0.to(cd) if h0 is not None else pre.new_zeros((Bsz, self.units))
        outs = []
        for p_t in pre.unbind(1):
            x = lecun_tanh(torch.addmm(p_t, h, W_h.t()))
            ff1, ff2, ta, tb = torch.addmm(b_heads, x, W_heads.t()).chunk(4, dim=-1)
            t = torch.sigmoid(ta + tb)  # timespan ts = 1
            h = torch.tanh(ff1) * (1 - t) + t * torch.tanh(ff2)
            outs.append(h)
        hs = torch.stack(outs, dim=1)
        return hs.to(u.dtype), h
