"""Loss and held-out evaluation (mean token NLL, perplexity, token accuracy), reduced over all ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import comm
from pipeline.metrics import perplexity


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL, computed in fp32 whatever the training precision."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(engine, batches, max_batches: int = 0) -> dict:
    """One pass over this rank's validation batches; sums are all-reduced so every rank gets the same numbers."""
    was_training = engine.module.training
    engine.eval()
    device = engine.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll sum, correct, tokens
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        input_ids = batch["input_ids"].to(device)
        targets = batch["targets"].to(device)
        logits = engine(input_ids).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        correct = (logits.argmax(-1).flatten() == targets.flatten()).double()
        mask = batch.get("loss_mask")
        mask = mask.to(device).flatten().double() if mask is not None else torch.ones_like(correct)
        totals += torch.stack([(nll.double() * mask).sum(), (correct * mask).sum(), mask.sum()])
    totals = comm.all_reduce(totals, out_device="cpu")
    if was_training:
        engine.train()
    nll_sum, correct, tokens = totals.tolist()
    if tokens == 0:
        raise RuntimeError("the validation split produced no tokens for evaluation")
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": correct / tokens, "tokens": int(tokens)}
