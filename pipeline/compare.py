"""Head to head on your data: the hybrid against a Transformer of the same size, same pipeline, equal budget.

    python -m pipeline.compare --config launch/presets/demo.yaml --data.data_dir data/demo \\
        --budget tokens:2000000 --lrs 1e-3,2e-3,4e-3 --out outputs/compare

1. The hybrid is the preset (with any `--section.field value` overrides, as `launch/train.py` reads them). The
   Transformer (`model.arch: transformer`) gets the hybrid's width, vocabulary, tying and dropout, and the depth
   and SwiGLU width that bring its non-embedding parameter count to the hybrid's (within 5 %).
2. The budget becomes each run's `train.max_steps` (the LR schedule spans it): `tokens:N` the same steps for both,
   `flops:F` N = F / (training FLOPs per token, `pipeline/flops.py`) for each model, `seconds:S` equal time in
   training steps (`train.max_seconds`), the steps estimated from a short calibration run of each model
   (x `--seconds_headroom` 1.25, so the clock, not the schedule, ends the run).
3. Each model trains at every learning rate of `--lrs` through `deepspeed launch/train.py` (any `--num_procs`,
   any `--deepspeed_config`), the two models taking turns, so a change in the machine's load hits both; the run
   with the lowest final validation loss is each model's result.
4. `OUT/compare.md` (table, verdict, hardware and load), `OUT/compare.json` (every number), `OUT/plots/`
   (validation bits per byte against tokens and against training time, both models overlaid, by
   `pipeline/report.py`), `OUT/runs/<model>-lr<LR>/` (the run folders).

Everything but the model, the learning rate and, for `flops:`/`seconds:`, the step count is the same for both:
shards, tokenizer, validation documents, sequence length, batch size, seeds, precision, schedule shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

from pipeline.config import ConfigError, ModelConfig
from pipeline.flops import model_flops_per_token
from pipeline.metrics import read_metrics
from pipeline.run_config import RunConfig, parse_run_config

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("hybrid", "transformer")
MATCH_TOLERANCE = 0.05


# ---- sizing ------------------------------------------------------------------------------------

def transformer_non_embedding(H: int, layers: int, ffn: int) -> int:
    """Non-embedding parameters of TransformerLM: per layer q, kv, out (4 H^2), SwiGLU (3 H F), two norms; the
    final norm."""
    return layers * (4 * H * H + 3 * H * ffn + 2 * H) + H


def transformer_heads(cfg: ModelConfig) -> int:
    """64-wide heads (GPT-2's) where the width allows, else the hybrid's own head count, else 1 head."""
    H = cfg.hidden_dim
    for heads in (H // 64 if H % 64 == 0 else 0, cfg.num_attention_heads, 1):
        if heads > 0 and H % heads == 0 and (H // heads) % 2 == 0:
            return heads
    raise ConfigError(f"model.hidden_dim ({H}) must be even for the Transformer's rotary heads")


def matched_transformer_config(hybrid: ModelConfig, target: int) -> ModelConfig:
    """The Transformer at the hybrid's width whose non-embedding parameter count is `target` (within 5 %): the
    depth whose SwiGLU width comes closest to the usual 8/3 x hidden_dim, that width set to hit the target
    (a multiple of 8)."""
    H = hybrid.hidden_dim
    usual = 8 * H / 3
    best: Optional[Tuple[float, int, int]] = None
    for layers in range(1, 4 * max(1, target // (4 * H * H)) + 2):
        ffn = 8 * round(((target - H) / layers - 4 * H * H - 2 * H) / (3 * H) / 8)
        if ffn < 8:
            break
        cost = abs(math.log(ffn / usual))
        if best is None or cost < best[0]:
            best = (cost, layers, ffn)
    if best is None:
        raise ConfigError(f"the hybrid has {target} non-embedding parameters, fewer than one Transformer layer of "
                          f"width {H} (4 x {H}^2 in attention alone): no matched Transformer exists")
    _, layers, ffn = best
    cfg = ModelConfig(arch="transformer", vocab_size=hybrid.vocab_size, hidden_dim=H, num_layers=layers,
                      num_attention_heads=transformer_heads(hybrid), ffn_dim=ffn, dropout=hybrid.dropout,
                      tie_embeddings=hybrid.tie_embeddings)
    got = transformer_non_embedding(H, layers, ffn)
    if abs(got / target - 1) > MATCH_TOLERANCE:
        raise ConfigError(f"no Transformer of width {H} comes within {MATCH_TOLERANCE:.0%} of the hybrid's {target} "
                          f"non-embedding parameters (closest: {layers} layers, ffn {ffn}: {got})")
    return cfg


def parameter_counts(cfg: ModelConfig) -> dict:
    from pipeline.model import build_model, non_embedding_parameters

    model = build_model(cfg)
    return {"params": sum(p.numel() for p in model.parameters()), "non_embedding_params": non_embedding_parameters(model)}


# ---- budget ------------------------------------------------------------------------------------

def parse_budget(text: str) -> Tuple[str, float]:
    kind, _, value = text.partition(":")
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if kind not in ("tokens", "seconds", "flops") or amount <= 0:
        raise ConfigError(f"--budget {text!r} must be tokens:N, seconds:S or flops:F with a positive number")
    return kind, amount


def parse_lrs(text: str) -> List[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        lrs = []
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ConfigError(f"--lrs {text!r} must be a comma-separated list of positive learning rates")
    return lrs


def tokens_per_step(cfg: RunConfig, world_size: int) -> int:
    from pipeline.engine.setup import load_deepspeed_config

    ds = load_deepspeed_config(cfg.deepspeed_config, cfg.train)
    return ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size * \
        cfg.data.sequence_length


# ---- runs --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launcher:
    """`deepspeed launch/train.py` as `make demo` and the tests start it."""

    num_procs: int
    deepspeed_config: str
    launcher_args: List[str]

    def __call__(self, cfg: RunConfig, run_dir: Path, timeout: Optional[float] = None) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir.parent / f"{run_dir.name}.yaml"
        config = cfg.to_dict()
        config.pop("deepspeed_config")
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep
                                + os.environ.get("PATH", ""))
        if launcher is None:
            raise RuntimeError("the deepspeed launcher is not on PATH (install requirements.txt)")
        cmd = [launcher, "--num_gpus", str(self.num_procs), "--master_port", str(_free_port()), *self.launcher_args,
               str(ROOT / "launch/train.py"), "--deepspeed_config", self.deepspeed_config,
               "--config", str(config_path)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            # In the caller's folder: relative paths of the preset (data_dir, out_dir) mean what they meant here.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # its ranks with it
                proc.wait()
                return -9


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config_for(base: RunConfig, model: ModelConfig, lr: float, steps: int, out_dir: Path,
                   evals: int, max_seconds: float = 0.0) -> RunConfig:
    """The preset with this model, learning rate and length; evaluation spread over the run; the warm-up
    capped at a tenth of it (the same rule for both models)."""
    train = dataclasses.replace(base.train, out_dir=str(out_dir), lr=lr, max_steps=steps, max_seconds=max_seconds,
                                warmup_steps=min(base.train.warmup_steps, max(1, steps // 10)),
                                eval_interval=max(1, steps // evals), checkpoint_interval=max(steps, 1),
                                keep_checkpoints=1, keep_best=False, resume="none", exit_after_steps=0, report=True)
    return dataclasses.replace(base, model=model, train=train)


def calibrate(base: RunConfig, model: ModelConfig, launch: Launcher, out: Path, steps: int) -> float:
    """Tokens per second in training steps of `model` on this machine, from a short run (the first two steps,
    which pay for allocation and kernel builds, left out)."""
    run_dir = out / "calibration" / model.arch
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = run_config_for(base, model, base.train.lr, steps, run_dir, evals=1)
    cfg.train.eval_batches, cfg.train.log_interval, cfg.train.report = 1, 1, False
    code = launch(cfg, run_dir)
    rates = sorted(r["tokens_per_s"] for r in read_metrics(run_dir, "train") if r["step"] > 2) if code == 0 else []
    if not rates:
        raise RuntimeError(f"the calibration run of the {model.arch} failed (exit {code}); see {run_dir}.log")
    return rates[len(rates) // 2]


def run_result(run_dir: Path, lr: float, code: int) -> dict:
    """The numbers of one finished run, from its metrics.jsonl."""
    result = {"run_dir": str(run_dir), "lr": lr, "exit_code": code}
    evals = read_metrics(run_dir, "eval") if (run_dir / "metrics.jsonl").is_file() else []
    train = read_metrics(run_dir, "train") if evals else []
    if code != 0 or not evals or not train:
        return {**result, "failed": True}
    final, last_train = evals[-1], train[-1]
    tokens, seconds = final.get("train_tokens", 0), final.get("train_seconds", 0.0)
    tok_s = tokens / seconds if seconds else None
    mfu = last_train.get("mfu")  # the run's peak and FLOPs/token are fixed: scale the last interval's MFU
    result.update(
        failed=not math.isfinite(float(final["loss"])), step=final["step"], val_loss=float(final["loss"]),
        perplexity=final.get("perplexity"), bpb=final.get("bpb"), accuracy=final.get("accuracy"),
        val_tokens=final.get("tokens"), tokens_seen=tokens, train_seconds=seconds, tokens_per_s=tok_s,
        mfu=mfu * tok_s / last_train["tokens_per_s"] if mfu is not None and tok_s and last_train.get("tokens_per_s")
        else None,
        curve=[{k: r.get(k) for k in ("step", "train_tokens", "train_seconds", "loss", "bpb")} for r in evals])
    return result


def validation_digest(run_dir: Path, world: int) -> dict:
    """What a run of `world` ranks evaluated on, rebuilt from its own config.json and ds_config.json: the sha256 of
    the validation token ids (inputs, targets and mask) of every rank's evaluation batches, and how many count."""
    from pipeline.data import PackedReader

    config = json.loads((run_dir / "config.json").read_text())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    micro = ds["train_micro_batch_size_per_gpu"]
    digest, counted = hashlib.sha256(), 0
    for rank in range(world):
        reader = PackedReader(config["data"]["data_dir"], split="validation",
                              sequence_length=config["data"]["sequence_length"], micro_batch_size=micro,
                              seed=config["data"]["seed"], rank=rank, world_size=world, verify_checksums=False)
        limit = config["train"]["eval_batches"]
        for i, batch in enumerate(reader.iter_epoch_once()):
            if limit and i >= limit:
                break
            for key in ("input_ids", "targets", "loss_mask"):
                digest.update(batch[key].numpy().tobytes())
            counted += int(batch["loss_mask"].sum().item())
    return {"sha256": digest.hexdigest(), "tokens": counted}


# ---- report ------------------------------------------------------------------------------------

def hardware(launch: Launcher) -> dict:
    import torch

    info = {"host": platform.node(), "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "processes": launch.num_procs,
            "deepspeed_config": os.path.relpath(launch.deepspeed_config), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def verdict(results: dict, budget: str) -> str:
    h, t = results["hybrid"], results["transformer"]
    key, unit = ("bpb", "bits per byte") if h.get("bpb") and t.get("bpb") else ("val_loss", "validation loss")
    diff = 100 * (t[key] - h[key]) / t[key]
    if abs(diff) < 0.005:  # equal in the digits reported
        return f"At equal {budget}, the two are level: {unit} {h[key]:.4f} (hybrid) and {t[key]:.4f} (Transformer)."
    who = "hybrid" if diff > 0 else "Transformer"
    return (f"At equal {budget}, the {who} is better: {unit} {h[key]:.4f} (hybrid) vs {t[key]:.4f} (Transformer), "
            f"the hybrid {abs(diff):.2f} % {'lower' if diff > 0 else 'higher'}.")


def write_markdown(summary: dict, path: Path) -> None:
    h, t = summary["results"]["hybrid"], summary["results"]["transformer"]
    hw, s = summary["hardware"], summary["sizes"]
    rows = [("parameters", s["hybrid"]["params"], s["transformer"]["params"], ","),
            ("non-embedding parameters", s["hybrid"]["non_embedding_params"], s["transformer"]["non_embedding_params"],
             ","),
            ("FLOPs per token (training)", s["hybrid"]["flops_per_token"], s["transformer"]["flops_per_token"], ".4g"),
            ("tokens seen", h["tokens_seen"], t["tokens_seen"], ","),
            ("wall time in training steps (s)", h["train_seconds"], t["train_seconds"], ".1f"),
            ("tokens/s", h["tokens_per_s"], t["tokens_per_s"], ".1f"),
            ("MFU", h["mfu"] and 100 * h["mfu"], t["mfu"] and 100 * t["mfu"], ".2f"),
            ("best LR (of " + ", ".join(f"{lr:g}" for lr in summary["lrs"]) + ")", h["lr"], t["lr"], "g"),
            ("validation loss (nats/token)", h["val_loss"], t["val_loss"], ".4f"),
            ("bits per byte", h["bpb"], t["bpb"], ".4f"),
            ("perplexity", h["perplexity"], t["perplexity"], ".2f")]
    lines = [f"# Hybrid vs Transformer: {summary['budget']}", "", f"**{summary['verdict']}**", "",
             "| | hybrid | Transformer |", "| --- | ---: | ---: |"]
    lines += [f"| {name}{' (%)' if name == 'MFU' else ''} | {_fmt(a, spec)} | {_fmt(b, spec)} |"
              for name, a, b, spec in rows]
    tm = summary["transformer_config"]
    lines += ["", f"Transformer: {tm['num_layers']} layers x {tm['num_attention_heads']} heads, width {tm['hidden_dim']}, "
              f"SwiGLU {tm['ffn_dim']}, rotary, RMSNorm, {'tied' if tm['tie_embeddings'] else 'untied'} embeddings "
              f"(non-embedding parameters {100 * (s['transformer']['non_embedding_params'] / s['hybrid']['non_embedding_params'] - 1):+.1f} % "
              "of the hybrid's).",
              "", "## Same for both", "",
              f"- data `{summary['data_dir']}`: same shards, tokenizer and validation documents; validation token ids "
              f"{'identical' if summary['validation']['identical'] else 'DIFFERENT'} (sha256 "
              f"`{summary['validation']['hybrid']['sha256'][:16]}…`, {summary['validation']['hybrid']['tokens']:,} "
              "tokens scored per evaluation); bits per byte from the validation split's UTF-8 bytes",
              f"- sequence length {summary['sequence_length']}, {summary['tokens_per_step']:,} tokens per optimizer step, "
              f"{hw['processes']} processes, `{hw['deepspeed_config']}`",
              f"- budget: {summary['budget_meaning']}",
              "",
              "## Hardware and load", "",
              f"- {hw.get('gpu') or hw['cpu']}, {hw['cores']} cores visible, torch {hw['torch']}, host `{hw['host']}`",
              f"- load average (1 min) {summary['load']['before']:.1f} before, {summary['load']['after']:.1f} after; "
              + ("other processes competed for the cores: absolute speeds are contended, the models took turns so "
                 "the load hit both" if summary['load']['contended'] else "the machine was otherwise idle"),
              "", "## Every run", "", "| model | LR | steps | val loss | bpb | tokens/s | status |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for model in MODELS:
        for r in summary["runs"][model]:
            status = f"failed (exit {r['exit_code']})" if r.get("failed") else \
                ("best" if r["run_dir"] == summary["results"][model]["run_dir"] else "")
            lines.append(f"| {model} | {r['lr']:g} | {_fmt(r.get('step'))} | {_fmt(r.get('val_loss'), '.4f')} | "
                         f"{_fmt(r.get('bpb'), '.4f')} | {_fmt(r.get('tokens_per_s'), '.1f')} | {status} |")
    lines += ["", "## Plots (best run of each model)", "",
              "![validation bpb against tokens](plots/bpb_tokens.png)", "",
              "![validation bpb against training time](plots/bpb_time.png)", "",
              "More overlays (loss, LR, throughput) in `plots/report.md`; every number in `compare.json`.", ""]
    path.write_text("\n".join(lines))


# ---- the command -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0],
                                epilog="Every other option (--config, --data.data_dir, --train.*, --model.* of the "
                                       "hybrid) is read as launch/train.py reads it.")
    p.add_argument("--budget", required=True, help="tokens:N | seconds:S | flops:F (each model's whole training)")
    p.add_argument("--lrs", default=None, help="comma-separated peak learning rates tried for each model "
                                               "(default: the preset's train.lr)")
    p.add_argument("--out", required=True, help="output folder (compare.md, compare.json, plots/, runs/)")
    p.add_argument("--num_procs", type=int, default=2, help="processes (GPUs, or CPU ranks) per run")
    p.add_argument("--evals", type=int, default=8, help="evaluations over each run (for the curves)")
    p.add_argument("--calibration_steps", type=int, default=8, help="seconds: steps of each calibration run")
    p.add_argument("--seconds_headroom", type=float, default=1.25,
                   help="seconds: the LR schedule spans this x the steps the calibration predicts, so the time "
                        "limit, not the schedule's end, stops the run")
    p.add_argument("--launcher_args", default="", help="extra arguments of the deepspeed launcher, e.g. "
                                                       "'--hostfile hosts --num_nodes 2'")
    p.add_argument("--run_timeout", type=float, default=None, help="seconds after which a run is killed")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, rest = build_parser().parse_known_args(argv)
    base = parse_run_config(rest)
    if base.model.arch != "hybrid":
        raise ConfigError("pipeline.compare trains the preset's hybrid against a matched Transformer: the preset "
                          "must have model.arch=hybrid")
    if base.continual.enabled or base.plasticity.enabled:
        raise ConfigError("pipeline.compare trains one data folder with backprop alone: remove continual.* and "
                          "plasticity.* from the preset")
    kind, amount = parse_budget(args.budget)
    lrs = parse_lrs(args.lrs) if args.lrs else [base.train.lr]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launch = Launcher(args.num_procs, str(Path(base.deepspeed_config).resolve()), args.launcher_args.split())
    seq = base.data.sequence_length

    hybrid_sizes = parameter_counts(base.model)
    configs = {"hybrid": base.model,
               "transformer": matched_transformer_config(base.model, hybrid_sizes["non_embedding_params"])}
    sizes = {"hybrid": hybrid_sizes, "transformer": parameter_counts(configs["transformer"])}
    for model in MODELS:
        sizes[model]["flops_per_token"] = model_flops_per_token(configs[model], seq)
        print(f"{model:>11}: {sizes[model]['params']:,} parameters, {sizes[model]['non_embedding_params']:,} "
              f"non-embedding, {sizes[model]['flops_per_token'] / 1e6:.3f} MFLOP per token (training, seq {seq})",
              flush=True)
    per_step = tokens_per_step(base, args.num_procs)

    load_before = _load()
    steps, max_seconds = {}, 0.0
    if kind == "tokens":
        steps = {m: max(1, math.ceil(amount / per_step)) for m in MODELS}
        meaning = f"{amount:,.0f} training tokens for each model ({steps['hybrid']} steps)"
    elif kind == "flops":
        steps = {m: max(1, math.floor(amount / sizes[m]["flops_per_token"] / per_step)) for m in MODELS}
        meaning = (f"{amount:.3g} training FLOPs for each model (pipeline/flops.py): {steps['hybrid']} steps of the "
                   f"hybrid, {steps['transformer']} of the Transformer")
    else:
        max_seconds = amount
        for m in MODELS:
            rate = calibrate(base, configs[m], launch, out, args.calibration_steps)
            steps[m] = max(1, math.ceil(amount * rate * args.seconds_headroom / per_step))
            print(f"calibration: the {m} trains {rate:.1f} tokens/s here; LR schedule over {steps[m]} steps", flush=True)
        meaning = (f"{amount:g} s in training steps for each model (`train.max_seconds`; evaluation and checkpoints "
                   f"not counted); the LR schedule spans {args.seconds_headroom:g} x the steps a calibration run predicts "
                   f"({steps['hybrid']} hybrid, {steps['transformer']} Transformer)")
    print(f"budget: {meaning}", flush=True)

    runs = {m: [] for m in MODELS}
    for lr in lrs:
        for m in MODELS:  # taking turns: a change of the machine's load hits both models
            run_dir = out / "runs" / f"{m}-lr{lr:g}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = run_config_for(base, configs[m], lr, steps[m], run_dir, args.evals, max_seconds)
            started = time.time()
            code = launch(cfg, run_dir, args.run_timeout)
            runs[m].append(run_result(run_dir, lr, code))
            r = runs[m][-1]
            print(f"{m:>11} lr {lr:g}: " + (f"failed (exit {code}), log {run_dir}.log" if r.get("failed") else
                  f"val loss {r['val_loss']:.4f}, bpb {_fmt(r['bpb'], '.4f')}, {r['tokens_seen']:,} tokens in "
                  f"{r['train_seconds']:.1f} s ({time.time() - started:.0f} s with start-up and evaluation)"),
                  flush=True)
    load_after = _load()

    results = {}
    for m in MODELS:
        good = [r for r in runs[m] if not r.get("failed")]
        if not good:
            raise RuntimeError(f"every {m} run failed: see the logs in {out / 'runs'}")
        results[m] = min(good, key=lambda r: r["val_loss"])
    digests = {m: validation_digest(Path(results[m]["run_dir"]), args.num_procs) for m in MODELS}
    from pipeline.report import compare_runs

    compare_runs([results[m]["run_dir"] for m in MODELS], out / "plots")
    summary = {
        "budget": args.budget, "budget_kind": kind, "budget_amount": amount, "budget_meaning": meaning,
        "lrs": lrs, "steps": steps, "max_seconds": max_seconds, "tokens_per_step": per_step, "sequence_length": seq,
        "data_dir": base.data.data_dir, "sizes": sizes,
        "hybrid_config": dataclasses.asdict(configs["hybrid"]),
        "transformer_config": dataclasses.asdict(configs["transformer"]),
        "validation": {**digests, "identical": digests["hybrid"] == digests["transformer"]},
        "hardware": hardware(launch),
        "load": {"before": load_before, "after": load_after,
                 # Before the first run the load is other processes' alone.
                 "contended": load_before >= 0.5},
        "runs": runs, "results": results,
    }
    summary["verdict"] = verdict(results, {"tokens": "training tokens", "seconds": "training time",
                                           "flops": "training FLOPs"}[kind])
    if kind == "seconds":  # a run that got faster than its calibration ends with its schedule, short of the time
        short = [f"the {m} ran out of its {steps[m]} planned steps after {results[m]['train_seconds']:.0f} s"
                 for m in MODELS if results[m]["train_seconds"] < 0.98 * amount]
        if short:
            summary["verdict"] += (f" Caution: {' and '.join(short)} of {amount:g} s (the machine got faster than "
                                   "its calibration run); rerun with a larger --seconds_headroom.")
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    write_markdown(summary, out / "compare.md")
    print(summary["verdict"])
    print(f"report: {out / 'compare.md'}  numbers: {out / 'compare.json'}  plots: {out / 'plots'}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
