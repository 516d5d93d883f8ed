"""STDP on every hybrid block's `spike_proj.weight` (the synapses that feed the LIF neurons), beside backprop.

Pre-synaptic activity = the input of `spike_proj` (the normed residual stream), post-synaptic activity = the LIF
spikes per token. Traces `trace <- trace * (1 - 1/tau) + s` are diagonal linear recurrences, run with the model's
blocked scan (`diag_scan`) in a forward hook: no per-token Python loop. The update goes into the fp32 master
weights through the DeepSpeed adapter (pipeline/engine/ds_adapter.py); see pipeline/plasticity/__init__.py for why.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import comm
from pipeline.config import PlasticityConfig
from pipeline.engine.ds_adapter import get_full_fp32, set_full_fp32
from pipeline.model.hybrid import HybridBlock
from pipeline.model.scan import compute_dtype, diag_scan

log = logging.getLogger("pipeline")


def stdp_terms(pre: Tensor, post: Tensor, tau_plus: float, tau_minus: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch x time means of the pair rule's two terms for one layer (fp32; float64 stays float64).

    pre (B, T, H): pre-synaptic activity; post (B, T, S): spikes per token. With the traces
    `trace_pre_t = (1 - 1/tau+) trace_pre_{t-1} + pre_t` and `trace_post_t = (1 - 1/tau-) trace_post_{t-1} + post_t`
    (zero before the sequence, like the membranes) it returns

        ltp (S, H) = mean_{b,t} post_t (x) trace_pre_t        pre activity before or with a spike: potentiation
        ltd (S, H) = mean_{b,t} trace_post_{t-1} (x) pre_t    a spike strictly before pre activity: depression
        rate (S,)  = mean_{b,t} post_t

    (the depression term reads the post trace one token back, so a simultaneous pair counts once, as potentiation).
    The pre trace is never formed: sum_t post_t (x) trace_pre_t = sum_k (sum_{t>=k} a+^{t-k} post_t) (x) pre_k, a
    reverse-time trace of the spikes, so both traces are S wide (not H wide; two blocked scans, no per-token loop)
    and both terms come from one matmul with the pre activity.
    """
    with torch.no_grad():
        cd = compute_dtype(pre.dtype)
        pre, post = pre.detach().to(cd), post.detach().to(cd)
        n = pre.shape[0] * pre.shape[1]
        ahead = diag_scan(post.new_full((1, 1, 1), 1.0 - 1.0 / tau_plus), post.flip(1)).flip(1)
        behind = diag_scan(post.new_full((1, 1, 1), 1.0 - 1.0 / tau_minus), post)
        behind = F.pad(behind[:, :-1], (0, 0, 1, 0))  # trace_post_{t-1}
        terms = torch.cat([ahead, behind], dim=-1).reshape(n, -1).T @ pre.reshape(n, -1) / n  # (2S, H)
        ltp, ltd = terms.chunk(2)
        return ltp, ltd, post.reshape(n, -1).mean(0)


def stdp_delta(ltp: Tensor, ltd: Tensor, a_plus: float, a_minus: float,
               depression_scale: Optional[Tensor] = None) -> Tensor:
    """dW = A+ ltp - A- s (x) ltd, with a per-neuron depression scale s (homeostatic rule; 1 for the pair rule)."""
    if depression_scale is not None:
        ltd = depression_scale[:, None] * ltd
    return a_plus * ltp - a_minus * ltd


def bounded(update: Tensor, weight: Tensor, max_relative: float) -> Tensor:
    """`update` scaled down, if need be, so that ||update|| <= max_relative * ||weight|| (no host sync)."""
    limit = max_relative * weight.norm()
    return update * torch.clamp(limit / update.norm().clamp_min(1e-30), max=1.0)


class STDP:
    """Pair or homeostatic STDP on every hybrid block's `spike_proj.weight`; a ClientState component.

    Forward hooks compute each layer's terms (`stdp_terms`) from a training micro-batch's input and spikes;
    `accept_micro_batch()` adds them to the step's sums once the batch guard has let that micro-batch through to
    backward (a skipped micro-batch must not count); `after_step()`, after the boundary step, averages the sums
    over all accepted micro-batches of all ranks (one all-reduce) and, if the optimizer step was applied, adds
    the bounded `eta * dW` to the fp32 master and the module weight. On a skipped step the sums are dropped.

    State across steps (checkpointed): the homeostatic rule's running firing rate per neuron and the counters. The
    traces themselves start at zero with every sequence, as the LIF membranes do in training, so none is pending
    at a step boundary, where checkpoints are taken.
    """

    def __init__(self, cfg: PlasticityConfig, model: torch.nn.Module, engine=None):
        self.cfg = cfg
        self.engine = engine  # None: plain PyTorch (tests); every step counts as applied
        self.blocks: List[HybridBlock] = [m for m in model.modules() if isinstance(m, HybridBlock)]
        self.names = [f"layer{block.index}" for block in self.blocks]
        self._inputs: Dict[int, Tensor] = {}
        self._pending: Dict[int, Tuple[Tensor, Tensor, Tensor]] = {}
        self._sums: Optional[List[List[Tensor]]] = None  # per layer [ltp, ltd, rate], summed over micro-batches
        self._count = 0
        self.rate_avg: Optional[List[Tensor]] = None  # homeostatic: running rate per neuron (identical on all ranks)
        self.applied = 0
        self.skipped = 0
        self._previous: Optional[List[Tensor]] = None  # fp32 weights after the last plastic update (for the metric)
        self._squares: Optional[Tensor] = None  # (2, layers): sums of squares of the plastic and optimizer updates
        for i, block in enumerate(self.blocks):
            block.spike_proj.register_forward_hook(partial(self._record_input, i))
            block.lif.register_forward_hook(partial(self._record_spikes, i))

    @property
    def weights(self) -> List[torch.nn.Parameter]:
        return [block.spike_proj.weight for block in self.blocks]

    # ---- forward hooks ----------------------------------------------------------------------
    def _record_input(self, i: int, module, args, output) -> None:
        if module.training:  # not in evaluation, the EWC Fisher or generation
            self._inputs[i] = args[0]

    def _record_spikes(self, i: int, module, args, output) -> None:
        pre = self._inputs.pop(i, None)
        if module.training and pre is not None:
            self._pending[i] = stdp_terms(pre, output[0], self.cfg.stdp_tau_plus, self.cfg.stdp_tau_minus)

    # ---- the loop ---------------------------------------------------------------------------
    def accept_micro_batch(self) -> None:
        """The last training forward's terms count toward this step (call after its backward)."""
        if len(self._pending) != len(self.blocks):
            raise RuntimeError(f"STDP: the last forward recorded {len(self._pending)} of {len(self.blocks)} spiking "
                               "layers; accept_micro_batch() must follow a training forward")
        terms = [self._pending[i] for i in range(len(self.blocks))]
        self._pending.clear()
        if self._sums is None:
            self._sums = [[t.clone() for t in layer] for layer in terms]
        else:
            for total, layer in zip(self._sums, terms):
                for s, t in zip(total, layer):
                    s += t
        self._count += 1
        if self._previous is None:
            # Every rank accepts the same micro-batches (the guard's decision is collective), so every rank
            # makes this collective call at the same point.
            self._previous = [get_full_fp32(w) for w in self.weights]

    def after_step(self) -> None:
        """After the boundary micro-step: apply the step's STDP update if the optimizer step was applied."""
        sums, count = self._sums, self._count
        self._sums, self._count = None, 0
        if self.engine is not None and not self.engine.was_step_applied():
            self.skipped += 1  # the fp16 scaler skipped the step: nothing is applied, the sums are dropped
            return
        if sums is None:
            return
        sizes = [t.numel() for layer in sums for t in layer]
        flat = torch.cat([t.flatten().double() for layer in sums for t in layer] +
                         [torch.tensor([float(count)], dtype=torch.float64, device=sums[0][0].device)])
        flat = comm.all_reduce(flat)  # sums over every rank's accepted micro-batches
        parts = list((flat[:-1] / flat[-1]).float().split(sizes))
        if self.cfg.stdp == "homeostatic" and self.rate_avg is None:
            self.rate_avg = [parts[3 * i + 2].clone() for i in range(len(self.blocks))]
        for i, weight in enumerate(self.weights):
            ltp, ltd, rate = parts[3 * i].view_as(weight), parts[3 * i + 1].view_as(weight), parts[3 * i + 2]
            scale = None
            if self.cfg.stdp == "homeostatic":
                self.rate_avg[i] += (rate - self.rate_avg[i]) / self.cfg.stdp_rate_tau
                scale = self.rate_avg[i] / self.cfg.stdp_target_rate  # above target: more depression
            delta = stdp_delta(ltp, ltd, self.cfg.stdp_a_plus, self.cfg.stdp_a_minus, scale)
            master = get_full_fp32(weight)
            update = bounded(self.cfg.stdp_learning_rate * delta.to(master), master, self.cfg.stdp_max_update)
            new = master + update
            set_full_fp32(weight, new)
            if self._squares is None:
                self._squares = torch.zeros(2, len(self.blocks), dtype=torch.float64, device=master.device)
            self._squares[0, i] += update.double().square().sum()
            self._squares[1, i] += (master.double() - self._previous[i].double()).square().sum()
            self._previous[i] = new
        self.applied += 1

    def train_record(self) -> dict:
        """Per layer ||eta dW|| / ||optimizer update|| (root sums of squares since the last record), counters."""
        record = {}
        squares = self._squares.tolist() if self._squares is not None else None
        for i, name in enumerate(self.names):
            if squares is not None and squares[1][i] > 0:
                record[f"stdp_rel_update/{name}"] = math.sqrt(squares[0][i] / squares[1][i])
            if self.rate_avg is not None:
                record[f"stdp_rate_avg/{name}"] = float(self.rate_avg[i].mean())
        if self._squares is not None:
            self._squares.zero_()
        record.update(stdp_applied_steps=self.applied, stdp_skipped_steps=self.skipped)
        return record

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"rule": self.cfg.stdp, "applied": self.applied, "skipped": self.skipped,
                "rate_avg": [r.cpu() for r in self.rate_avg] if self.rate_avg is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.applied, self.skipped = int(state["applied"]), int(state["skipped"])
        device = self.weights[0].device
        self.rate_avg = [r.to(device) for r in state["rate_avg"]] if state["rate_avg"] is not None else None
        if state["rule"] != self.cfg.stdp:
            log.info("STDP: the checkpoint trained with plasticity.stdp=%s, this run uses %s", state["rule"],
                     self.cfg.stdp)
