"""Model benchmark: where one training step of the hybrid goes, against a same-size Transformer.

    python bench/bench_model.py                 # the CPU target (below): table, breakdown, loop overhead
    python bench/bench_model.py --no_loop       # without the training-loop run
    python bench/bench_model.py --loop_hidden 128   # the loop-overhead part at a smaller width (faster)
    python bench/bench_model.py --components    # each recurrence: fused kernel vs blocked fallback vs reference
    python bench/bench_model.py --profile 256   # op-level profile of one hybrid step, [WIDTH:]SEQ

The default run measures the CPU target as the issue defines it, in one process:

* hybrid: `HybridLM(ModelConfig(...))` from launch/presets/production.yaml with vocab_size 8000,
  hidden_dim 512, dropout 0 (52.1M parameters, untied head);
* Transformer: pre-norm GPT (LayerNorm, causal SDPA, 4x GELU MLP, no biases in the linears), the
  hybrid's width, vocabulary and tying, 64-wide heads, layers added until its parameter count is
  the closest to the hybrid's (no position embedding: the hybrid has none either);
* one training step = forward, fp32 cross-entropy, backward, `torch.optim.AdamW` step, in fp32 on
  2 threads, at seq 256 x batch 8 and seq 1024 x batch 2; the two models take turns step by step,
  median of a few steps after a warm-up.

It prints both tokens/s, MFU against an fp32 matmul peak measured in the same run (the best of a few
measurements), the ratio (PASS >= 0.6), a per-component breakdown of the hybrid's step at each point,
and the training loop's own tokens/s (`Trainer.run_step`, launch/train.py's step with its callbacks, in this
process: DeepSpeed with ds_configs/cpu.json as a group of one, the table's model at seq 256 x batch 8) against
the bare step (PASS: the loop costs < 10 %).
Ratios, never absolute timings, are the claims: the machine may be shared (the output says how loaded
it was).  bench/gpu_model_check.py runs the same functions on a GPU (bf16 autocast).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.comm import free_port  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.metrics import read_metrics  # noqa: E402
from pipeline.flops import measure_peak_flops, model_flops_per_token  # noqa: E402
from pipeline.model import HybridLM, build_model  # noqa: E402
from pipeline.model.hybrid import HybridBlock  # noqa: E402

FLOP_DEFINITION = ("FLOPs per token: pipeline/flops.py for the hybrid (2 per matmul weight, attention 4*T*H "
                   "without causal halving, the scans' arithmetic) and the same convention for the Transformer; "
                   "training = 3 x forward; the optimizer step is in the time, not in the FLOPs")
CPU_TARGET_RATIO = 0.6
LOOP_MAX_OVERHEAD = 0.10


# ----------------------------------------------------------------------------------------------
# The two models
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


def hybrid_config(hidden_dim: int = 512, vocab_size: int = 8000, num_layers: Optional[int] = None,
                  preset: str = "production") -> ModelConfig:
    """A preset's model at another width / vocabulary, dropout 0 (the benchmarks' hybrid)."""
    model = yaml.safe_load((ROOT / f"launch/presets/{preset}.yaml").read_text())["model"]
    model.update(hidden_dim=hidden_dim, vocab_size=vocab_size, dropout=0.0)
    if num_layers is not None:
        model["num_layers"] = num_layers
    return ModelConfig(**model)


def matched_transformer(cfg: ModelConfig, target_params: int) -> TransformerLM:
    """Pre-norm GPT at the hybrid's width, vocabulary and tying, 4x MLP, with the number of layers whose
    parameter count is the closest to `target_params`."""
    H, V = cfg.hidden_dim, cfg.vocab_size
    per_layer = 12 * H * H + 4 * H                       # qkv, proj, 4x MLP; two LayerNorms
    fixed = V * H * (1 if cfg.tie_embeddings else 2) + 2 * H
    layers = max(1, round((target_params - fixed) / per_layer))
    return TransformerLM(V, H, layers, max(1, H // 64), 4 * H, cfg.tie_embeddings)


def flops_per_token(model: nn.Module, T: int) -> float:
    """Training FLOPs per token (see FLOP_DEFINITION)."""
    if isinstance(model, HybridLM):
        return model_flops_per_token(model.cfg, T)
    H = model.embed.weight.shape[1]
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 3.0 * (2.0 * matmul + len(model.blocks) * 4.0 * T * H)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# One training step, timed
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW over the model's own parameter groups (the trainer's), fused on CUDA unless told otherwise.
    A small learning rate: the timed steps must not drift the weights far from initialisation."""
    groups = model.parameter_groups(0.1) if hasattr(model, "parameter_groups") else model.parameters()
    device = next(model.parameters()).device
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(groups, lr=1e-5, weight_decay=0.1, **({"fused": True} if fused else {}))


def train_step(model: nn.Module, opt: Optional[torch.optim.Optimizer], ids: torch.Tensor,
               amp: Optional[torch.dtype] = None) -> torch.Tensor:
    """forward, fp32 cross-entropy (the trainer's lm_loss), backward, optimizer step (if any)."""
    with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
        logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, vocab: int, B: int, T: int, reps: int = 3,
               warmup: int = 1, amp: Optional[torch.dtype] = None) -> List[float]:
    """Seconds of each of `reps` training steps after `warmup` untimed ones."""
    return time_interleaved({"model": (model, opt, None)}, vocab, B, T, reps, warmup, amp)["model"]


def time_interleaved(runs: Dict[str, Tuple[nn.Module, torch.optim.Optimizer, Optional[Callable[[], None]]]],
                     vocab: int, B: int, T: int, reps: int = 3, warmup: int = 1,
                     amp: Optional[torch.dtype] = None) -> Dict[str, List[float]]:
    """Seconds of `reps` training steps of each run {name: (model, optimizer, setup or None)}, the runs taking
    turns step by step: a change in the machine's load then hits every run alike, and their ratio holds."""
    device = next(next(iter(runs.values()))[0].parameters()).device
    ids = torch.randint(0, vocab, (B, T + 1), device=device)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(warmup + reps):
        for name, (model, opt, setup) in runs.items():
            if setup is not None:
                setup()
            synchronize(device)
            t = time.perf_counter()
            train_step(model, opt, ids, amp)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


class Peak:
    """The best matmul FLOP/s seen over the run: measured at the start and again whenever asked, so that a
    moment of load on a shared machine lowers no MFU denominator (the peak is what the hardware can do)."""

    def __init__(self, device="cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.size = 8192 if self.device.type == "cuda" else 2048
        self.value, self.samples = 0.0, 0
        self.measure(2.0)

    def measure(self, seconds: float = 0.5) -> float:
        self.value = max(self.value, measure_peak_flops(self.device, self.dtype, seconds, self.size))
        self.samples += 1
        return self.value

    def describe(self) -> str:
        value = f"{self.value / 1e12:.4g} TFLOP/s" if self.device.type == "cuda" else f"{self.value / 1e9:.1f} GFLOP/s"
        return (f"{value}, the best {str(self.dtype).replace('torch.', '')} "
                f"{self.size}x{self.size} matmul of {self.samples} measurements during this run")


# ----------------------------------------------------------------------------------------------
# Where one step goes
# ----------------------------------------------------------------------------------------------

COMPONENTS = {
    "embedding": "embedding",
    "spiking": "spiking stream (spike_proj + LIF)",
    "liquid": "liquid stream (liquid + liquid_out)",
    "encoder": "spike encoder + adapter",
    "mamba": "Mamba",
    "cross": "cross-attention (both directions)",
    "gate": "adaptive gate",
    "attention": "self-attention layers",
    "head": "head (norm_f + lm_head + cross-entropy)",
    "optimizer": "optimizer (AdamW step)",
    "other": "other: norms, residuals, concat (step - sum)",
}


def component_calls(model: HybridLM, targets: torch.Tensor) -> List[Tuple[str, nn.Module, Callable]]:
    """(component, module whose call inputs are captured, function of those inputs that runs the component
    and returns what receives a gradient in the model), for every part of a HybridLM, layer by layer."""
    cfg = model.cfg
    calls: List[Tuple[str, nn.Module, Callable]] = [("embedding", model.embed, lambda ids: model.embed(ids))]
    for layer in model.layers:
        if not isinstance(layer, HybridBlock):  # AttentionLayer: its norm and residual are glue
            attn = layer.attn
            calls.append(("attention", attn, lambda x, *_, attn=attn: attn(x)[0]))
            continue
        b = layer

        def spiking(xn, b=b):
            rate, mem, _, _ = b.lif(b.spike_proj(xn))
            # The membrane reaches the loss only through the `potential` encoding.
            return (rate, mem) if b.mode is not None and cfg.spike_to_mamba_method == "potential" else rate

        calls.append(("spiking", b.spike_proj, spiking))
        calls.append(("liquid", b.liquid, lambda u, h0=None, b=b: b.liquid_out(b.liquid(u, h0)[0])))
        if b.mode is None:
            continue
        calls.append(("encoder", b.spike_encoder,
                      lambda s, mem, st=None, b=b: b.spike_adapter(b.spike_encoder(s, mem, st)[0])))
        calls.append(("mamba", b.mamba, lambda x, *_, b=b: b.mamba(x)[0]))
        for cross in (getattr(b, "cross_lm", None), getattr(b, "cross_ml", None)):
            if cross is not None:
                calls.append(("cross", cross, lambda q, kv, *_, c=cross: c(q, kv)[0]))
        if cfg.use_adaptive_gating:
            calls.append(("gate", b.gate, lambda l, m, b=b: b.gate(l, m)[0]))
    calls.append(("head", model.norm_f, lambda x: F.cross_entropy(
        model.lm_head(model.norm_f(x)).float().flatten(0, 1), targets.flatten())))
    return calls


def breakdown(model: HybridLM, opt: torch.optim.Optimizer, B: int, T: int, reps: int = 3,
              amp: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Seconds per component of one training step, summed over layers, `step` and `other` = step - their sum.

    Each component's real inputs are captured during one forward (pre-hooks); then, in each of `reps` rounds
    (after a warm-up round), one whole training step runs (its optimizer step timed apart) and every
    component runs forward + backward alone on its captured inputs (inputs that need a gradient in the model
    get one); medians over the rounds.  Rounds interleave the step and its parts, so a change of the
    machine's load shifts both alike."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.cfg.vocab_size, (B, T + 1), device=device)
    calls = component_calls(model, ids[:, 1:])
    captured: Dict[int, tuple] = {}

    def grab(module, args):
        captured[id(module)] = tuple(a.detach().clone().requires_grad_(a.is_floating_point())
                                     if isinstance(a, torch.Tensor) else a for a in args)

    hooks = [module.register_forward_pre_hook(grab) for _, module, _ in calls]
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(ids[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    inputs = [captured[id(module)] for _, module, _ in calls]
    del captured
    grads: List[Optional[list]] = [None] * len(calls)

    def run(i: int) -> float:
        fn, args = calls[i][2], inputs[i]
        model.zero_grad(set_to_none=True)
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = fn(*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if grads[i] is None:  # a fixed random upstream gradient per component (ones for the scalar loss)
            grads[i] = [torch.ones_like(o) if o.ndim == 0 else torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads[i])
        synchronize(device)
        return time.perf_counter() - t

    samples: Dict[str, List[float]] = {name: [] for name in COMPONENTS if name != "other"}
    samples["step"] = []
    for rnd in range(reps + 1):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        t0 = time.perf_counter()
        train_step(model, None, ids, amp)
        synchronize(device)
        t1 = time.perf_counter()
        opt.step()
        synchronize(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        parts = {name: 0.0 for name in samples}
        parts.update(step=t2 - t0, optimizer=t2 - t1)
        for i, (name, _, _) in enumerate(calls):
            parts[name] += run(i)
        if rnd > 0:
            for name, value in parts.items():
                samples[name].append(value)
    model.zero_grad(set_to_none=True)
    out = {name: median(values) for name, values in samples.items()}
    out["other"] = out["step"] - sum(v for k, v in out.items() if k != "step")
    return out


def print_breakdown(parts: Dict[str, float], title: str) -> None:
    step = parts["step"]
    print(title)
    print(f"  {'component':46} {'ms':>9} {'share':>7}")
    for name, label in COMPONENTS.items():
        print(f"  {label:46} {parts[name] * 1e3:9.1f} {parts[name] / step:7.1%}")
    print(f"  {'one training step (measured)':46} {step * 1e3:9.1f} {1:7.1%}", flush=True)


# ----------------------------------------------------------------------------------------------
# The training loop against the bare step
# ----------------------------------------------------------------------------------------------

def prepare_data(data_dir: Path, vocab_size: int = 4000, log: Optional[Path] = None) -> Path:
    """A tokenized corpus (the Python standard library's sources) for the loop run, built once."""
    if not (data_dir / "manifest.json").is_file():
        print(f"preparing {data_dir} (once, ~30 s)", flush=True)
        cmd = [sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out_dir", str(data_dir),
               "--vocab_size", str(vocab_size), "--max_bytes", "3000000"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"data preparation failed:\n{result.stderr[-2000:]}")
    return data_dir


def loop_step_times(cfg: ModelConfig, B: int, T: int, data_dir: Path, run_dir: Path, ds_config: str, steps: int,
                    threads: Optional[int] = None) -> Tuple[List[float], List[float]]:
    """`Trainer.run_step()` (launch/train.py's step: train_step and the per-step callbacks, logging every step)
    in this process with exactly `cfg`, micro-batch B, no accumulation: (seconds of each step, the loop's own
    tokens_per_s of each step). DeepSpeed runs as a group of one; evaluation and checkpoints are not timed."""
    from pipeline.run_config import parse_run_config
    from pipeline.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    preset = run_dir.parent / f"{run_dir.name}.yaml"
    preset.write_text(yaml.safe_dump({
        "model": dataclasses.asdict(cfg),
        "data": {"data_dir": str(data_dir), "sequence_length": T},
        "train": {"out_dir": str(run_dir), "max_steps": steps, "micro_batch_size": B,
                  "gradient_accumulation_steps": 1, "log_interval": 1, "eval_interval": steps, "eval_batches": 1,
                  "checkpoint_interval": steps, "keep_best": False, "report": False, "warmup_steps": 2}}))
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the trainer keeps it (configure_cpu_threads)
        torch.set_num_threads(threads)
    trainer = Trainer(parse_run_config(["--deepspeed_config", str(ROOT / ds_config), "--config", str(preset)]))
    trainer.begin()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.run_step()
        times.append(time.perf_counter() - start)
    del trainer
    reported = [r["tokens_per_s"] for r in sorted(read_metrics(run_dir, "train"), key=lambda r: r["step"])]
    return times, reported


def loop_overhead(cfg: ModelConfig, B: int, T: int, *, data_dir: Path, out_dir: Path, ds_config: str,
                  steps: int = 8, warmup: int = 2, reps: int = 3, threads: Optional[int] = None,
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The loop's steady-state step time against the bare step (same config, micro-batch, precision), the
    bare step measured right before and right after the loop run.

    The verdict compares the fastest steps of each: a shared machine's load only ever adds time, and it
    may change between the runs, so the least-disturbed steps are what compares the two codes' own costs
    (the medians are printed beside them; on a quiet machine the two agree)."""
    def bare() -> List[float]:
        torch.manual_seed(0)
        model = build_model(cfg).to(device=device, dtype=dtype)
        # The trainer's optimizer: torch's AdamW (not fused) over the same parameter groups.
        times = time_steps(model, make_optimizer(model, fused=False), cfg.vocab_size, B, T, reps=reps)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the loop's own process needs the memory
        return times

    before = bare()
    times, reported = loop_step_times(cfg, B, T, data_dir, out_dir / "loop_run", ds_config, steps, threads)
    intervals, reported = times[warmup:], reported[warmup:]
    if not intervals:
        raise RuntimeError(f"the loop run wrote no steady-state steps (steps {steps}, warm-up {warmup})")
    after = bare()
    bare_s, loop_s = min(before + after), min(intervals)
    overhead = loop_s / bare_s - 1
    return {"B": B, "T": T, "hidden_dim": cfg.hidden_dim, "ds_config": ds_config,
            "bare_step_s": bare_s, "loop_step_s": loop_s, "bare_tok_s": B * T / bare_s, "loop_tok_s": B * T / loop_s,
            "overhead": overhead, "ok": overhead < LOOP_MAX_OVERHEAD,
            "bare_median_s": median(before + after), "loop_median_s": median(intervals),
            "overhead_of_medians": median(intervals) / median(before + after) - 1,
            "bare_before_s": before, "bare_after_s": after, "loop_intervals_s": intervals,
            "loop_reported_tok_s": median(reported)}


def print_loop(r: dict, note: str = "") -> None:
    print(f"training loop vs bare step (hidden {r['hidden_dim']}, seq {r['T']} x batch {r['B']}, "
          f"Trainer.run_step with {r['ds_config']}, 1 process, logging every step: the worst case{note}):")
    print(f"  bare step (fwd + bwd + AdamW)   {r['bare_tok_s']:9.1f} tok/s  (fastest of {len(r['bare_before_s'])} "
          f"before and {len(r['bare_after_s'])} after the loop run: {r['bare_step_s']:.3f} s; median "
          f"{r['bare_median_s']:.3f} s)")
    print(f"  Trainer.run_step steady state   {r['loop_tok_s']:9.1f} tok/s  (fastest wall clock of "
          f"{len(r['loop_intervals_s'])} steps after warm-up: {r['loop_step_s']:.3f} s; median "
          f"{r['loop_median_s']:.3f} s; the loop's own tokens_per_s, median {r['loop_reported_tok_s']:.1f})")
    print(f"  loop overhead (engine + guard + logging, per step): {r['overhead']:+.1%}   "
          f"{'PASS' if r['ok'] else 'FAIL'} (target < {LOOP_MAX_OVERHEAD:.0%}; of the medians: "
          f"{r['overhead_of_medians']:+.1%})", flush=True)


# ----------------------------------------------------------------------------------------------
# The CPU run
# ----------------------------------------------------------------------------------------------

def parse_points(text: str) -> List[Tuple[int, int]]:
    """"256x8,1024x2" -> [(256, 8), (1024, 2)] (seq x batch)."""
    return [tuple(int(v) for v in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def load_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = "  (other processes compete for the cores: expect noise)" if load > 0.5 * cores else ""
    return f"load average {load:.1f} on {cores} cores{busy}"


def run(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; {load_note()}", flush=True)
    peak = Peak("cpu", torch.float32)
    cfg = hybrid_config(args.hidden, args.vocab)
    hybrid = build_model(cfg)
    n = num_params(hybrid)
    base = matched_transformer(cfg, n)
    print(f"hybrid: production preset, hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}, dropout 0: "
          f"{n / 1e6:.2f}M parameters")
    print(f"Transformer: pre-norm, causal SDPA, 4x GELU MLP, d{cfg.hidden_dim}, {len(base.blocks)} layers x "
          f"{base.blocks[0].heads} heads, {'tied' if cfg.tie_embeddings else 'untied'}: "
          f"{num_params(base) / 1e6:.2f}M parameters")
    print(f"one step = forward + backward + AdamW; the two models take turns step by step; median of {args.reps} "
          f"after 1 warm-up", flush=True)
    opt_h, opt_t = make_optimizer(hybrid), make_optimizer(base)
    points = parse_points(args.points)
    steps = {}
    for T, B in points:
        print(f"  measuring seq {T} x batch {B} ...", flush=True)
        steps[(T, B)] = time_interleaved({"hybrid": (hybrid, opt_h, None), "transformer": (base, opt_t, None)},
                                         cfg.vocab_size, B, T, args.reps)
        peak.measure()
    print(f"peak: {peak.describe()}")
    print(FLOP_DEFINITION)
    header = (f"{'seq':>5} {'batch':>5} | {'hybrid tok/s':>12} {'MFU':>6} | {'Transf. tok/s':>13} {'MFU':>6} | "
              f"{'ratio':>5}  target >= {CPU_TARGET_RATIO}")
    print(header)
    print("-" * len(header))
    passed = []
    for (T, B), t in steps.items():
        tok_h, tok_t = B * T / median(t["hybrid"]), B * T / median(t["transformer"])
        mfu_h = flops_per_token(hybrid, T) * tok_h / peak.value
        mfu_t = flops_per_token(base, T) * tok_t / peak.value
        passed.append(tok_h / tok_t >= CPU_TARGET_RATIO)
        print(f"{T:5d} {B:5d} | {tok_h:12.1f} {mfu_h:6.1%} | {tok_t:13.1f} {mfu_t:6.1%} | {tok_h / tok_t:5.2f}  "
              f"{'PASS' if passed[-1] else 'FAIL'}", flush=True)
    del base, opt_t
    for T, B in points:
        parts = breakdown(hybrid, opt_h, B, T, reps=args.reps)
        print_breakdown(parts, f"where one hybrid training step goes (seq {T} x batch {B}; each component forward + "
                               f"backward alone on its captured inputs, in turn with whole steps, median of "
                               f"{args.reps}, summed over layers):")
    verdict = (f"CPU target (hybrid >= {CPU_TARGET_RATIO} x Transformer at every point): "
               f"{'PASS' if all(passed) else 'FAIL'}")
    if args.no_loop:
        print(verdict)
        return
    T, B = points[0]
    loop_cfg = cfg if args.loop_hidden == cfg.hidden_dim else hybrid_config(args.loop_hidden, args.vocab)
    del hybrid, opt_h
    out = Path(args.out)
    data = prepare_data(Path(args.data_dir) if args.data_dir else out / "data")
    r = loop_overhead(loop_cfg, B, T, data_dir=data, out_dir=out, ds_config="ds_configs/cpu.json",
                      steps=args.loop_steps, reps=args.reps, threads=args.threads)
    print_loop(r, "" if loop_cfg is cfg else f"; a smaller width than the table's {cfg.hidden_dim}, for time")
    print(f"{load_note()} at the end")
    print(f"{verdict}; loop overhead < {LOOP_MAX_OVERHEAD:.0%}: {'PASS' if r['ok'] else 'FAIL'}")


def profile(spec: str, args) -> None:
    width, _, seq = spec.rpartition(":")
    T = int(seq)
    torch.set_num_threads(args.threads)
    cfg = hybrid_config(int(width) if width else args.hidden, args.vocab)
    model = build_model(cfg)
    B = dict((t, b) for t, b in parse_points(args.points)).get(T, max(1, 2048 // T))
    opt = make_optimizer(model)
    time_steps(model, opt, cfg.vocab_size, B, T, reps=0, warmup=1)
    with torch.profiler.profile() as prof:
        time_steps(model, opt, cfg.vocab_size, B, T, reps=1, warmup=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def components(threads: int) -> None:
    """fwd+bwd of each recurrence: the blocked form used by the model vs its sequential reference."""
    from pipeline.model.liquid import CfC, LiquidScan
    from pipeline.model.scan import _DiagScan, diag_scan, diag_scan_ref, selective_scan, selective_scan_ref
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
        fused = t_fb(lambda: diag_scan(a, b), a, b)
        blocked = t_fb(lambda: _DiagScan.apply(a, b, None), a, b)
        print(f"  diag scan B{B} T{T} D{D}: fused C++ {fused:8.1f} | blocked {blocked:8.1f} | "
              f"unbind loop {t_fb(lambda: diag_scan_ref(a, b), a, b):8.1f}")
    for B, T, E, N in [(32, 256, 256, 32), (4, 1024, 1280, 32)]:
        ins = [torch.randn(B, T, E), 0.1 * torch.rand(B, T, E), -8 * torch.rand(E, N),
               torch.randn(B, T, N), torch.randn(B, T, N)]
        ins = [x.requires_grad_() for x in ins]
        fused = t_fb(lambda: selective_scan(*ins), *ins)
        blocked = t_fb(lambda: selective_scan(*ins, method="blocked"), *ins)
        ref = t_fb(lambda: selective_scan_ref(*ins), *ins, reps=1)
        print(f"  selective scan B{B} T{T} E{E} N{N}: fused C++ {fused:8.1f} | blocked {blocked:8.1f} | "
              f"unbind loop (ref) {ref:8.1f}")
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
    from pipeline.plasticity.stdp import stdp_terms
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
    from pipeline.plasticity.stdp import STDP

    demo = yaml.safe_load((ROOT / "launch/presets/demo.yaml").read_text())["model"]
    cfg = ModelConfig(**demo)
    ids = torch.randint(0, cfg.vocab_size, (8, 128))
    plain, plastic = build_model(cfg), build_model(cfg)
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
    p.add_argument("--hidden", type=int, default=512, help="hybrid width (production preset otherwise)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--points", default="256x8,1024x2", help="seq x batch, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up); medians reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no_loop", action="store_true", help="skip the training-loop overhead run")
    p.add_argument("--loop_hidden", type=int, default=None, help="width of the loop-overhead run (default: --hidden)")
    p.add_argument("--loop_steps", type=int, default=10, help="steps of the loop run (the first 2 are warm-up)")
    p.add_argument("--data_dir", default=None, help="tokenized data for the loop run (default: OUT/data, built once)")
    p.add_argument("--out", default=str(ROOT / "outputs/bench"), help="the loop run's folder and log go here")
    p.add_argument("--profile", default=None, help="[WIDTH:]SEQ, e.g. 256: print an op profile instead")
    p.add_argument("--components", action="store_true", help="time each recurrence vs its reference instead")
    args = p.parse_args(argv)
    if args.loop_hidden is None:
        args.loop_hidden = args.hidden
    if args.components:
        components(args.threads)
        return
    if args.profile:
        profile(args.profile, args)
        return
    run(args)


if __name__ == "__main__":
    main()
