"""GPU-side checks of the model (the `parity` and `speed` stages of bench/gpu_check.sh, on a CUDA machine).

* parity: every Mamba layer of a production-preset model run through mamba_ssm's kernels and through
  the pure-PyTorch blocked scan on the *same* weights: outputs and gradients (fp32), then the whole
  model's logits;
* portability: a state_dict saved from a CPU model loads into the CUDA model and gives the same logits;
* speed: training tokens/s (fwd+bwd, bf16 autocast) of the hybrid on the CUDA path, on the PyTorch
  path, and of the parameter-matched Transformer, at seq 256 and 1024.
Exit status 1 when a parity check fails; `--json FILE` also writes the numbers there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model import hybrid_config, matched_transformer  # noqa: E402
from pipeline.model import HybridLM  # noqa: E402
from pipeline.model.mamba import Mamba, cuda_kernels  # noqa: E402


RESULTS: dict = {}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def set_backend(model, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, Mamba):
            m.backend = backend


def parity(size: str, T: int, tol: float) -> bool:
    torch.manual_seed(0)
    cfg = hybrid_config(size)
    model = HybridLM(cfg).cuda()
    ok = True
    x = torch.randn(2, T, cfg.hidden_dim, device="cuda")
    for i, m in enumerate(mm for mm in model.modules() if isinstance(mm, Mamba)):
        outs, grads = {}, {}
        for backend in ("cuda", "torch"):
            m.backend = backend
            xi = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            out, _ = m(xi)
            (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
            outs[backend] = out.detach()
            grads[backend] = [xi.grad] + [p.grad for p in m.parameters()]
        e_out = rel(outs["torch"], outs["cuda"])
        e_grad = max(rel(a, b) for a, b in zip(grads["torch"], grads["cuda"]))
        flag = e_out < tol and e_grad < tol * 10
        ok &= flag
        RESULTS.setdefault("parity", []).append({"size": size, "T": T, "layer": i, "rel_out": e_out,
                                                 "rel_grad": e_grad, "ok": bool(flag)})
        print(f"  {size} mamba layer {i}: rel out {e_out:.2e}  rel grad {e_grad:.2e}  {'ok' if flag else 'FAIL'}")
    ids = torch.randint(0, cfg.vocab_size, (2, T), device="cuda")
    with torch.no_grad():
        set_backend(model, "cuda")
        a = model(ids)
        set_backend(model, "torch")
        b = model(ids)
    # Informational: a 1e-6 difference can flip a spike that sits on its threshold downstream.
    print(f"  {size} whole model logits T={T}: rel {rel(a, b):.2e} (informational)")
    cpu = HybridLM(cfg)
    model.load_state_dict(cpu.state_dict())
    with torch.no_grad():
        set_backend(model, "auto")
        e = rel(model(ids[:, :64]).cpu(), cpu(ids[:, :64].cpu()))
    print(f"  {size} CPU checkpoint on CUDA: rel logits {e:.2e} (loads: ok)")
    return ok


def tokens_per_s(model, vocab: int, B: int, T: int, steps: int = 5) -> float:
    ids = torch.randint(0, vocab, (B, T + 1), device="cuda")
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return B * T / sorted(times)[len(times) // 2]


def speed(size: str, tokens: int) -> None:
    cfg = hybrid_config(size)
    hybrid = HybridLM(cfg).cuda()
    base = matched_transformer(cfg, sum(p.numel() for p in hybrid.parameters())).cuda()
    for T in (256, 1024):
        B = max(1, tokens // T)
        row = {}
        for backend in (["cuda"] if cuda_kernels() else []) + ["torch"]:
            set_backend(hybrid, backend)
            row[backend] = tokens_per_s(hybrid, cfg.vocab_size, B, T)
        tt = tokens_per_s(base, cfg.vocab_size, B, T)
        RESULTS.setdefault("speed", []).append({"size": size, "T": T, "B": B, "transformer_tok_s": tt,
                                                **{f"hybrid_{k}_tok_s": v for k, v in row.items()},
                                                **{f"ratio_{k}": v / tt for k, v in row.items()}})
        cells = "  ".join(f"hybrid[{k}] {v:10.0f} tok/s ({v / tt:.2f}x)" for k, v in row.items())
        print(f"  {size} T={T} B={B}: {cells}  transformer {tt:10.0f} tok/s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--stage", choices=("parity", "speed", "all"), default="all")
    p.add_argument("--json", default=None, help="write the measured numbers to this file")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, mamba_ssm kernels: "
          f"{'yes' if cuda_kernels() else 'NO (pure-PyTorch path only)'}")
    ok = True
    RESULTS["mamba_ssm_kernels"] = cuda_kernels()
    if args.stage in ("parity", "all"):
        if cuda_kernels():
            print("parity (fp32):")
            for size in args.sizes.split(","):
                for T in (64, 1000):
                    ok &= parity(size, T, args.tol)
            print("PARITY OK" if ok else "PARITY FAILED")
        else:
            print("parity: skipped, mamba_ssm is not importable (pure-PyTorch path only)")
    if args.stage in ("speed", "all"):
        print("training speed (bf16 autocast, fwd+bwd):")
        for size in args.sizes.split(","):
            speed(size, args.tokens)
    RESULTS["ok"] = bool(ok)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
