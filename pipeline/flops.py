"""Model FLOPs per token of the hybrid LM (and of the baseline Transformer), the peak it is measured against, and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs per token x tokens/s / peak FLOP/s.
"Model FLOPs" are what the architecture needs, not what the kernels happen to execute:

* a matmul of an (in -> out) projection costs 2 x in x out per token (multiply + add);
* the embedding lookup is free; the output head is a matmul (tied or not);
* attention (self and cross) costs 4 x T x hidden per token for QK^T and AV over all T keys: no
  halving for the causal mask (PaLM's and nanoGPT's convention; a kernel that skips masked blocks
  does about half of that work, so causal attention's MFU reads low by design);
* the Mamba depthwise conv costs 2 x d_inner x d_conv;
* the recurrences count their arithmetic: 2 per state element per step for the diagonal scans
  (h = a h + b: liquid, LIF membranes per sub-step, the temporal spike trace) and 9 per
  (channel, state) pair plus 2 per channel for Mamba's selective scan (the count Tri Dao gives in
  state-spaces/mamba#110: discretise, update, contract with C; D skip and z gate);
* norms, activations, softmax, the LIF spike decision, the `rate` spike encoding's moving average
  and the gates' elementwise mixing are not counted (small next to the matmuls, and conventionally
  left out).

Training FLOPs = 3 x forward (the backward of a matmul is two matmuls of the same size: gradient of
the input and of the weight). The scans' hand-written backward does about as much work again as
their forward, so 3x slightly overstates them; they are a few percent of the total at any width
worth measuring.
"""
from __future__ import annotations

import math
import re
import time
from typing import Optional, Tuple

import torch

from pipeline.config import ModelConfig

# Dense peaks per device from the vendors' datasheets: (bf16/fp16 tensor, tf32, fp32) FLOP/s.
# Longer names first: "H100 NVL" must not be read as "H100".
GPU_PEAKS = {
    "B200": (2250e12, 1100e12, 75e12),
    "H200 NVL": (836e12, 418e12, 60e12),
    "H200": (989e12, 494e12, 67e12),
    "H100 NVL": (835e12, 418e12, 60e12),
    "H100 PCIe": (756e12, 378e12, 51e12),
    "H100": (989e12, 494e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L4": (121e12, 60e12, 30.3e12),
    "V100": (125e12, 15.7e12, 15.7e12),  # fp16 tensor cores; no bf16, no tf32
    "MI300X": (1307e12, 654e12, 163e12),
}


def transformer_flops_breakdown(cfg: ModelConfig, sequence_length: int) -> dict:
    """Forward FLOPs per token of `TransformerLM(cfg)` by kind, counted as for the hybrid: per layer the q, kv
    and out projections (4 H^2 weights), the SwiGLU's gate, up and down (3 H F), attention 4 T H; the head."""
    from pipeline.model.transformer import ffn_dim

    H, T = cfg.hidden_dim, sequence_length
    per_layer = 2 * (4 * H * H + 3 * H * ffn_dim(cfg))
    return {"matmul": float(cfg.num_layers * per_layer + 2 * H * cfg.vocab_size),
            "attention": float(cfg.num_layers * 4 * T * H), "scan": 0.0}


def flops_breakdown(cfg: ModelConfig, sequence_length: int) -> dict:
    """Forward FLOPs per token by kind: `matmul` (projections, head, conv), `attention` (QK^T and AV),
    `scan` (the recurrences). See the module docstring for what is counted."""
    if cfg.arch == "transformer":
        return transformer_flops_breakdown(cfg, sequence_length)
    H, S, L, T, K = cfg.hidden_dim, cfg.spiking_units, cfg.liquid_units, sequence_length, cfg.num_spike_steps
    E, N, R = cfg.mamba_expand * H, cfg.mamba_d_state, math.ceil(H / 16)
    mm = lambda i, o: 2 * i * o  # noqa: E731
    attention_proj = mm(H, H) + mm(H, 2 * H) + mm(H, H)  # q, kv, out
    matmul, attention, scan = mm(H, cfg.vocab_size), 0, 0
    for _ in range(cfg.num_layers):
        matmul += mm(H, S)                                    # spike_proj
        scan += 2 * K * S                                     # LIF membranes, K sub-steps per token
        if cfg.liquid_backbone == "cfc":
            matmul += mm(H + S + L, L) + 4 * mm(L, L)         # backbone on [u, h], ff1, ff2, time_a, time_b
        else:
            matmul += mm(H + S, 2 * L)                        # in_proj: conductance and reversal potential
            scan += 2 * L
        matmul += mm(L, H)                                    # liquid_out
        if not cfg.use_mamba:
            continue
        if cfg.spike_to_mamba_method == "temporal":
            scan += 2 * S
        matmul += mm(S, H)                                    # spike_adapter
        matmul += mm(H, 2 * E) + 2 * E * cfg.mamba_d_conv + mm(E, R + 2 * N) + mm(R, E) + mm(E, H)
        scan += 9 * E * N + 2 * E
        crosses = (2 if cfg.integration_mode == "bidirectional" else 1) if cfg.use_cross_attention else 0
        matmul += crosses * attention_proj
        attention += crosses * 4 * T * H
        if cfg.use_adaptive_gating:
            matmul += 2 * mm(H, H) + 2 * H                    # q, k and the per-head dot products
    if cfg.attention_every > 0:
        n_attn = cfg.num_layers // cfg.attention_every
        matmul += n_attn * attention_proj
        attention += n_attn * 4 * T * H
    return {"matmul": float(matmul), "attention": float(attention), "scan": float(scan)}


def model_flops_per_token(cfg: ModelConfig, sequence_length: int) -> float:
    """Training (forward + backward = 3 x forward) FLOPs per token of `build_model(cfg)` at this length."""
    return 3.0 * sum(flops_breakdown(cfg, sequence_length).values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device="cpu", dtype: torch.dtype = torch.float32, seconds: float = 0.3,
                       size: Optional[int] = None) -> float:
    """Best FLOP/s of a square matmul repeated for about `seconds` on `device` (best, not mean: the
    peak is what the hardware can do, and MFU must not look high because the machine was busy)."""
    device = torch.device(device)
    n = size or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call pays for BLAS initialisation and allocation
    _synchronize(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
        if time.perf_counter() >= deadline:
            return best


def measure_cpu_peak_flops(seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s of this process on the CPU, with its current torch thread count."""
    return measure_peak_flops("cpu", torch.float32, seconds)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> Optional[float]:
    """Datasheet dense peak of a GPU named like `torch.cuda.get_device_name()`, or None if unknown."""
    for key, (half, tf32, fp32) in GPU_PEAKS.items():
        if re.search(rf"\b{re.escape(key)}\b", name):
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
    return None


def peak_flops(device, configured: Optional[float] = None, dtype: torch.dtype = torch.float32
               ) -> Tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): the configured value if given,
    else the datasheet value of a known GPU, else a matmul measured here (CPU, unknown GPU)."""
    device = torch.device(device)
    if configured:
        return float(configured), "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = gpu_peak_flops(name, dtype)
        if known is not None:
            return known, f"{name} {str(dtype).replace('torch.', '')} dense peak, vendor datasheet"
        return measure_peak_flops(device, dtype), f"measured: {str(dtype).replace('torch.', '')} matmul on {name}"
    return measure_cpu_peak_flops(), f"measured: fp32 1024x1024 matmul on CPU, {torch.get_num_threads()} threads"


class MFU:
    """Model FLOPs utilisation of the whole job from the measured tokens/s (all ranks together).

    The peak is taken once, at construction (on CPU a 0.3 s matmul: construct it on every rank at the
    same time, so the measurement sees the same sharing of cores as training does)."""

    def __init__(self, cfg: ModelConfig, sequence_length: int, device, world_size: int = 1,
                 configured_peak: Optional[float] = None, dtype: torch.dtype = torch.float32):
        self.flops_per_token = model_flops_per_token(cfg, sequence_length)
        self.peak, self.source = peak_flops(device, configured_peak, dtype)
        self.world_size = world_size

    def __call__(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / (self.peak * self.world_size)

    def describe(self) -> str:
        return (f"{self.flops_per_token / 1e6:.3g} MFLOP per token (forward + backward), peak "
                f"{self.peak / 1e12:.4g} TFLOP/s per device x {self.world_size} ({self.source})")
