"""Elastic weight consolidation (Kirkpatrick et al. 2017; online form: Schwarz et al. 2018) under ZeRO-2.

At the end of a task, the diagonal empirical Fisher of the token log-likelihood on that task's training
data, F_i = mean over samples of (d/d theta_i of the sample's mean token NLL)^2, is normalised to mean 1
and folded into the running importance: F <- gamma * F + F_new; theta* <- theta (the task's end point).
Every later micro-batch adds (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 to the loss. The
normalisation makes lambda a per-parameter stiffness in units of the loss: it does not depend on the
loss scale, the size of the model or how large the task's gradients happened to be, and since theta
equals theta* at the boundary, the loss does not jump there. F and theta* are fp32 buffers on the
engine's device, identical on every rank (ZeRO-2 partitions optimizer state and gradients, not the
module's parameters), and checkpointed.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from pipeline import comm
from pipeline.engine.ds_adapter import current_loss_scale

log = logging.getLogger("pipeline")


def fisher_diagonal(module: torch.nn.Module, params: list, batches: Iterable[dict], device,
                    loss_scale: float = 1.0, skip_sample: Optional[Callable[[int], bool]] = None
                    ) -> tuple[list, int, int]:
    """Per-sample squared gradients of each sample's mean token NLL, summed over this rank's `batches`.

    Returns (fp32 sums per parameter, samples used, samples left out). Gradients come from
    `torch.autograd.grad` on the plain module, not from `engine.backward`: under ZeRO-2, `p.grad` is None
    after backward and `safe_get_full_grad` returns the gradient already averaged over ranks, whose square
    underestimates the Fisher; it would also run ZeRO's gradient hooks and reduce-scatter, and touch the
    accumulation buffers and the fp16 loss scaler of the step in progress. autograd.grad does not run the
    AccumulateGrad nodes that ZeRO hooks, so the engine's state stays exactly as it was; each rank squares
    its own per-sample gradients, and the caller averages over ranks with one all-reduce. In fp16 the
    loss is scaled before autograd.grad (small gradients would underflow) and unscaled in fp32, halving the
    scale for a sample whose gradients overflow."""
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    used = left_out = 0
    was_training = module.training
    module.eval()  # no dropout: the Fisher is a property of the weights, and it draws no random numbers
    try:
        for batch in batches:
            input_ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            logits = module(input_ids).float()
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
            per_sample = nll.mean(dim=1)
            for b, sample in enumerate(batch["sample_index"].tolist()):
                if skip_sample is not None and skip_sample(sample):
                    left_out += 1
                    continue
                scale = loss_scale
                while True:
                    grads = torch.autograd.grad(per_sample[b] * scale, params, retain_graph=True, allow_unused=True)
                    squares = [(g.float() / scale).square() if g is not None else None for g in grads]
                    finite = all(bool(torch.isfinite(s).all()) for s in squares if s is not None)
                    if finite or scale <= 1.0:
                        break
                    scale /= 2.0
                if not finite:
                    left_out += 1
                    continue
                for total, square in zip(sums, squares):
                    if square is not None:
                        total += square
                used += 1
            del logits, nll, per_sample  # frees the retained graph
    finally:
        module.train(was_training)
    return sums, used, left_out


class EWC:
    """The consolidation penalty and its state; subscribes to the task schedule's on_task_end."""

    def __init__(self, strength: float, gamma: float, fisher_batches: int, batches_for: Callable, num_tasks: int):
        self.strength = float(strength)
        self.num_tasks = int(num_tasks)
        self.gamma = float(gamma)
        self.fisher_batches = int(fisher_batches)
        self.batches_for = batches_for  # task -> this rank's Fisher micro-batches
        self.engine = None
        self.skip_sample: Optional[Callable[[int], bool]] = None
        self.fisher: Optional[list] = None  # fp32, normalised, accumulated over tasks
        self.anchor: Optional[list] = None  # theta* (fp32)
        self.tasks = 0  # tasks consolidated
        self.last_penalty = torch.zeros(())

    @property
    def enabled(self) -> bool:
        return self.strength > 0

    def attach(self, engine, skip_sample: Optional[Callable[[int], bool]] = None) -> None:
        self.engine = engine
        self.skip_sample = skip_sample

    def _params(self) -> list:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def penalty(self) -> Optional[torch.Tensor]:
        """(lambda/2) sum F (theta - theta*)^2 in fp32, or None before the first consolidation (or when off)."""
        if not self.enabled or self.fisher is None:
            return None
        total = torch.zeros((), dtype=torch.float32, device=self.fisher[0].device)
        for p, f, anchor in zip(self._params(), self.fisher, self.anchor):
            total = total + (f * (p.float() - anchor).square()).sum()
        penalty = 0.5 * self.strength * total
        self.last_penalty = penalty.detach()
        return penalty

    def on_task_end(self, task) -> None:
        if not self.enabled:
            return
        if task.index == self.num_tasks - 1:
            log.info("EWC: no Fisher for the last task %r (no later task to protect it from)", task.name)
            return
        engine = self.engine
        params = self._params()
        # The Fisher of fp16 weights: scale as the engine's loss scaler currently does (it is known not to
        # overflow on training batches); bf16/fp32 need no scaling.
        loss_scale = current_loss_scale(engine) if params[0].dtype == torch.float16 else 1.0
        sums, used, left_out = fisher_diagonal(engine.module, params, self.batches_for(task, self.fisher_batches),
                                               engine.device, loss_scale, self.skip_sample)
        # One all-reduce of every sum and the two counts: the mean over all ranks' samples.
        flat = torch.cat([s.flatten() for s in sums] +
                         [torch.tensor([used, left_out], dtype=torch.float32, device=engine.device)])
        flat = comm.all_reduce(flat.double()).float()
        used_all, left_out_all = int(flat[-2].item()), int(flat[-1].item())
        if left_out_all:
            log.warning("EWC: %d samples of task %r were left out of its Fisher (quarantined or non-finite gradients)",
                        left_out_all, task.name)
        if used_all == 0:
            raise RuntimeError(f"EWC: no sample of task {task.name!r} gave finite gradients for its Fisher")
        fisher = flat[:-2] / used_all
        mean = fisher.mean()
        if mean <= 0:
            log.warning("EWC: the Fisher of task %r is zero everywhere; it adds no consolidation", task.name)
        else:
            fisher = fisher / mean  # mean 1: lambda means the same for every task, model size and loss scale
        new, offset = [], 0
        for p in params:
            new.append(fisher[offset:offset + p.numel()].view(p.shape).clone())
            offset += p.numel()
        self.fisher = new if self.fisher is None else [self.gamma * f + n for f, n in zip(self.fisher, new)]
        self.anchor = [p.detach().float().clone() for p in params]
        self.tasks += 1
        log.info("EWC: Fisher of task %r from %d samples (max/mean %.1f); %d task(s) consolidated", task.name,
                 used_all, float(fisher.max()), self.tasks)

    def state_dict(self) -> dict:
        to_cpu = (lambda ts: [t.cpu() for t in ts]) if self.fisher is not None else (lambda ts: None)
        return {"fisher": to_cpu(self.fisher), "anchor": to_cpu(self.anchor), "tasks": self.tasks,
                "strength": self.strength, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        device = self.engine.device if self.engine is not None else "cpu"
        self.tasks = int(state["tasks"])
        self.fisher = [t.to(device) for t in state["fisher"]] if state["fisher"] is not None else None
        self.anchor = [t.to(device) for t in state["anchor"]] if state["anchor"] is not None else None
