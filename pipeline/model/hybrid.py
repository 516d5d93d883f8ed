"""The hybrid language model: embedding -> [hybrid block (+ causal attention layer)] x N -> norm -> head.

A hybrid block (pre-norm, residual) on the normed input xn:

    spikes, membrane = LIF(W_s xn)                          (membranes carried across tokens)
    l  = W_l Liquid([xn, spikes])                           (scan or CfC backbone)
    with Mamba (use_mamba):
      a  = W_a SpikeEncode(spikes, membrane)                (rate | temporal | potential, causal)
      sequential:     m = Mamba(norm(l + a));  out = m
      parallel:       m = Mamba(xn + a);       out = l + m
      bidirectional:  m = Mamba(xn + a);       l, m = l + X(l <- m), m + X(m <- l);  out = (l + m) / 2
      cross-attention in parallel mode: l = l + X(l <- m) (liquid reads Mamba, one way)
      use_adaptive_gating: out = g * l + (1 - g) * m  with a per-token, per-head sigmoid gate g
    without Mamba: out = l
    x = x + dropout(out)

X(. <- .) is causal cross-attention.  Every part is causal, so changing token t never changes
outputs before t.  Every part also carries its state across calls, which gives recurrent generation
(``init_state`` / ``step``) with O(1) work per token (plus the KV caches of attention layers).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig

from .attention import CausalAttention, RMSNorm
from .fusion import AdaptiveGate, CrossStreamAttention
from .liquid import CfC, LiquidScan
from .mamba import Mamba
from .scan import compute_dtype
from .spiking import LIF, SpikeEncoder


def _normal_linear(lin: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(lin.weight, std=std)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)
    return lin


def output_head(cfg: ModelConfig, embed: nn.Embedding) -> nn.Linear:
    """The bias-free output projection: the embedding's own weight with `model.tie_embeddings`, else N(0, 0.02)."""
    head = nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
    if cfg.tie_embeddings:
        head.weight = embed.weight
    else:
        nn.init.normal_(head.weight, std=0.02)
    return head


def run_layers(layers: nn.ModuleList, x: Tensor, state: Optional[dict], return_state: bool, **kwargs
               ) -> Tuple[Tensor, list]:
    """x through every layer, each with its own part of `state` (None: a fresh sequence); returns x and the
    layers' new states."""
    layer_states = state["layers"] if state is not None else [None] * len(layers)
    new_states = []
    for layer, st in zip(layers, layer_states):
        x, ns = layer(x, st, return_state, **kwargs)
        new_states.append(ns)
    return x, new_states


def num_attention_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers // cfg.attention_every if cfg.attention_every > 0 else 0


class HybridBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, out_std: float):
        super().__init__()
        H, S, L = cfg.hidden_dim, cfg.spiking_units, cfg.liquid_units
        self.cfg, self.index = cfg, index
        self.norm = RMSNorm(H)
        # Input currents scaled so that, at initialisation, the (reset-free) membranes are about
        # N(thr/2, (thr/2)^2) whatever the width and beta: a healthy fraction of neurons fires.
        sigma_i = 0.5 * cfg.spike_threshold * math.sqrt(1 - cfg.beta ** 2)
        self.spike_proj = _normal_linear(nn.Linear(H, S), sigma_i / math.sqrt(H))
        with torch.no_grad():
            self.spike_proj.bias.fill_(0.5 * cfg.spike_threshold * (1 - cfg.beta))
        self.lif = LIF(cfg.beta, cfg.spike_threshold, cfg.num_spike_steps, cfg.spike_reset,
                       cfg.surrogate, cfg.surrogate_slope)
        if cfg.liquid_backbone == "cfc":
            self.liquid = CfC(H + S, L)
        else:
            # LiquidScan initialises its own biases (the conductance bias sets the initial memory).
            self.liquid = LiquidScan(H + S, L, init_std=0.02)
        sequential = cfg.use_mamba and cfg.integration_mode == "sequential"
        # In the sequential chain the liquid output feeds Mamba (not the residual): plain init.
        # A liquid unit that starts with long memory starts with a small input gain (its state is
        # ~INIT_GAIN x v); the readout makes up for it, so the branch's output scale at
        # initialisation is that of a unit-gain cell.
        gain = self.liquid.INIT_GAIN if isinstance(self.liquid, LiquidScan) else 1.0
        self.liquid_out = _normal_linear(nn.Linear(L, H, bias=False),
                                         (0.02 if sequential else out_std) / gain)
        self.mode = cfg.integration_mode if cfg.use_mamba else None
        if cfg.use_mamba:
            self.spike_encoder = SpikeEncoder(cfg.spike_to_mamba_method, cfg.spike_temporal_tau,
                                              cfg.spike_rate_window)
            self.spike_adapter = _normal_linear(nn.Linear(S, H, bias=False), 0.02)
            if sequential:
                self.mamba_norm = RMSNorm(H)
            self.mamba = Mamba(H, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_expand,
                               n_layer=cfg.num_layers, backend=cfg.mamba_backend)
            if cfg.use_cross_attention:
                self.cross_lm = CrossStreamAttention(H, cfg.cross_attn_heads, out_std, cfg.dropout)
                if cfg.integration_mode == "bidirectional":
                    self.cross_ml = CrossStreamAttention(H, cfg.cross_attn_heads, out_std, cfg.dropout)
            if cfg.use_adaptive_gating:
                self.gate = AdaptiveGate(H, cfg.num_gate_heads)
        self.dropout = nn.Dropout(cfg.dropout)
        self.last_obs: Dict[str, Tensor] = {}

    def init_state(self, batch: int, device, dtype, max_len: int = 0) -> dict:
        cd = compute_dtype(dtype)
        cfg = self.cfg
        st = {"v": torch.zeros((batch, cfg.spiking_units), device=device, dtype=cd),
              "h": self.liquid.init_state(batch, device, dtype)}
        if cfg.use_mamba:
            st["enc"] = self.spike_encoder.init_state(batch, cfg.spiking_units, device, dtype)
            st["mamba"] = self.mamba.init_state(batch, device, dtype)
            if cfg.use_cross_attention:
                st["x_lm"] = self.cross_lm.init_state(batch, device, dtype, max_len)
                if cfg.integration_mode == "bidirectional":
                    st["x_ml"] = self.cross_ml.init_state(batch, device, dtype, max_len)
        return st

    def forward(self, x: Tensor, state: Optional[dict] = None, return_state: bool = False
                ) -> Tuple[Tensor, Optional[dict]]:
        cfg = self.cfg
        st = state or {}
        new: dict = {}
        xn = self.norm(x)
        rate, mem, v_end, hard_rate = self.lif(self.spike_proj(xn), st.get("v"))
        spikes = rate.to(x.dtype)
        obs = {"spike_rate": hard_rate}
        hl, h_last = self.liquid(torch.cat([xn, spikes], dim=-1), st.get("h"))
        obs.update(getattr(self.liquid, "last_obs", {}))  # the cfc backbone has no time constant to report
        l = self.liquid_out(hl)
        new.update(v=v_end, h=h_last)
        if self.mode is None:
            out = l
        else:
            enc, enc_state = self.spike_encoder(spikes, mem.to(x.dtype), st.get("enc"))
            new["enc"] = enc_state
            a = self.spike_adapter(enc)
            if self.mode == "sequential":
                m_in = self.mamba_norm(l + a)
            else:
                m_in = xn + a
            m, new["mamba"] = self.mamba(m_in, st.get("mamba"), return_state)
            if cfg.use_cross_attention:
                dl, new["x_lm"] = self.cross_lm(l, m, st.get("x_lm"), return_state)
                if self.mode == "bidirectional":
                    dm, new["x_ml"] = self.cross_ml(m, l, st.get("x_ml"), return_state)
                    m = m + dm
                l = l + dl
            if cfg.use_adaptive_gating:
                out, obs["gate"] = self.gate(l, m)
            elif self.mode == "sequential":
                out = m
            elif self.mode == "parallel":
                out = l + m
            else:
                out = 0.5 * (l + m)
        self.last_obs = obs
        return x + self.dropout(out), (new if return_state else None)


class AttentionLayer(nn.Module):
    """Pre-norm causal self-attention with a residual connection."""

    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_dim)
        self.attn = CausalAttention(cfg.hidden_dim, cfg.num_attention_heads, out_std, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def init_state(self, batch: int, device, dtype, max_len: int = 0) -> dict:
        return self.attn.init_state(batch, device, dtype, max_len)

    def forward(self, x: Tensor, state: Optional[dict] = None, return_state: bool = False):
        y, cache = self.attn(self.norm(x), None, state, return_state)
        return x + self.dropout(y), cache


class HybridLM(nn.Module):
    """Liquid / spiking / Mamba hybrid language model; ``forward(input_ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        n_resid = cfg.num_layers + num_attention_layers(cfg)
        out_std = 0.02 / math.sqrt(2 * n_resid)   # depth-scaled residual projections (GPT-2 style)
        self.embed = nn.Embedding(cfg.vocab_size, H)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos_embed = None
        if cfg.max_position_embeddings > 0:
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, H)
            nn.init.normal_(self.pos_embed.weight, std=0.01)
        self.drop = nn.Dropout(cfg.dropout)
        layers: List[nn.Module] = []
        for i in range(cfg.num_layers):
            layers.append(HybridBlock(cfg, i, out_std))
            if cfg.attention_every > 0 and (i + 1) % cfg.attention_every == 0:
                layers.append(AttentionLayer(cfg, out_std))
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(H)
        self.lm_head = output_head(cfg, self.embed)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, state: Optional[dict] = None, return_state: bool = False):
        """input_ids (B, T) -> logits (B, T, V); with ``return_state`` returns (logits, state), where
        the state continues the sequence (feed it back with the next tokens)."""
        Bsz, T = input_ids.shape
        pos0 = state["pos"] if state is not None else 0
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if pos0 + T > self.cfg.max_position_embeddings:
                raise ValueError(f"position {pos0 + T} exceeds model.max_position_embeddings="
                                 f"{self.cfg.max_position_embeddings}")
            x = x + self.pos_embed(torch.arange(pos0, pos0 + T, device=input_ids.device))
        x = self.drop(x)
        x, new_states = run_layers(self.layers, x, state, return_state)
        logits = self.lm_head(self.norm_f(x))
        if return_state:
            return logits, {"pos": pos0 + T, "layers": new_states}
        return logits

    # -- recurrent generation ----------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None, max_len: int = 0) -> dict:
        """The state before the first token.  ``max_len``: the longest sequence (prompt + new
        tokens) to be generated; the attention KV caches are allocated for it once, so decoding
        writes into them in place (beyond it they grow by doubling).  Every other part of the
        state has a fixed size."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return {"pos": 0, "layers": [layer.init_state(batch_size, device, dtype, max_len)
                                     for layer in self.layers]}

    def step(self, token_ids: Tensor, state: dict) -> Tuple[Tensor, dict]:
        """One token per sequence: token_ids (B,) -> logits (B, V) and the advanced state."""
        logits, state = self.forward(token_ids.view(-1, 1), state, return_state=True)
        return logits[:, -1], state

    # -- training helpers --------------------------------------------------------------------------

    def observables(self) -> Dict[str, Tensor]:
        """Detached scalars from the last forward, per hybrid block: spike rate, the liquid units' effective
        time constants (mean, min, max of 1/lambda in tokens) and the gate mean."""
        out: Dict[str, Tensor] = {}
        rates = []
        for layer in self.layers:
            if isinstance(layer, HybridBlock):
                for key, val in layer.last_obs.items():
                    out[f"{key}/layer{layer.index}"] = val.detach()
                if "spike_rate" in layer.last_obs:
                    rates.append(layer.last_obs["spike_rate"].detach().float())
        if rates:
            out["spike_rate/mean"] = torch.stack(rates).mean()
        return out

    def parameter_groups(self, weight_decay: float) -> List[dict]:
        """AdamW groups: decay matrices/convolutions; exempt norms, biases, embeddings (and the tied
        head), A_log, D and the liquid time constants."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if (p.ndim < 2 or leaf in ("A_log", "D", "log_tau") or "embed" in name
                    or getattr(p, "_no_weight_decay", False)):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
