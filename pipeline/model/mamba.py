"""Mamba-1 selective state-space block with mamba_ssm's parameter names and shapes.

Parameters (identical to ``mamba_ssm.modules.mamba_simple.Mamba``, so one state_dict loads on both):
``in_proj.weight`` (2E, H), ``conv1d.weight`` (E, 1, d_conv), ``conv1d.bias`` (E), ``x_proj.weight``
(R + 2N, E), ``dt_proj.weight`` (E, R), ``dt_proj.bias`` (E), ``A_log`` (E, N), ``D`` (E),
``out_proj.weight`` (H, E); E = expand * H, R = ceil(H / 16), N = d_state.

Math (the same on both paths): (x, z) = split(in_proj u); x = SiLU(causal depthwise conv x);
(dt, B, C) = split(x_proj x); delta = softplus(dt_proj.weight dt + dt_proj.bias); A = -exp(A_log);
h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t;  y_t = C_t h_t + D x_t;  out = out_proj(y * SiLU(z)).

Paths:
* CUDA tensors with ``mamba_ssm`` importable (and backend "auto" or "cuda"): mamba_ssm's fused
  ``selective_scan_fn`` (and ``causal_conv1d_fn`` when the causal-conv1d package is present).  Used
  for training/full-sequence forwards that start from a zero state.
* Otherwise (CPU, or when carrying a recurrent state): the pure-PyTorch blocked :func:`selective_scan`.
  The CPU path never imports mamba_ssm.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import compute_dtype, selective_scan

_KERNELS = None


def cuda_kernels():
    """(selective_scan_fn, causal_conv1d_fn or None) when mamba_ssm imports, else None (cached)."""
    global _KERNELS
    from .kernels import reference_forced

    if reference_forced():
        return None
    if _KERNELS is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: WPS433
        except Exception:  # ImportError, missing triton/CUDA extension, ...
            _KERNELS = False
        else:
            try:
                from causal_conv1d import causal_conv1d_fn  # noqa: WPS433
            except Exception:
                causal_conv1d_fn = None
            _KERNELS = (selective_scan_fn, causal_conv1d_fn)
    return _KERNELS or None


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, n_layer: int = 1, backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.backend = backend
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        # mamba_ssm initialisation.
        dt_init_std = R ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        # MambaLMHeadModel's rescale_prenorm_residual: out_proj / sqrt(n_layer).
        with torch.no_grad():
            self.out_proj.weight.div_(math.sqrt(n_layer))
        if backend == "cuda" and cuda_kernels() is None:
            raise RuntimeError("model.mamba_backend=cuda but mamba_ssm is not importable here")

    def init_state(self, batch: int, device, dtype) -> dict:
        cd = compute_dtype(dtype)
        return {"conv": torch.zeros((batch, self.d_inner, self.d_conv - 1), device=device, dtype=dtype),
                "ssm": torch.zeros((batch, self.d_inner, self.d_state), device=device, dtype=cd)}

    def _use_cuda(self, x: Tensor, state) -> bool:
        return (self.backend != "torch" and x.is_cuda and state is None and cuda_kernels() is not None)

    def forward(self, hidden: Tensor, state: Optional[dict] = None, return_state: bool = False
                ) -> Tuple[Tensor, Optional[dict]]:
        Bsz, T, _ = hidden.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        if self._use_cuda(hidden, state) and not return_state:
            return self._forward_cuda(hidden), None
        xz = self.in_proj(hidden)
        x, z = xz.chunk(2, dim=-1)
        K = self.d_conv
        if state is not None:
            prev = state["conv"].to(x.dtype).transpose(1, 2)              # (B, K-1, E)
        else:
            prev = x.new_zeros((Bsz, K - 1, E))
        xpad = torch.cat([prev, x], dim=1)                                # (B, T+K-1, E)
        # The causal depthwise convolution as K shifted multiply-adds in the (B, T, E) layout: oneDNN's
        # depthwise conv1d backward measured 1000x slower at batch 2 x 1024 tokens on 2 CPU threads, and
        # its (B, E, T) layout cost two transposes and a copy before the scan.
        w = self.conv1d.weight[:, 0, :].to(x.dtype)                       # (E, K)
        xc = torch.addcmul(self.conv1d.bias.to(x.dtype), xpad[:, K - 1:], w[:, K - 1])
        for k in range(K - 1):
            xc = torch.addcmul(xc, xpad[:, k:k + T], w[:, k])
        x = F.silu(xc)                                                    # (B, T, E)
        x_dbl = self.x_proj(x)
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        cd = compute_dtype(hidden.dtype)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).to(cd) + self.dt_proj.bias.to(cd))
        A = -torch.exp(self.A_log.to(cd))
        y, h_last = selective_scan(x, delta, A, Bm, Cm, state["ssm"] if state is not None else None)
        y = y + x.to(cd) * self.D.to(cd)
        y = y * F.silu(z.to(cd))
        out = self.out_proj(y.to(hidden.dtype))
        new_state = None
        if return_state:
            # A copy: the conv window must not pin the whole (B, T, E) input.
            new_state = {"conv": xpad[:, xpad.shape[1] - (K - 1):].transpose(1, 2).contiguous(), "ssm": h_last}
        return out, new_state

    def _forward_cuda(self, hidden: Tensor) -> Tensor:
        selective_scan_fn, causal_conv1d_fn = cuda_kernels()
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        xz = self.in_proj(hidden).transpose(1, 2)                         # (B, 2E, T)
        x, z = xz.chunk(2, dim=1)
        if causal_conv1d_fn is not None:
            x = causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                 activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., : x.shape[-1]])
        x_dbl = self.x_proj(x.transpose(1, 2))                            # (B, T, R+2N)
        dt, Bm, Cm = torch.split(x_dbl, [R, N, N], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)            # (B, E, T)
        A = -torch.exp(self.A_log.float())
        y = selective_scan_fn(x.contiguous(), dt.contiguous(), A,
                              Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
                              self.D.float(), z=z.contiguous(), delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True)
        return self.out_proj(y.transpose(1, 2).to(hidden.dtype))
