"""GPU-side checks of the model (the `parity` and `speed` stages of bench/gpu_check.sh, on a CUDA machine).

* parity: every Mamba layer of a production-preset model run through mamba_ssm's kernels and through
  the pure-PyTorch blocked scan on the *same* weights: outputs and gradients (fp32), then the whole
  model's logits;
* portability: a state_dict saved from a CPU model loads into the CUDA model and gives the same logits;
* speed: one training step (forward, backward, fused AdamW; bf16 autocast) of the production preset at
  hidden 640 x 8 layers, vocab 32000 (107.6M parameters) on the mamba-ssm path and on the pure-PyTorch
  path, against a pre-norm SDPA Transformer of the same width and parameter count, at seq x batch
  256x32, 1024x16 and 4096x4: tokens/s, MFU against the datasheet peak (pipeline/flops.py) and against a
  bf16 matmul peak measured in the same run, the ratio, PASS/FAIL of the targets (>= 0.5x and >= 15 %
  MFU at seq 1024; tokens/s falling <= 25 % from 1024 to 4096); where one step at seq 1024 goes, per
  component; and launch/train.py's steady-state tokens/s against the bare step (with --data).

    python bench/gpu_model_check.py --stage speed --data DIR --json speed.json
    python bench/gpu_model_check.py --stage speed --rehearse-on-cpu --data DIR   # the same code on a CPU, tiny model

Exit status 1 when a parity check fails; `--json FILE` also writes the numbers there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model import (FLOP_DEFINITION, Peak, breakdown, flops_per_token, hybrid_config,  # noqa: E402
                               loop_overhead, make_optimizer, matched_transformer, num_params, parse_points,
                               print_breakdown, print_loop, time_interleaved)
from pipeline.flops import gpu_peak_flops  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.model.mamba import Mamba, cuda_kernels  # noqa: E402

RESULTS: dict = {}
TARGET_RATIO, TARGET_MFU, MAX_DROP = 0.5, 0.15, 0.25


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def set_backend(model, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, Mamba):
            m.backend = backend


def parity(width: int, vocab: int, T: int, tol: float) -> bool:
    torch.manual_seed(0)
    cfg = hybrid_config(width, vocab)
    model = build_model(cfg).cuda()
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
        RESULTS.setdefault("parity", []).append({"width": width, "T": T, "layer": i, "rel_out": e_out,
                                                 "rel_grad": e_grad, "ok": bool(flag)})
        print(f"  width {width} mamba layer {i}: rel out {e_out:.2e}  rel grad {e_grad:.2e}  "
              f"{'ok' if flag else 'FAIL'}")
    ids = torch.randint(0, cfg.vocab_size, (2, T), device="cuda")
    with torch.no_grad():
        set_backend(model, "cuda")
        a = model(ids)
        set_backend(model, "torch")
        b = model(ids)
    # Informational: a 1e-6 difference can flip a spike that sits on its threshold downstream.
    print(f"  width {width} whole model logits T={T}: rel {rel(a, b):.2e} (informational)")
    cpu = build_model(cfg)
    model.load_state_dict(cpu.state_dict())
    with torch.no_grad():
        set_backend(model, "auto")
        e = rel(model(ids[:, :64]).cpu(), cpu(ids[:, :64].cpu()))
    print(f"  width {width} CPU checkpoint on CUDA: rel logits {e:.2e} (loads: ok)")
    return ok


def speed(cfg, points, device="cuda", amp=torch.bfloat16, reps: int = 5, warmup: int = 2, data_dir=None,
          out_dir=None, ds_config: str = "ds_configs/bf16.json", loop_steps: int = 20, threads=None,
          rehearsal: bool = False, backends: str = "auto", save=lambda: None) -> dict:
    """The speed table, the targets, the breakdown at the second point and (with data_dir) the loop against
    the bare step; printed, and returned (also as RESULTS["speed"]).  On a CPU (device "cpu", amp None)
    the same code runs on whatever model it is given: a rehearsal, whose targets are not judged.
    backends: "auto" both Mamba paths where mamba-ssm is importable, "torch" or "cuda" one of them (the GPU
    check measures them in separate calls). save() runs after every measured row, so a crash keeps them."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    kind = str(amp or torch.float32).replace("torch.", "")
    peak = Peak(device, amp or torch.float32)
    sheet = gpu_peak_flops(name, amp or torch.float32) if cuda else None
    torch.manual_seed(0)
    hybrid = build_model(cfg).to(device)
    base = matched_transformer(cfg, num_params(hybrid)).to(device)
    backends = {"auto": (["cuda"] if cuda and cuda_kernels() else []) + ["torch"], "torch": ["torch"],
                "cuda": ["cuda"]}[backends]
    if "cuda" in backends and not (cuda and cuda_kernels()):
        raise RuntimeError("--backends cuda: mamba_ssm's kernels are not importable here (or no CUDA device)")
    label = {"cuda": "hybrid mamba-ssm", "torch": "hybrid PyTorch"}
    res = {"device": name, "precision": f"{kind} autocast" if amp else kind, "peak_datasheet": sheet,
           "mamba_ssm_kernels": bool(cuda and cuda_kernels()), "rehearsal": rehearsal,
           "hybrid_params": num_params(hybrid), "transformer_params": num_params(base),
           "transformer_layers": len(base.blocks), "rows": []}
    RESULTS["speed"] = res
    print(f"{name}: {res['precision']}, forward + backward + {'fused ' if cuda else ''}AdamW; "
          f"hybrid hidden {cfg.hidden_dim} x {cfg.num_layers} layers, vocab {cfg.vocab_size}: "
          f"{res['hybrid_params'] / 1e6:.1f}M parameters; Transformer d{cfg.hidden_dim} x {len(base.blocks)} layers: "
          f"{res['transformer_params'] / 1e6:.1f}M; mamba-ssm kernels: {'yes' if 'cuda' in backends else 'NO'}",
          flush=True)
    if "cuda" not in backends and cuda:
        print("  (without mamba-ssm the kernel column is missing and the targets are judged on the PyTorch path)")
    opt_h, opt_t = make_optimizer(hybrid), make_optimizer(base)
    steps = {}
    for T, B in points:
        steps[T] = time_interleaved({**{b: (hybrid, opt_h, lambda b=b: set_backend(hybrid, b)) for b in backends},
                                     "transformer": (base, opt_t, None)}, cfg.vocab_size, B, T, reps, warmup, amp)
        peak.measure()
        # Raw step times as they come: a later crash or deadline still leaves them in the JSON.
        res.setdefault("step_seconds", {})[str(T)] = {"B": B, **steps[T]}
        save()
    measured = res["peak_measured"] = peak.value
    mfu_peak = sheet or measured
    print(f"peak: {f'{sheet / 1e12:.0f} TFLOP/s {kind} dense, datasheet; ' if sheet else ''}{peak.describe()}")
    print(FLOP_DEFINITION)
    against = "the datasheet peak (in brackets: against the measured one)" if sheet else "the measured peak"
    print(f"MFU: against {against}; the models take turns step by step, median of {reps} after {warmup} warm-up")
    cols = [label[b] for b in backends] + ["Transformer"]
    header = f"{'seq':>5} {'batch':>5} | " + " | ".join(f"{c + ' tok/s':>22} {'MFU':>15}" for c in cols) + " | ratio"
    print(header)
    print("-" * len(header))
    for T, B in points:
        row = {"T": T, "B": B}
        cells = []
        for b, model in [(b, hybrid) for b in backends] + [("transformer", base)]:
            key = "transformer" if b == "transformer" else f"hybrid_{b}"
            tok = row[f"{key}_tok_s"] = B * T / median(steps[T][b])
            fl = flops_per_token(model, T) * tok
            row[f"{key}_mfu_measured"] = fl / measured
            if sheet:
                row[f"{key}_mfu_datasheet"] = fl / sheet
            mfu = f"{fl / sheet:6.1%} ({fl / measured:5.1%})" if sheet else f"{fl / measured:.1%}"
            cells.append(f"{tok:22.0f} {mfu:>15}")
        for b in backends:
            row[f"ratio_{b}"] = row[f"hybrid_{b}_tok_s"] / row["transformer_tok_s"]
        res["rows"].append(row)
        save()
        print(f"{T:5d} {B:5d} | " + " | ".join(cells) + " | " + " ".join(f"{row[f'ratio_{b}']:.2f}" for b in backends),
              flush=True)

    # Targets on the path production trains with: mamba-ssm where present.
    best = backends[0]
    (T_ref, B_ref), (T_long, _) = points[1], points[-1]
    ref = next(r for r in res["rows"] if r["T"] == T_ref)
    long = next(r for r in res["rows"] if r["T"] == T_long)
    mfu_ref = flops_per_token(hybrid, T_ref) * ref[f"hybrid_{best}_tok_s"] / mfu_peak
    drop = 1 - long[f"hybrid_{best}_tok_s"] / ref[f"hybrid_{best}_tok_s"]
    res["targets"] = [
        {"name": f"ratio_at_{T_ref}", "value": ref[f"ratio_{best}"], "target": f">= {TARGET_RATIO}",
         "pass": ref[f"ratio_{best}"] >= TARGET_RATIO},
        {"name": f"mfu_at_{T_ref}", "value": mfu_ref, "target": f">= {TARGET_MFU:.0%} of the "
         f"{'datasheet' if sheet else 'measured'} peak", "pass": mfu_ref >= TARGET_MFU},
        {"name": f"drop_{T_ref}_to_{T_long}", "value": drop, "target": f"<= {MAX_DROP:.0%}", "pass": drop <= MAX_DROP},
    ]
    note = "  (CPU rehearsal: the targets are the GPU's, shown, not judged)" if rehearsal else ""
    print(f"targets ({label[best]}):{note}")
    for t in res["targets"]:
        value = f"{t['value']:.2f}x" if t["name"].startswith("ratio") else f"{t['value']:.1%}"
        print(f"  {t['name']:22} {value:>8}  target {t['target']:34} {'PASS' if t['pass'] else 'FAIL'}", flush=True)
    save()

    set_backend(hybrid, best)
    parts = breakdown(hybrid, opt_h, B_ref, T_ref, reps=reps, amp=amp)
    res["breakdown"] = {"T": T_ref, "B": B_ref, "backend": best, "seconds": parts}
    print_breakdown(parts, f"where one hybrid training step goes ({label[best]}, seq {T_ref} x batch {B_ref}, "
                           f"{res['precision']}; each component forward + backward alone on its captured inputs, "
                           f"in turn with whole steps, median of {reps}, summed over layers):")
    save()

    if data_dir is not None:
        del hybrid, base, opt_h, opt_t
        if cuda:
            torch.cuda.empty_cache()  # the loop's process needs the memory
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(ds_config), torch.float32)
        r = loop_overhead(cfg, B_ref, T_ref, data_dir=Path(data_dir), out_dir=Path(out_dir), ds_config=ds_config,
                          steps=loop_steps, warmup=3, reps=reps, threads=threads, device=str(device), dtype=dtype)
        res["loop"] = r
        save()
        print_loop(r, f"; the bare step in the engine's precision, {dtype}".replace("torch.", ""))
    return res


def _precision(ds_config: str) -> str:
    config = json.loads((ROOT / ds_config).read_text())
    return next((k for k in ("bf16", "fp16") if config.get(k, {}).get("enabled")), "fp32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("parity", "speed", "all"), default="all")
    p.add_argument("--widths", default="128,640", help="parity: model widths (production preset otherwise)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--points", default="256x32,1024x16,4096x4", help="speed: seq x batch; targets at the 2nd and last")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--data", default=None, help="tokenized data: also run launch/train.py against the bare step")
    p.add_argument("--out", default=str(ROOT / "outputs/gpu_speed"), help="the loop run's folder")
    p.add_argument("--loop_steps", type=int, default=20)
    p.add_argument("--ds_config", default="ds_configs/bf16.json", help="DeepSpeed JSON of the loop run")
    p.add_argument("--rehearse-on-cpu", action="store_true",
                   help="speed stage on the CPU with the tiny preset's model, fp32, cpu.json (developers)")
    p.add_argument("--json", default=None, help="write the measured numbers to this file (after every row)")
    p.add_argument("--backends", choices=("auto", "torch", "cuda"), default="auto",
                   help="speed: the Mamba paths to time (auto: mamba-ssm where importable, and pure PyTorch)")
    args = p.parse_args()

    def save() -> None:
        if args.json:  # written whole, then renamed: a reader never sees half a file
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(RESULTS, indent=2))
            tmp.replace(args.json)
    if args.rehearse_on_cpu:
        if args.stage != "speed":
            p.error("--rehearse-on-cpu runs the speed stage only")
    else:
        assert torch.cuda.is_available(), "needs a CUDA device"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, mamba_ssm kernels: "
              f"{'yes' if cuda_kernels() else 'NO (pure-PyTorch path only)'}")
    ok = True
    RESULTS["mamba_ssm_kernels"] = bool(cuda_kernels()) if not args.rehearse_on_cpu else False
    if args.stage in ("parity", "all"):
        if cuda_kernels():
            print("parity (fp32):")
            for width in (int(w) for w in args.widths.split(",")):
                for T in (64, 1000):
                    ok &= parity(width, args.vocab, T, args.tol)
            print("PARITY OK" if ok else "PARITY FAILED")
        else:
            print("parity: skipped, mamba_ssm is not importable (pure-PyTorch path only)")
    if args.stage in ("speed", "all"):
        if args.rehearse_on_cpu:
            # One thread, here and in the loop run: a rehearsal checks the code path, and a second thread on
            # a shared machine only adds waiting for the other core.
            torch.set_num_threads(1)
            speed(hybrid_config(32, args.vocab, preset="tiny"), [(32, 4), (64, 2), (128, 1)], "cpu", None,
                  reps=3, warmup=1, data_dir=args.data, out_dir=args.out, ds_config="ds_configs/cpu.json",
                  loop_steps=10, threads=1, rehearsal=True, save=save)
        else:
            speed(hybrid_config(args.hidden, args.vocab, args.layers), parse_points(args.points), "cuda",
                  torch.bfloat16, reps=args.reps, data_dir=args.data, out_dir=args.out, ds_config=args.ds_config,
                  loop_steps=args.loop_steps, backends=args.backends, save=save)
    RESULTS["ok"] = bool(ok)
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
