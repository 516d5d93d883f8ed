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
At initialisation the conductance is a small fraction of each unit's leak (f ~ 0.1/tau), so the
effective time constants start spread over the sampled [tau_min, tau_max] (see ``__init__``).

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

from .kernels import use_triton
from .scan import compute_dtype, diag_scan


class LiquidScan(nn.Module):
    # Initial conductance as a fraction of each unit's leak 1/tau (see __init__), and the input gain
    # it implies: the state starts at about INIT_GAIN x the reversal potential v.
    INIT_CONDUCTANCE = 0.1
    INIT_GAIN = INIT_CONDUCTANCE / (1 + INIT_CONDUCTANCE)

    def __init__(self, in_dim: int, units: int, tau_min: float = 1.0, tau_max: float = 64.0,
                 init_std: float = 0.02):
        super().__init__()
        self.units = units
        self.last_obs: dict = {}
        self.in_proj = nn.Linear(in_dim, 2 * units)
        # Time constants log-uniform in [tau_min, tau_max] tokens: a spread of memory lengths.
        log_tau = torch.empty(units).uniform_(math.log(tau_min), math.log(tau_max))
        self.log_tau = nn.Parameter(log_tau)
        nn.init.normal_(self.in_proj.weight, std=init_std)
        # lambda = 1/tau + f, so a conductance near softplus(0) = 0.69 would swamp every 1/tau <= 1
        # and start all units with ~1-2 tokens of memory.  Starting each unit's f at a fixed small
        # fraction eps of its own leak gives 1/lambda = tau / (1 + eps): the sampled time constants
        # are the memory at start, and every unit has the same input gain f tau / (1 + f tau).
        f0 = self.INIT_CONDUCTANCE * torch.exp(-log_tau)
        with torch.no_grad():
            self.in_proj.bias[:units].copy_(f0 + torch.log(-torch.expm1(-f0)))  # softplus^-1(f0)
            self.in_proj.bias[units:].zero_()

    def init_state(self, batch: int, device, dtype) -> Tensor:
        return torch.zeros((batch, self.units), device=device, dtype=compute_dtype(dtype))

    def _rates(self, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Conductance f, reversal potential v and decay rate lambda = 1/tau + f (compute dtype)."""
        z = self.in_proj(u)
        f_pre, v_pre = z.to(compute_dtype(z.dtype)).chunk(2, dim=-1)
        f = F.softplus(f_pre)
        return f, torch.tanh(v_pre), torch.exp(-self.log_tau.to(f.dtype)) + f

    def effective_tau(self, u: Tensor) -> Tensor:
        """1/lambda_t per token and unit (tokens): the memory of each unit at each input."""
        return 1.0 / self._rates(u)[2]

    def forward(self, u: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if use_triton(u):  # gates, decays, scan and metrics in one kernel (kernels/triton_liquid.py)
            from .kernels.triton_liquid import liquid_scan_triton

            h, h_last, self.last_obs = liquid_scan_triton(self.in_proj(u), self.log_tau, h0)
            return h.to(u.dtype), h_last
        f, v, lam = self._rates(u)
        with torch.no_grad():  # effective time constants for the metrics; read only at log intervals
            tau = lam.reciprocal()
            self.last_obs = {"liquid_tau": tau.mean(), "liquid_tau_min": tau.amin(), "liquid_tau_max": tau.amax()}
        a = torch.exp(-lam)
        h = diag_scan(a, _one_minus_exp_over(lam) * f * v, h0)
        # The state is kept across calls: a copy, so it does not pin the whole (B, T, units) output.
        return h.to(u.dtype), h[:, -1].clone()


def _one_minus_exp_over(lam: Tensor) -> Tensor:
    """(1 - exp(-lam)) / lam, finite with a finite gradient down to lam = 0 (where 1/tau and f have
    underflowed and the plain form is 0/0)."""
    small = lam < 1e-2
    big = lam.clamp_min(1e-2)  # the unused branch must stay finite too, or where() leaks NaN grads
    series = 1.0 - lam * (0.5 - lam * (1.0 / 6.0 - lam / 24.0))  # error < lam^4 / 120
    return torch.where(small, series, -torch.expm1(-big) / big)


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
