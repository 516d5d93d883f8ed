"""The baseline: a Transformer language model as a careful user would build one today.

    x = embed(ids)
    for each block:  x = x + Attn(RMSNorm(x))     causal scaled_dot_product_attention, rotary q/k
                     x = x + SwiGLU(RMSNorm(x))   down(silu(gate(x)) * up(x))
    logits = head(RMSNorm(x))                      head tied to the embedding (model.tie_embeddings)

No biases. Initialisation as GPT-2 / nanoGPT: every weight N(0, 0.02), the projections that write into
the residual stream (attention output, MLP down) N(0, 0.02 / sqrt(2 * layers)). It has the hybrid's
interface (``forward(ids, state, return_state)``, ``init_state``, ``step``, ``parameter_groups``,
``observables``), so the trainer, the checkpoints and ``launch/generate.py`` (KV-cache decoding) take
either model unchanged. Selected with ``model.arch: transformer``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ModelConfig

from .attention import CausalAttention, RMSNorm, rotary_tables
from .hybrid import HybridLM, output_head, run_layers


def ffn_dim(cfg: ModelConfig) -> int:
    """SwiGLU inner width: `model.ffn_dim`, or 8/3 x hidden_dim (the 4x MLP's parameter count with three
    matrices) rounded up to a multiple of 16."""
    return cfg.ffn_dim or 16 * math.ceil(8 * cfg.hidden_dim / 3 / 16)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, out_std: float):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # one matmul for both input projections
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.gate_up.weight, std=0.02)
        nn.init.normal_(self.down.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_dim)
        self.attn = CausalAttention(cfg.hidden_dim, cfg.num_attention_heads, out_std, cfg.dropout)
        self.mlp_norm = RMSNorm(cfg.hidden_dim)
        self.mlp = SwiGLU(cfg.hidden_dim, ffn_dim(cfg), out_std)
        self.dropout = nn.Dropout(cfg.dropout)

    def init_state(self, batch: int, device, dtype, max_len: int = 0) -> dict:
        return self.attn.init_state(batch, device, dtype, max_len)

    def forward(self, x: Tensor, state: Optional[dict], return_state: bool, rotary: Tuple[Tensor, Tensor]
                ) -> Tuple[Tensor, Optional[dict]]:
        y, cache = self.attn(self.attn_norm(x), None, state, return_state, rotary=rotary)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), cache


class TransformerLM(nn.Module):
    """Pre-norm RMSNorm / rotary / SwiGLU Transformer; ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "transformer":
            raise ValueError(f"TransformerLM needs model.arch=transformer, got {cfg.arch!r}")
        self.cfg = cfg
        H = cfg.hidden_dim
        self.head_dim = H // cfg.num_attention_heads
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        self.embed = nn.Embedding(cfg.vocab_size, H)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([TransformerBlock(cfg, out_std) for _ in range(cfg.num_layers)])
        self.norm_f = RMSNorm(H)
        self.lm_head = output_head(cfg, self.embed)

    def forward(self, input_ids: Tensor, state: Optional[dict] = None, return_state: bool = False):
        """input_ids (B, T) -> logits (B, T, V); with ``return_state`` returns (logits, state), the state
        holding every layer's KV cache (feed it back with the next tokens)."""
        T = input_ids.shape[1]
        pos0 = state["pos"] if state is not None else 0
        x = self.drop(self.embed(input_ids))
        rotary = rotary_tables(torch.arange(pos0, pos0 + T, device=input_ids.device), self.head_dim, x.dtype)
        x, new_states = run_layers(self.layers, x, state, return_state, rotary=rotary)
        logits = self.lm_head(self.norm_f(x))
        if return_state:
            return logits, {"pos": pos0 + T, "layers": new_states}
        return logits

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int = 0) -> dict:
        """Empty KV caches with room for ``max_len`` positions (they grow by doubling beyond it)."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return {"pos": 0, "layers": [layer.init_state(batch_size, device, dtype, max_len) for layer in self.layers]}

    step = HybridLM.step
    # The same AdamW groups as the hybrid: norms and embeddings exempt from weight decay.
    parameter_groups = HybridLM.parameter_groups
    num_parameters = HybridLM.num_parameters

    def observables(self) -> Dict[str, Tensor]:
        """No spiking, liquid or gate observables: nothing beyond the trainer's own metrics."""
        return {}
