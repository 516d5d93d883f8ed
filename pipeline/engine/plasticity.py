"""Local plasticity beside backprop, under DeepSpeed ZeRO-2 (config section `plasticity:`).

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

import logging
import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import comm
from pipeline.config import PlasticityConfig
from pipeline.engine.ds_adapter import (fragment_address, get_full_fp32, has_fp32_master, inner_optimizer,  # noqa: F401
                                        set_full_fp32)
from pipeline.model.hybrid import HybridBlock
from pipeline.model.scan import compute_dtype, diag_scan

log = logging.getLogger("pipeline")


# ----------------------------------------------------------------------------------------------
# STDP
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Metaplasticity
# ----------------------------------------------------------------------------------------------

def metaplastic_groups(groups, strength: float) -> List[dict]:
    """Split each optimizer group into its matrices (`meta` = strength) and its 1-D parameters (`meta` = 0: norms,
    biases, D, time constants are exempt), keeping the group's other settings (weight decay)."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for group in groups:
        params = list(group["params"])
        for meta, members in ((strength, [p for p in params if p.ndim >= 2]), (0.0, [p for p in params if p.ndim < 2])):
            if members:
                out.append({**group, "params": members, "meta": meta})
    return out


class MetaAdamW(torch.optim.AdamW):
    """AdamW with metaplastic consolidation: an update that moves a weight further from its task-start value W_ref
    is scaled by `1 - tanh^2(m |W - W_ref|)`; an update toward W_ref is taken in full.

    Laborieux et al. 2021 ("Synaptic metaplasticity in binarized neural networks") scale the updates that shrink a
    hidden weight's magnitude; for real-valued weights the distance from the task start plays that part, so a weight
    can move freely early in a task and ever less far from where the previous tasks left it. Each parameter group
    carries `meta` (m; 0 = exempt). The rule is elementwise, so it acts unchanged on ZeRO-1/2's flat fp32
    partitions; W_ref is optimizer state (`meta_ref`, the parameter's own layout) that DeepSpeed saves with each
    rank's partition. The update scaled is the whole AdamW update actually taken (Adam step and decoupled weight
    decay, after DeepSpeed's unscaling and clipping). Elements whose update is not scaled are left bit-identical
    to plain AdamW's result.
    """

    REF = "meta_ref"

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._reset: set = set()  # ids of the parameters whose reference is retaken at their next step
        self.segments: Dict[int, Tuple[List[int], Tensor]] = {}  # id(param) -> (lengths, bucket per segment)
        self.num_buckets = 1
        self.stats: Optional[Tensor] = None  # (2, buckets + 1): sums of squares of the Adam update, of the change
        self._warned = False

    def request_reset(self) -> None:
        """Take the reference afresh (from the weights before the update) at every meta parameter's next step."""
        self._reset = {id(p) for g in self.param_groups if g.get("meta", 0) > 0 for p in g["params"]}

    @property
    def reset_pending(self) -> bool:
        return bool(self._reset)

    def _bucket_sums(self, p: Tensor, values: Tensor) -> Tensor:
        """Per-bucket sums of `values` (p's layout): the statistics of `MetaPlasticity` per layer."""
        out = torch.zeros(self.num_buckets + 1, dtype=torch.float64, device=values.device)
        flat = values.reshape(-1).double()
        segments = self.segments.get(id(p))
        if segments is None:
            out[0] = flat.sum()
        else:
            lengths, buckets = segments
            out.index_add_(0, buckets, torch.stack([s.sum() for s in flat.split(lengths)]))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        # Under ZeRO, DeepSpeed calls this once per group, with `param_groups` narrowed to that group.
        before = [(p, p.detach().clone(), g["meta"]) for g in self.param_groups if g.get("meta", 0) > 0
                  for p in g["params"] if p.grad is not None]
        loss = super().step(closure)
        for p, w0, m in before:
            state = self.state[p]
            ref = state.get(self.REF)
            if ref is None or id(p) in self._reset:
                if ref is None and int(state["step"]) > 1 and not self._warned:
                    self._warned = True
                    log.warning("metaplasticity: the optimizer state has no task-start reference (resumed from "
                                "DeepSpeed's universal checkpoint, which carries only the weights and Adam moments): "
                                "it restarts from the current weights")
                state[self.REF] = ref = w0  # the weights at the start of the task (a private copy)
                self._reset.discard(id(p))
            update = p - w0
            distance = w0 - ref
            away = update * distance > 0
            scale = 1.0 - torch.tanh(m * distance.abs()).square()
            scaled = torch.where(away, w0 + update * scale, p)
            if self.stats is not None:
                change = scaled - p
                self.stats += torch.stack([self._bucket_sums(p, update.square()),
                                           self._bucket_sums(p, change.square())])
            p.copy_(scaled)
        return loss


def _module_of(name: str) -> str:
    """The per-layer key of a parameter: `layers.<i>` inside the block stack, else its top-level module."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" and len(parts) > 2 else parts[0]


class MetaPlasticity:
    """The metaplastic reference's life cycle and its metrics; a ClientState component, and a subscriber of the
    continual schedule's task-boundary hook (`on_task_start`): the reference is retaken at every task start.
    Without a continual schedule the reference is the weights at the run's first step.

    Checkpointed here: whether a reset is pending (a task starts right after the step a checkpoint is taken at),
    the number of task starts. The reference itself is optimizer state, saved and restored by DeepSpeed with each
    rank's partition (exact at the same world size).
    """

    def __init__(self, cfg: PlasticityConfig, engine, model: torch.nn.Module):
        optimizer = inner_optimizer(engine) if engine is not None else None
        if not isinstance(optimizer, MetaAdamW):
            raise TypeError("plasticity.meta needs the engine built by setup.initialize(..., plasticity=cfg.plasticity), "
                            f"whose optimizer is MetaAdamW; got {type(optimizer).__name__}")
        self.cfg = cfg
        self.optimizer = optimizer
        self.task_starts = 0
        self.bucket_names = self._assign_buckets(model)
        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        optimizer.stats = torch.zeros(2, len(self.bucket_names) + 1, dtype=torch.float64, device=device)

    def _assign_buckets(self, model: torch.nn.Module) -> List[str]:
        """Map every element of every meta parameter (under ZeRO: of this rank's flat partition) to its layer."""
        opt = self.optimizer
        names: List[str] = []
        bucket = {}
        for name, p in model.named_parameters():
            key = _module_of(name)
            if key not in bucket:
                bucket[key] = len(names)
                names.append(key)
        meta_params = [p for g in opt.param_groups if g.get("meta", 0) > 0 for p in g["params"]]
        params = dict(model.named_parameters())
        zero = any(has_fp32_master(p) for p in params.values())
        pad = len(names)  # ZeRO's alignment padding and anything unmapped
        if not zero:
            by_id = {id(p): n for n, p in params.items()}
            for p in meta_params:
                opt.segments[id(p)] = ([p.numel()], torch.tensor([bucket[_module_of(by_id[id(p)])]], device=p.device))
        else:
            # DeepSpeed's fragment map: where each module parameter's slice sits in this rank's flat partition.
            fragments: Dict[int, list] = {id(p): [] for p in meta_params}
            for name, lp in params.items():
                address = fragment_address(lp)
                if address is None:
                    continue
                group, start, numel = address
                flat = opt.param_groups[group]["params"][0]
                if id(flat) in fragments:
                    fragments[id(flat)].append((start, numel, bucket[_module_of(name)]))
            for p in meta_params:
                lengths, buckets, at = [], [], 0
                for start, numel, b in sorted(fragments[id(p)]):
                    if start > at:
                        lengths.append(start - at)
                        buckets.append(pad)
                    lengths.append(numel)
                    buckets.append(b)
                    at = start + numel
                if at < p.numel():
                    lengths.append(p.numel() - at)
                    buckets.append(pad)
                opt.segments[id(p)] = (lengths, torch.tensor(buckets, device=p.device))
        opt.num_buckets = len(names)
        return names

    def on_task_start(self, task=None) -> None:
        self.optimizer.request_reset()
        self.task_starts += 1
        log.info("metaplasticity: the reference weights are retaken at the start of task %r",
                 getattr(task, "name", task))

    def train_record(self) -> dict:
        """Per layer: ||metaplastic change|| / ||AdamW update|| since the last record, and the drift
        ||W - W_ref|| / ||W_ref||; summed over the ranks' partitions (one all-reduce: every rank must call this)."""
        opt = self.optimizer
        drift = torch.zeros_like(opt.stats)
        for group in opt.param_groups:
            if group.get("meta", 0) <= 0:
                continue
            for p in group["params"]:
                ref = opt.state.get(p, {}).get(opt.REF)
                if ref is not None:
                    drift += torch.stack([opt._bucket_sums(p, (p.detach() - ref).square()),
                                          opt._bucket_sums(p, ref.square())])
        totals = comm.all_reduce(torch.cat([opt.stats, drift]), out_device="cpu")
        opt.stats.zero_()
        record = {}
        for b, name in enumerate(self.bucket_names):
            update, change, distance, reference = totals[:, b].tolist()
            if update > 0:
                record[f"meta_rel_update/{name}"] = math.sqrt(change / update)
            if reference > 0:
                record[f"meta_drift/{name}"] = math.sqrt(distance / reference)
        record["meta_task_starts"] = self.task_starts
        return record

    def state_dict(self) -> dict:
        return {"strength": self.cfg.meta_strength, "task_starts": self.task_starts,
                "reset_pending": self.optimizer.reset_pending}

    def load_state_dict(self, state: dict) -> None:
        self.task_starts = int(state["task_starts"])
        if state["reset_pending"]:
            self.optimizer.request_reset()
        else:
            self.optimizer._reset = set()


# ----------------------------------------------------------------------------------------------
# The wiring launch/train.py uses
# ----------------------------------------------------------------------------------------------

class Plasticity:
    """Both mechanisms behind one object (built only when `plasticity.stdp` or `plasticity.meta` is on):

        engine, scheduler = initialize(model, ds_config, cfg.train, ..., plasticity=cfg.plasticity)  # MetaAdamW
        plasticity = Plasticity(cfg.plasticity, engine, model)
        states: plasticity.states()                 # checkpoint state
        continual.schedule.subscribe(plasticity)    # on_task_start: the metaplastic reference is retaken
        plasticity.accept_micro_batch()             # after engine.backward: this micro-batch's STDP terms count
        plasticity.after_step()                     # after the boundary step: STDP, if the step was applied
        record.update(plasticity.train_record())    # every log interval, on every rank (collective)
    """

    def __init__(self, cfg: PlasticityConfig, engine, model: torch.nn.Module):
        self.stdp = STDP(cfg, model, engine) if cfg.stdp != "none" else None
        self.meta = MetaPlasticity(cfg, engine, model) if cfg.meta else None

    def states(self) -> list:
        """(checkpoint key, component, optional) of the mechanisms that are on."""
        return [(name, part, False) for name, part in (("stdp", self.stdp), ("meta_plasticity", self.meta))
                if part is not None]

    def on_task_start(self, task) -> None:
        if self.meta is not None:
            self.meta.on_task_start(task)

    def accept_micro_batch(self) -> None:
        if self.stdp is not None:
            self.stdp.accept_micro_batch()

    def after_step(self) -> None:
        if self.stdp is not None:
            self.stdp.after_step()

    def train_record(self) -> dict:
        record = {}
        for part in (self.stdp, self.meta):
            if part is not None:
                record.update(part.train_record())
        return record
