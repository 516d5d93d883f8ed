"""Metaplasticity: consolidation inside the optimizer update (`MetaAdamW`) and its life cycle (`MetaPlasticity`).

Adam is invariant to the scale of each coordinate's gradient, so consolidating by scaling gradients before the
step is nearly a no-op: the update itself is scaled, inside the optimizer. Where each layer's slice sits in ZeRO's
flat partitions comes from the DeepSpeed adapter (pipeline/engine/ds_adapter.py).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from pipeline import comm
from pipeline.config import PlasticityConfig
from pipeline.engine.ds_adapter import fragment_address, has_fp32_master, inner_optimizer

log = logging.getLogger("pipeline")


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
