"""Model benchmark: training throughput (forward + backward) of the hybrid vs a plain Transformer LM.

    python -m bench.bench_model                      # default: small + base widths, seq 256 and 1024
    python -m bench.bench_model --sizes small --seqs 256 --steps 3
    python -m bench.bench_model --profile small:256  # op-level profile of one hybrid configuration

For each width the hybrid uses the *production* preset's options (Mamba bidirectional with
cross-attention, d_state 32, expand 2, adaptive gating, temporal spike encoding) at that width:
"small" = the small preset's dimensions, "base" = the production preset itself.  The baseline is a
pre-norm GPT (causal SDPA, GELU MLP) with the same vocabulary, width and tying, and its depth/MLP
width chosen to match the hybrid's parameter count.  Both train in fp32 on 2 threads with AdamW
excluded (forward + backward only).  It prints tokens/s, the ratio hybrid / Transformer, and MFU
against a float32 matmul peak measured on the spot.  MFU counts matmul FLOPs only
(6 x matmul parameters per token + causal attention scores); the scans' elementwise work is
overhead by this definition.  Never used as a timed test.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.model import HybridLM  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Baseline Transformer
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, mlp, bias=False)
        self.out = nn.Linear(mlp, dim, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TransformerLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, mlp: int, tie: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def matched_transformer(cfg: ModelConfig, target_params: int) -> TransformerLM:
    H, V = cfg.hidden_dim, cfg.vocab_size
    embed = V * H * (1 if cfg.tie_embeddings else 2)
    body = max(target_params - embed, 12 * H * H)
    layers = max(1, round(body / (12 * H * H)))
    mlp = max(H, round((body / layers - 4 * H * H - 4 * H) / (2 * H)))
    heads = max(1, H // 64) if H >= 64 else 2
    return TransformerLM(V, H, layers, heads, mlp, cfg.tie_embeddings)


# ----------------------------------------------------------------------------------------------
# FLOPs, peak, timing
# ----------------------------------------------------------------------------------------------

def matmul_flops_per_token(model: nn.Module, T: int) -> float:
    """6 x (weights of every Linear, counting a tied head once more as a matmul) + attention scores."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    flops = 6.0 * n
    H = getattr(getattr(model, "cfg", None), "hidden_dim", None)
    attn_modules = 0
    if isinstance(model, TransformerLM):
        attn_modules, H = len(model.blocks), model.embed.weight.shape[1]
    else:
        from pipeline.model.attention import CausalAttention
        attn_modules = sum(isinstance(m, CausalAttention) for m in model.modules())
    flops += attn_modules * 6.0 * T * H   # QK^T and AV, causal half, forward + backward
    return flops


def measure_peak(seconds: float = 2.0) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t))
    return best


def time_train(model: nn.Module, vocab: int, B: int, T: int, steps: int) -> float:
    """Median seconds of forward + cross-entropy + backward over ``steps`` (after one warm-up)."""
    ids = torch.randint(0, vocab, (B, T + 1))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        if i > 0:
            times.append(dt)
    times.sort()
    return times[len(times) // 2]


def hybrid_config(size: str) -> ModelConfig:
    prod = yaml.safe_load((ROOT / "launch/presets/production.yaml").read_text())["model"]
    if size == "small":
        small = yaml.safe_load((ROOT / "launch/presets/small.yaml").read_text())["model"]
        for key in ("vocab_size", "hidden_dim", "num_layers", "liquid_units", "spiking_units",
                    "num_attention_heads", "tie_embeddings"):
            prod[key] = small[key]
    prod["dropout"] = 0.0
    return ModelConfig(**prod)


def run(sizes: List[str], seqs: List[int], tokens: Dict[str, int], steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    peak = measure_peak()
    print(f"torch {torch.__version__}, {threads} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    header = (f"{'size':6} {'seq':>5} {'batch':>5} {'params':>8} | {'hybrid tok/s':>12} {'MFU':>6} | "
              f"{'transf tok/s':>12} {'MFU':>6} {'layers':>6} | {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        cfg = hybrid_config(size)
        hybrid = HybridLM(cfg)
        n_params = sum(p.numel() for p in hybrid.parameters())
        base = matched_transformer(cfg, n_params)
        for T in seqs:
            B = max(1, tokens[size] // T)
            th = time_train(hybrid, cfg.vocab_size, B, T, steps)
            tt = time_train(base, cfg.vocab_size, B, T, steps)
            tok_h, tok_t = B * T / th, B * T / tt
            mfu_h = matmul_flops_per_token(hybrid, T) * tok_h / peak
            mfu_t = matmul_flops_per_token(base, T) * tok_t / peak
            print(f"{size:6} {T:5d} {B:5d} {n_params / 1e6:7.1f}M | {tok_h:12.0f} {mfu_h:6.1%} | "
                  f"{tok_t:12.0f} {mfu_t:6.1%} {len(base.blocks):6d} | {tok_h / tok_t:6.2f}", flush=True)


def profile(spec: str, threads: int) -> None:
    size, T = spec.split(":")
    T = int(T)
    torch.set_num_threads(threads)
    cfg = hybrid_config(size)
    model = HybridLM(cfg)
    B = max(1, (8192 if size == "small" else 1024) // T)
    time_train(model, cfg.vocab_size, B, T, 1)
    with torch.profiler.profile() as prof:
        time_train(model, cfg.vocab_size, B, T, 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def components(threads: int) -> None:
    """fwd+bwd of each recurrence: the blocked form used by the model vs its sequential reference."""
    from pipeline.model.liquid import CfC, LiquidScan
    from pipeline.model.scan import diag_scan, diag_scan_ref, selective_scan, selective_scan_ref
    from pipeline.model.spiking import lif_spikes

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def t_fb(fn, *inputs, reps=3):
        best = float("inf")
        for _ in range(reps):
            for x in inputs:
                x.grad = None
            t = time.perf_counter()
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            if out.requires_grad:
                out.sum().backward()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    print(f"components, {threads} threads, fwd+bwd ms (best of 3)")
    for B, T, D in [(8, 1024, 512), (32, 256, 64)]:
        a = torch.rand(B, T, D).requires_grad_()
        b = torch.randn(B, T, D).requires_grad_()
        print(f"  diag scan B{B} T{T} D{D}: blocked {t_fb(lambda: diag_scan(a, b), a, b):8.1f} | "
              f"unbind loop {t_fb(lambda: diag_scan_ref(a, b), a, b):8.1f}")
    for B, T, E, N in [(32, 256, 256, 32), (4, 1024, 1280, 32)]:
        ins = [torch.randn(B, T, E), 0.1 * torch.rand(B, T, E), -8 * torch.rand(E, N),
               torch.randn(B, T, N), torch.randn(B, T, N)]
        ins = [x.requires_grad_() for x in ins]
        fast = t_fb(lambda: selective_scan(*ins), *ins)
        ref = t_fb(lambda: selective_scan_ref(*ins), *ins, reps=1)
        print(f"  selective scan B{B} T{T} E{E} N{N}: blocked {fast:8.1f} | unbind loop (ref) {ref:8.1f}")
    for B, T, S, beta in [(32, 256, 32, 0.95), (8, 1024, 128, 0.95), (8, 1024, 128, 0.5)]:
        sig = 0.5 * math.sqrt(1 - beta ** 2)
        current = 0.5 * (1 - beta) + sig * torch.randn(B, T, S)
        fused = t_fb(lambda: lif_spikes(current, None, beta, 1.0, "subtract", method="auto"))
        loop = t_fb(lambda: lif_spikes(current, None, beta, 1.0, "subtract", method="loop"))
        chunked = t_fb(lambda: lif_spikes(current, None, beta, 1.0, "subtract", method="chunked"))
        print(f"  LIF spike decision B{B} T{T} S{S} beta {beta}: fused CPU kernel {fused:8.2f} | tensor-op loop "
              f"{loop:8.1f} ({loop / fused:.0f}x) | chunked {chunked:8.1f}")
    for B, T, H, L in [(32, 256, 160, 64), (8, 1024, 640, 256)]:
        u = torch.randn(B, T, H).requires_grad_()
        scan, cfc = LiquidScan(H, L), CfC(H, L)
        print(f"  liquid B{B} T{T} in{H} units{L}: scan {t_fb(lambda: scan(u), u):8.1f} | "
              f"cfc {t_fb(lambda: cfc(u), u, reps=1):8.1f}")
    stdp_components(t_fb)


def stdp_components(t_fb) -> None:
    """What `plasticity.stdp` costs: its traces and terms against the spiking layer, and in the demo model's step."""
    # The pre/post traces and the two outer-product terms, computed in the forward hook of every spiking layer
    # of a training micro-batch, against the spiking layer itself (spike_proj + LIF, fwd+bwd).
    from pipeline.engine.plasticity import stdp_terms
    from pipeline.model.spiking import LIF

    for B, T, H, S in [(32, 256, 128, 32), (8, 1024, 640, 128)]:
        x = torch.randn(B, T, H).requires_grad_()
        proj, lif = torch.nn.Linear(H, S), LIF(0.95, 1.0, 1, "subtract", "atan", 2.0)
        with torch.no_grad():
            proj.bias.fill_(0.5 * 0.05)
            proj.weight.normal_(0, 0.5 * math.sqrt(1 - 0.95 ** 2) / math.sqrt(H))
        spiking = t_fb(lambda: lif(proj(x))[0], x)
        post = lif(proj(x))[0].detach()
        traces = t_fb(lambda: stdp_terms(x.detach(), post, 20.0, 20.0)[0])
        print(f"  STDP traces + terms B{B} T{T} H{H} S{S} (fwd only): {traces:8.2f} | spiking layer fwd+bwd "
              f"{spiking:8.2f} (+{traces / spiking:.0%})")
    # The whole training step of the demo preset's model (B8 T128, fwd+bwd), without and with homeostatic STDP
    # (forward hooks, the per-micro-batch sums and the update after the step; no DeepSpeed), interleaved.
    from pipeline.config import PlasticityConfig
    from pipeline.engine.plasticity import STDP

    demo = yaml.safe_load((ROOT / "launch/presets/demo.yaml").read_text())["model"]
    cfg = ModelConfig(**demo)
    ids = torch.randint(0, cfg.vocab_size, (8, 128))
    plain, plastic = HybridLM(cfg), HybridLM(cfg)
    stdp = STDP(PlasticityConfig(stdp="homeostatic"), plastic)

    def demo_step(model, with_stdp):
        t = time.perf_counter()
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        if with_stdp:
            stdp.accept_micro_batch()
            stdp.after_step()
        return (time.perf_counter() - t) * 1e3

    times = {False: [], True: []}
    for _ in range(8):
        for with_stdp in (False, True):
            times[with_stdp].append(demo_step(plastic if with_stdp else plain, with_stdp))
    base, with_stdp = min(times[False][1:]), min(times[True][1:])
    print(f"  demo model training step B8 T128: {base:8.1f} | with STDP {with_stdp:8.1f} (+{with_stdp / base - 1:.1%})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--seqs", default="256,1024")
    p.add_argument("--small_tokens", type=int, default=8192, help="tokens per step at small width")
    p.add_argument("--base_tokens", type=int, default=1024, help="tokens per step at base width")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up); median reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", default=None, help="SIZE:SEQ, e.g. small:256: print an op profile instead")
    p.add_argument("--components", action="store_true", help="time each recurrence vs its reference instead")
    args = p.parse_args(argv)
    if args.components:
        components(args.threads)
        return
    if args.profile:
        profile(args.profile, args.threads)
        return
    run(args.sizes.split(","), [int(s) for s in args.seqs.split(",")],
        {"small": args.small_tokens, "base": args.base_tokens}, args.steps, args.threads)


if __name__ == "__main__":
    main()
