"""Sample text from a trained run, carrying every layer's recurrent state (O(1) work per new token
for the liquid, spiking and Mamba layers; attention layers keep a KV cache).

    python launch/generate.py --checkpoint outputs/demo --prompt "def main(" --max_new_tokens 80 \
        --temperature 0.8 --top_k 40

The prompt is processed in one parallel forward that returns the state; each new token then costs one
``model.step``.  An empty prompt starts from EOS: in training, documents begin after an EOS.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,).  temperature 0 is greedy; top_k 0 keeps the whole vocabulary."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, eos_id: Optional[int] = None, seed: Optional[int] = None) -> List[int]:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens (stopping after ``eos_id``); returns
    the new ids.  An empty prompt starts from ``eos_id``: the training stream joins documents with
    EOS, so a document begins after EOS (BOS never occurs in it and its embedding is untrained)."""
    if len(prompt_ids) == 0:
        if eos_id is None:
            raise ValueError("an empty prompt starts from the EOS token: pass eos_id")
        prompt_ids = [eos_id]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    # Sized for the whole generation, so the attention KV caches are written in place.
    state = model.init_state(1, device, next(model.parameters()).dtype,
                             max_len=len(prompt_ids) + max_new_tokens)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits, state = model(prompt, state, return_state=True)
    last = logits[:, -1]
    out: List[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(last, temperature, top_k, generator)
        out.append(int(token.item()))
        if eos_id is not None and out[-1] == eos_id:
            break
        last, state = model.step(token, state)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample from a trained hybrid LM run.")
    p.add_argument("--checkpoint", required=True, help="run folder (outputs/<run>) holding checkpoints")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=50, help="0: no top-k truncation")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_parser().parse_args(argv)
    import sentencepiece as spm

    from pipeline.engine.checkpoint import load_for_inference

    model, _cfg, tokenizer_path = load_for_inference(args.checkpoint, args.tag)
    model = model.to(args.device).eval()
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = sp.encode(args.prompt) if args.prompt else []
    eos = sp.eos_id() if sp.eos_id() >= 0 else None
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, eos, args.seed)
    text = sp.decode(list(ids) + new)
    print(text)
    return text


if __name__ == "__main__":
    main()
