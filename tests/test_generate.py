"""Recurrent generation: stepping token by token with carried state equals the full-sequence forward."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import HybridLM

ROOT = Path(__file__).resolve().parent.parent
V = 37


pytestmark = pytest.mark.usefixtures("one_thread")


def load_generate():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "launch/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_dim=16, num_layers=2, liquid_units=8, spiking_units=8,
                num_attention_heads=2, attention_every=2, mamba_d_state=4, num_gate_heads=2,
                cross_attn_heads=2, beta=0.8, spike_temporal_tau=4.0, spike_rate_window=4)
    base.update(kw)
    return ModelConfig(**base)


CASES = {
    "bidirectional-gate-temporal": dict(integration_mode="bidirectional", use_cross_attention=True,
                                        use_adaptive_gating=True, spike_to_mamba_method="temporal"),
    "parallel-cross-rate-K3-zero": dict(integration_mode="parallel", use_cross_attention=True,
                                        spike_to_mamba_method="rate", num_spike_steps=3, spike_reset="zero"),
    "sequential-potential-cfc-pos": dict(integration_mode="sequential", liquid_backbone="cfc",
                                         max_position_embeddings=64),
    "no-mamba": dict(use_mamba=False, attention_every=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_by_step_logits_equal_the_full_forward(name):
    torch.manual_seed(0)
    model = HybridLM(cfg(**CASES[name])).double().eval()
    ids = torch.randint(0, V, (3, 30))
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(3, torch.device("cpu"), torch.float64)
        steps = []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
        assert torch.allclose(torch.stack(steps, 1), full, rtol=0, atol=1e-10)
        # Prefill a prefix in parallel, then continue step by step: the same logits again.
        logits, state = model(ids[:, :17], model.init_state(3), return_state=True)
        assert torch.allclose(logits, full[:, :17], rtol=0, atol=1e-10)
        for t in range(17, 30):
            logits, state = model.step(ids[:, t], state)
            assert torch.allclose(logits, full[:, t], rtol=0, atol=1e-10)


def is_kv_cache(value) -> bool:
    return isinstance(value, dict) and "len" in value


def kv_caches(state):
    """The attention and cross-attention KV caches of a model state."""
    out = []
    for layer_state in state["layers"]:
        if is_kv_cache(layer_state):
            out.append(layer_state)
        else:
            out += [v for v in layer_state.values() if is_kv_cache(v)]
    return out


def recurrent_tensors(state):
    """(name, tensor) of every state tensor except the KV caches."""
    out = []
    for i, layer_state in enumerate(state["layers"]):
        if is_kv_cache(layer_state):
            continue
        for key, value in layer_state.items():
            if is_kv_cache(value):
                continue
            flat = value.items() if isinstance(value, dict) else [("", value)]
            out += [(f"{i}.{key}.{k}", v) for k, v in flat if v is not None]
    return out


def test_recurrent_state_does_not_grow_with_position():
    model = HybridLM(cfg(**CASES["bidirectional-gate-temporal"])).eval()
    state = model.init_state(2)

    def shapes(st):
        # Everything except the attention KV caches must have a fixed size.
        return [tuple(v.shape) for _, v in recurrent_tensors(st)]

    with torch.no_grad():
        for t in range(3):
            _, state = model.step(torch.tensor([1, 2]), state)
        early = shapes(state)
        for t in range(40):
            _, state = model.step(torch.tensor([1, 2]), state)
    assert shapes(state) == early and state["pos"] == 43
    assert len(kv_caches(state)) == 5 and all(c["len"] == 43 for c in kv_caches(state))


@pytest.mark.parametrize("name", ["bidirectional-gate-temporal", "parallel-cross-rate-K3-zero"])
def test_kv_caches_are_preallocated_and_written_in_place(name):
    torch.manual_seed(0)
    model = HybridLM(cfg(**CASES[name])).eval()
    ids = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        full = model(ids)
        _, state = model(ids[:, :10], model.init_state(2, max_len=24), return_state=True)
        caches = kv_caches(state)
        assert len(caches) >= 2  # cross-attention and self-attention
        ptrs = [(c["k"].data_ptr(), c["v"].data_ptr()) for c in caches]
        for t in range(10, 24):
            logits, state = model.step(ids[:, t], state)
            assert torch.allclose(logits, full[:, t], rtol=0, atol=1e-5)
            assert [(c["k"].data_ptr(), c["v"].data_ptr()) for c in kv_caches(state)] == ptrs
        assert all(c["len"] == 24 and c["k"].shape[2] == 24 for c in kv_caches(state))
        # Without a length the caches grow by doubling: a few reallocations, not one per token.
        state = model.init_state(2)
        seen = set()
        for t in range(24):
            _, state = model.step(ids[:, t], state)
            seen.add(kv_caches(state)[0]["k"].data_ptr())
        assert len(seen) <= 6


@pytest.mark.parametrize("name", list(CASES))
def test_saved_states_do_not_pin_the_prompt(name):
    torch.manual_seed(0)
    model = HybridLM(cfg(**CASES[name])).eval()
    with torch.no_grad():
        for batch in (1, 2):  # with one sequence a slice of the last token is contiguous: copy anyway
            _, state = model(torch.randint(0, V, (batch, 40)), model.init_state(batch), return_state=True)
            for key, value in recurrent_tensors(state):
                held, own = value.untyped_storage().nbytes(), value.numel() * value.element_size()
                assert held == own, f"state {key} keeps {held} bytes alive for its {own}"
            for cache in kv_caches(state):
                for buf in (cache["k"], cache["v"]):
                    held, own = buf.untyped_storage().nbytes(), buf.numel() * buf.element_size()
                    assert held == own, "a KV cache is a view into a larger tensor"


def test_greedy_generation_equals_recomputing_the_full_forward():
    gen = load_generate()
    torch.manual_seed(1)
    model = HybridLM(cfg(**CASES["bidirectional-gate-temporal"])).double().eval()
    prompt = [3, 5, 7, 11]
    new = gen.generate(model, prompt, max_new_tokens=12, temperature=0.0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


class RecordInputs:
    """Wraps a model's forward and records the token ids it is given."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        forward = model.forward

        def recording(input_ids, *args, **kwargs):
            self.calls.append(input_ids.tolist())
            return forward(input_ids, *args, **kwargs)

        monkeypatch.setattr(model, "forward", recording)


def test_empty_prompt_starts_from_the_end_of_document_token(monkeypatch):
    gen = load_generate()
    torch.manual_seed(1)
    model = HybridLM(cfg(**CASES["bidirectional-gate-temporal"])).double().eval()
    eos = 2
    with torch.no_grad():
        expected = [int(model(torch.tensor([[eos]]))[0, -1].argmax())]
    rec = RecordInputs(model, monkeypatch)
    new = gen.generate(model, [], max_new_tokens=5, temperature=0.0, eos_id=eos)
    assert rec.calls[0] == [[eos]] and new[0] == expected[0]
    with pytest.raises(ValueError, match="eos_id"):
        gen.generate(model, [], max_new_tokens=5)


def test_cli_empty_prompt_uses_the_tokenizers_eos_not_bos(monkeypatch, capsys):
    gen = load_generate()
    model = HybridLM(cfg()).eval()
    rec = RecordInputs(model, monkeypatch)

    class FakeSP:
        def __init__(self, model_file):
            pass

        def encode(self, text):
            return [ord(c) % V for c in text]

        def decode(self, ids):
            return "|".join(map(str, ids))

        def bos_id(self):
            return 1

        def eos_id(self):
            return 2

    import pipeline.engine.checkpoint as ckpt
    import sentencepiece
    monkeypatch.setattr(ckpt, "load_for_inference", lambda run_dir, tag=None: (model, model.cfg, "tok.model"))
    monkeypatch.setattr(sentencepiece, "SentencePieceProcessor", FakeSP)
    gen.main(["--checkpoint", "runs/x", "--max_new_tokens", "3", "--temperature", "0"])
    assert rec.calls[0] == [[2]]


def test_sampling_respects_top_k_and_seed():
    gen = load_generate()
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    draws = {int(gen.sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws <= {1, 2}
    model = HybridLM(cfg()).eval()
    a = gen.generate(model, [1, 2], 8, temperature=1.0, top_k=5, seed=7)
    b = gen.generate(model, [1, 2], 8, temperature=1.0, top_k=5, seed=7)
    assert a == b and len(a) == 8


def test_cli_main_loads_the_run_and_prints_text(monkeypatch, capsys):
    gen = load_generate()
    model = HybridLM(cfg()).eval()
    calls = {}

    def fake_load(run_dir, tag=None):
        calls["args"] = (run_dir, tag)
        return model, model.cfg, "tok.model"

    class FakeSP:
        def __init__(self, model_file):
            calls["tok"] = model_file

        def encode(self, text):
            return [ord(c) % V for c in text]

        def decode(self, ids):
            return "|".join(map(str, ids))

        def bos_id(self):
            return 1

        def eos_id(self):
            return -1

    import pipeline.engine.checkpoint as ckpt
    import sentencepiece
    monkeypatch.setattr(ckpt, "load_for_inference", fake_load)
    monkeypatch.setattr(sentencepiece, "SentencePieceProcessor", FakeSP)
    text = gen.main(["--checkpoint", "runs/x", "--prompt", "hi", "--max_new_tokens", "5",
                     "--temperature", "0.7", "--top_k", "4", "--seed", "3"])
    assert calls == {"args": ("runs/x", None), "tok": "tok.model"}
    assert len(text.split("|")) == 2 + 5 and text in capsys.readouterr().out
