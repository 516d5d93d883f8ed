"""NaN drill: the same run clean and with a share of micro-batches poisoned on random ranks, side by side.

    python bench/nan_drill.py --data_dir data/demo --steps 200 --fraction 0.05

Both runs use the real ZeRO-2 fp16 optimizer and loss scaler (on CPU: `--train.allow_cpu_fp16`) on
2 DeepSpeed processes. Prints skipped micro-batches, applied steps, non-finite weights and the final
losses of the poisoned run against the clean one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(name: str, args, extra: list[str]) -> Path:
    out = Path(args.out_dir) / name
    shutil.rmtree(out, ignore_errors=True)
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    cmd = [launcher, "--num_gpus", str(args.num_procs), "--master_port", str(args.master_port),
           str(ROOT / "launch/train.py"), "--deepspeed_config", str(ROOT / args.ds_config),
           "--config", str(ROOT / args.preset), "--data.data_dir", args.data_dir, "--model.vocab_size",
           str(args.vocab_size), "--train.max_steps", str(args.steps), "--train.gradient_accumulation_steps", "2",
           "--train.eval_interval", str(args.steps), "--train.checkpoint_interval", str(args.steps),
           "--train.log_interval", "10", "--train.lr", "0.005", "--train.warmup_steps", "10",
           "--train.allow_cpu_fp16", "true", "--train.out_dir", str(out), *extra]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out


def summarize(run_dir: Path) -> dict:
    import torch

    from pipeline.engine.checkpoint import load_for_inference
    from pipeline.metrics import read_metrics

    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    model, _, _ = load_for_inference(str(run_dir))
    return {
        "steps": train[-1]["step"],
        "steps_applied": train[-1]["step"] - train[-1]["skipped_overflow"],
        "micro_batches_trained": train[-1]["micro_batches_trained"],
        "skipped_nan": train[-1]["skipped_nan"],
        "loss_scale": train[-1].get("loss_scale"),
        "nonfinite_weights": sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()),
        "train_loss_last_50_steps": sum(r["loss"] for r in train[-5:]) / len(train[-5:]),
        "val_loss_final": evals[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/demo")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--preset", default="launch/presets/tiny.yaml")
    parser.add_argument("--ds_config", default="ds_configs/fp16_stable.json")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--num_procs", type=int, default=2)
    parser.add_argument("--master_port", type=int, default=29710)
    parser.add_argument("--out_dir", default="outputs/nan_drill")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    clean = summarize(run("clean", args, []))
    poisoned = summarize(run("poisoned", args, ["--stability.drill_nan_fraction", str(args.fraction),
                                                  "--stability.drill_seed", str(args.seed)]))
    print(f"{'':28s}{'clean':>14s}{'poisoned':>14s}")
    for key in clean:
        print(f"{key:28s}{clean[key]!s:>14.10}{poisoned[key]!s:>14.10}")
    print(f"val loss ratio poisoned/clean: {poisoned['val_loss_final'] / clean['val_loss_final']:.4f}")
    print(json.dumps({"clean": clean, "poisoned": poisoned}))


if __name__ == "__main__":
    main()
