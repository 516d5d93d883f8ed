"""Local plasticity beside backprop, under DeepSpeed ZeRO-2 (config section `plasticity:`): `stdp.py` (the rule),
`meta.py` (the metaplastic optimizer), the fp32 master and ZeRO fragment access in pipeline/engine/ds_adapter.py.

* **STDP** (`STDP`) on every hybrid block's `spike_proj.weight`, the synapses that feed the LIF neurons:
  pre-synaptic activity = the input of `spike_proj` (the normed residual stream), post-synaptic activity = the
  LIF spikes per token. Traces `trace <- trace * (1 - 1/tau) + s` are diagonal linear recurrences, run with the
  model's blocked scan (`diag_scan`) in a forward hook: no per-token Python loop.
* **Metaplasticity** (`MetaAdamW`, `MetaPlasticity`): consolidation inside the optimizer update.

Why it is built this way (each point measured with DeepSpeed 0.19.8, ZeRO-2, 2 ranks, gloo):

* The optimizer owns the weights. An in-place edit of a module weight is overwritten from the fp32 master copy
  at the next `engine.step()`, and `p.grad` is None after `engine.backward()`. So STDP writes the fp32 master
  through DeepSpeed's accessors (`safe_get_full_fp32_param` / `safe_set_full_fp32_param`, collectives every rank
  calls) after an applied step, and copies the result into the module weight too: `safe_set_full_fp32_param`
  alone leaves the module weight one step behind (and checkpoints inconsistent).
* Adam is invariant to the scale of each coordinate's gradient, so consolidating by scaling gradients before the
  step is nearly a no-op: metaplasticity scales the update itself, inside the optimizer. ZeRO-1/2 hands the inner
  optimizer one flat 1-D fp32 partition per parameter group, so the rule is elementwise, its reference is kept in
  the same flat layout in the optimizer state (DeepSpeed checkpoints it with each rank's partition), and ZeRO
  accepts the subclass only with `zero_allow_untested_optimizer` (set from code by `setup.initialize`).
* Both are identical on every rank: STDP's sums are averaged over all ranks' micro-batches with one all-reduce
  (`pipeline.comm`) and every rank applies the same update to the same full fp32 weight; the metaplastic rule is
  elementwise on each rank's own partition of the (identical) master weights.
* Neither acts on a step the fp16 loss scaler skipped: STDP checks `engine.was_step_applied()`, and DeepSpeed does
  not call the optimizer on such a step.
"""
from __future__ import annotations

import torch

from pipeline.config import PlasticityConfig
from pipeline.trainer import Callback

from .meta import MetaAdamW, MetaPlasticity, metaplastic_groups  # noqa: F401
from .stdp import STDP, bounded, stdp_delta, stdp_terms  # noqa: F401


class Plasticity(Callback):
    """Both mechanisms as one Trainer callback (in the list only when `plasticity.stdp` or `plasticity.meta` is on);
    the engine must come from `setup.initialize(..., plasticity=cfg.plasticity)` (MetaAdamW with `meta`)."""

    def __init__(self, cfg: PlasticityConfig, engine, model: torch.nn.Module):
        self.stdp = STDP(cfg, model, engine) if cfg.stdp != "none" else None
        self.meta = MetaPlasticity(cfg, engine, model) if cfg.meta else None

    def states(self) -> list:
        """(checkpoint key, component, optional) of the mechanisms that are on."""
        return [(name, part, False) for name, part in (("stdp", self.stdp), ("meta_plasticity", self.meta))
                if part is not None]

    def on_task_start(self, task) -> None:
        if self.meta is not None:
            self.meta.on_task_start(task)  # the metaplastic reference is retaken

    def on_micro_batch(self, loss=None) -> None:
        if self.stdp is not None:
            self.stdp.accept_micro_batch()  # this micro-batch's spikes count toward the step's STDP

    def on_step_end(self, step: int = 0, applied: bool = True) -> None:
        if self.stdp is not None:
            self.stdp.after_step()  # STDP on the fp32 masters, only if the optimizer step was applied

    def train_record(self, step: int = 0) -> dict:
        """Per layer: plastic update / optimizer update, metaplastic drift (collective: every rank calls it)."""
        record = {}
        for part in (self.stdp, self.meta):
            if part is not None:
                record.update(part.train_record())
        return record
