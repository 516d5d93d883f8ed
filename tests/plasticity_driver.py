"""Real 2-rank DeepSpeed ZeRO-2 engines with plasticity, for tests/test_plasticity.py (started by the deepspeed launcher).

    deepspeed --num_gpus 2 tests/plasticity_driver.py OUT_DIR

Each scenario builds its own engine on the tiny preset's model and trains a few steps with `Trainer.train_step` (the
launcher's step) on synthetic token ids (one stream per rank, step and micro-batch); every rank saves what it saw to
OUT_DIR/rank<R>.pt, and the test checks it.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import comm  # noqa: E402
from pipeline.config import PlasticityConfig, StabilityConfig, TrainConfig  # noqa: E402
from pipeline.engine.ds_adapter import get_full_fp32  # noqa: E402
from pipeline.engine.setup import check_precision_supported, initialize, load_deepspeed_config  # noqa: E402
from pipeline.engine.stability import Drill  # noqa: E402
from pipeline.model import HybridLM  # noqa: E402
from pipeline.plasticity import Plasticity  # noqa: E402
from pipeline.run_config import load_yaml_config  # noqa: E402
from pipeline.trainer import Callback, Trainer  # noqa: E402

TINY = load_yaml_config(str(ROOT / "launch/presets/tiny.yaml"))
MODEL = TINY.model
MICRO, GAS, SEQ = 2, 2, 32


def batch(rank: int, step: int, micro: int):
    g = torch.Generator().manual_seed(100_003 * step + 1_009 * micro + 7 * rank)
    ids = torch.randint(0, MODEL.vocab_size, (MICRO, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


class Synthetic:
    """The reader the Trainer draws from: `batch(rank, step, micro)` in order, from step `first` on."""

    def __init__(self, first: int = 1):
        self.position = (first - 1) * GAS

    def next_batch(self) -> dict:
        step, micro = divmod(self.position, GAS)
        self.position += 1
        x, y = batch(comm.world()[0], step + 1, micro)
        return {"input_ids": x, "targets": y}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class InfGrad(Callback):
    def __init__(self, drill: Drill):
        self.drill = drill

    def on_logits(self, logits, step: int, last: bool):
        return self.drill.apply_to_logits(logits, step, last_micro_batch=last)


def build(plasticity: PlasticityConfig, lr: float = 0.01, seed: int = 0, ds: str = "ds_configs/cpu.json",
          zero_lr: bool = False, weight_decay: float = 0.1, drill: Drill = None, run_dir: Path = Path("unused")):
    torch.manual_seed(seed)
    model = HybridLM(MODEL)
    train = TrainConfig(lr=lr, warmup_steps=0, weight_decay=weight_decay, micro_batch_size=MICRO,
                        gradient_accumulation_steps=GAS, max_steps=10)
    ds_config = load_deepspeed_config(str(ROOT / ds), train)
    check_precision_supported(ds_config, ds, allow_cpu_fp16=True)
    # lr 0 exactly: AdamW then leaves every weight bit-identical, so what changes is plasticity's alone.
    schedule = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)) if zero_lr else None
    engine, scheduler = initialize(model, ds_config, train, schedule, plasticity=plasticity)
    mechanisms = Plasticity(plasticity, engine, model) if plasticity.enabled else None
    cfg = dataclasses.replace(TINY, train=dataclasses.replace(train, out_dir=str(run_dir), keep_checkpoints=0))
    callbacks = [c for c in (mechanisms, InfGrad(drill) if drill else None) if c is not None]
    trainer = Trainer(cfg, parts=dict(engine=engine, model=model, reader=Synthetic(), val_reader=None,
                                      scheduler=scheduler), callbacks=lambda _: callbacks)
    return trainer, model, mechanisms


def spike_weights(model):
    return [block.spike_proj.weight for block in model.layers if hasattr(block, "spike_proj")]


def masters(model):
    return [get_full_fp32(w).clone() for w in spike_weights(model)]


def modules(model):
    return [w.detach().clone() for w in spike_weights(model)]


def record_spikes(model, into: list):
    """Independent of the STDP hooks: the raw pre-synaptic input and spikes of every training forward."""
    blocks = [b for b in model.layers if hasattr(b, "spike_proj")]
    current = {}

    def pre_hook(i, module, args, output):
        current[i] = args[0].detach().float().clone()

    def post_hook(i, module, args, output):
        into.append((i, current.pop(i), output[0].detach().float().clone()))

    for i, block in enumerate(blocks):
        block.spike_proj.register_forward_hook(lambda m, a, o, i=i: pre_hook(i, m, a, o))
        block.lif.register_forward_hook(lambda m, a, o, i=i: post_hook(i, m, a, o))


def scenario_rule(out: dict) -> None:
    """lr 0: the spiking weights change by STDP alone; with STDP off they do not change at all."""
    cfg = PlasticityConfig(stdp="homeostatic", stdp_learning_rate=0.04, stdp_a_plus=1.0, stdp_a_minus=1.2,
                           stdp_tau_plus=4.0, stdp_tau_minus=6.0, stdp_target_rate=0.2, stdp_rate_tau=2.0,
                           stdp_max_update=0.03)
    trainer, model, plasticity = build(cfg, zero_lr=True)
    recorded: list = []
    record_spikes(model, recorded)
    out["rule_w0"] = masters(model)
    steps = []
    for step in (1, 2, 3):
        recorded.clear()
        trainer.train_step()
        steps.append([(i, pre, post) for i, pre, post in recorded])
        out.setdefault("rule_masters", []).append(masters(model))
        out.setdefault("rule_modules", []).append(modules(model))
    out["rule_spikes"] = steps
    out["rule_rate_avg"] = [r.clone() for r in plasticity.stdp.rate_avg]
    out["rule_record"] = plasticity.train_record()
    off, model_off, _ = build(PlasticityConfig(), zero_lr=True)
    for step in (1, 2, 3):
        off.train_step()
    out["rule_off"] = masters(model_off)


def state_of(model, plasticity) -> dict:
    """Everything a resume must reproduce: every fp32 master and module weight, STDP's and the optimizer's state."""
    meta = plasticity.meta.optimizer
    return {"masters": {n: get_full_fp32(p).clone() for n, p in model.named_parameters()},
            "modules": {n: p.detach().clone() for n, p in model.named_parameters()},
            "stdp": plasticity.stdp.state_dict(), "meta": plasticity.meta.state_dict(),
            "refs": [meta.state[p]["meta_ref"].clone() for g in meta.param_groups if g["meta"] > 0 for p in g["params"]]}


def scenario_roundtrip(out: dict, run_dir: Path) -> None:
    """Both mechanisms, a task start (pending reference reset) just before the checkpoint, resumed into a fresh
    engine built from other initial weights: the continuation must be bit-identical."""
    cfg = PlasticityConfig(stdp="homeostatic", stdp_learning_rate=0.5, stdp_a_plus=1.0, stdp_a_minus=1.2,
                           stdp_rate_tau=2.0, meta=True, meta_strength=50.0)
    trainer, model, plasticity = build(cfg, run_dir=run_dir)
    lag = []
    for step in (1, 2, 3, 4):
        trainer.train_step()
        lag.append(all(torch.equal(m, w) for m, w in zip(masters(model), modules(model))))
        if step == 2:
            plasticity.on_task_start(None)
            trainer.save(2)  # the Trainer is the checkpointed state: the reader's position and both mechanisms
    out["roundtrip_no_lag"] = lag
    out["roundtrip_full"] = state_of(model, plasticity)
    out["roundtrip_record"] = plasticity.train_record()

    trainer2, model2, plasticity2 = build(cfg, seed=1, run_dir=run_dir)
    trainer2.checkpointer.load(trainer2.engine, str(run_dir / "checkpoints" / "step00000002"))
    out["roundtrip_pending_after_load"] = plasticity2.meta.optimizer.reset_pending
    for step in (3, 4):
        trainer2.train_step()
    out["roundtrip_resumed"] = state_of(model2, plasticity2)


def scenario_fp16_overflow(out: dict) -> None:
    """fp16 (emulated on CPU, DeepSpeed's real ZeRO-2 fp16 optimizer and scaler): step 2's gradients are infinite."""
    cfg = PlasticityConfig(stdp="pair", stdp_learning_rate=0.5, stdp_a_plus=1.0, stdp_a_minus=1.0, meta=True)
    trainer, model, plasticity = build(cfg, ds="ds_configs/fp16_stable.json", zero_lr=True,
                                       drill=Drill(StabilityConfig(drill_inf_grad_steps=[2])))
    for step in (1, 2, 3):
        trainer.train_step()
        out.setdefault("fp16_applied", []).append(trainer.engine.was_step_applied())
        out.setdefault("fp16_masters", []).append(masters(model))
        out.setdefault("fp16_modules", []).append(modules(model))
    out["fp16_counts"] = (plasticity.stdp.applied, plasticity.stdp.skipped)


def scenario_meta_partitions(out: dict) -> None:
    """A very strong metaplasticity on ZeRO's flat partitions: after the first step no matrix element may move
    further from its start value; 1-D parameters are exempt."""
    cfg = PlasticityConfig(meta=True, meta_strength=1e6)
    trainer, model, plasticity = build(cfg, weight_decay=0.0)
    history = [{n: get_full_fp32(p).clone() for n, p in model.named_parameters()}]
    for step in (1, 2, 3):
        trainer.train_step()
        history.append({n: get_full_fp32(p).clone() for n, p in model.named_parameters()})
    out["meta_history"] = history
    out["meta_record"] = plasticity.train_record()


def scenario_bf16(out: dict) -> None:
    """bf16 module weights: the fp32 master keeps the exact STDP update that bf16 would round away."""
    cfg = PlasticityConfig(stdp="pair", stdp_learning_rate=0.5, stdp_a_plus=1.0, stdp_a_minus=1.0, meta=True)
    trainer, model, plasticity = build(cfg, ds="ds_configs/bf16.json", zero_lr=True)
    out["bf16_w0"] = masters(model)
    for step in (1, 2):
        trainer.train_step()
    out["bf16_masters"], out["bf16_modules"] = masters(model), modules(model)
    out["bf16_counts"] = (plasticity.stdp.applied, plasticity.stdp.skipped)


def main() -> None:
    out_dir = Path(sys.argv[-1])  # the launcher puts --local_rank=N first
    rank, _ = comm.init_distributed()
    torch.set_num_threads(1)
    out: dict = {}
    scenario_rule(out)
    scenario_roundtrip(out, out_dir / "run")
    scenario_meta_partitions(out)
    scenario_fp16_overflow(out)
    scenario_bf16(out)
    torch.save(out, out_dir / f"rank{rank}.pt")
    comm.barrier()


if __name__ == "__main__":
    main()
