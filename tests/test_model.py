"""HybridLM: causality and finite gradients for every option combination, API contracts, presets."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import HybridLM


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
V = 61

# Every valid (use_mamba, integration_mode, use_cross_attention, use_adaptive_gating) combination;
# the other options rotate through their values across the combinations.
STREAMS = [
    (False, "sequential", False, False),
    (True, "sequential", False, False),
    (True, "sequential", False, True),
    (True, "parallel", False, False),
    (True, "parallel", False, True),
    (True, "parallel", True, False),
    (True, "parallel", True, True),
    (True, "bidirectional", True, False),
    (True, "bidirectional", True, True),
]
ENCODINGS = ["rate", "temporal", "potential"]
BACKBONES = ["scan", "cfc"]
RESETS = ["subtract", "zero", "none"]
SURROGATES = ["atan", "fast_sigmoid"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_dim=16, num_layers=2, liquid_units=8, spiking_units=8,
                num_attention_heads=2, attention_every=1, mamba_d_state=4, mamba_expand=2,
                num_gate_heads=2, cross_attn_heads=2, beta=0.8, spike_temporal_tau=4.0,
                spike_rate_window=3)
    base.update(kw)
    return ModelConfig(**base)


def combos():
    """Every stream combination x every encoding x both liquid backbones; the remaining options
    (reset, surrogate, sub-steps, positions) rotate through their values."""
    out = []
    i = 0
    for mamba, mode, cross, gate in STREAMS:
        for enc in (ENCODINGS if mamba else ENCODINGS[:1]):
            for backbone in BACKBONES:
                out.append(dict(use_mamba=mamba, integration_mode=mode, use_cross_attention=cross,
                                use_adaptive_gating=gate, spike_to_mamba_method=enc,
                                liquid_backbone=backbone, spike_reset=RESETS[i % 3],
                                surrogate=SURROGATES[(i // 3) % 2], num_spike_steps=1 + i % 2,
                                max_position_embeddings=64 if i % 4 == 0 else 0))
                i += 1
    return out


def combo_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items() if k in ("use_mamba", "integration_mode",
                    "use_cross_attention", "use_adaptive_gating", "spike_to_mamba_method", "liquid_backbone"))


@pytest.mark.parametrize("options", combos(), ids=combo_id)
def test_causal_and_every_parameter_gets_a_finite_gradient(options):
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(**options)).double()
    ids = torch.randint(0, V, (2, 40))
    logits = model(ids)
    assert logits.shape == (2, 40, V) and logits.dtype == torch.float64
    # Causality: changing token t never changes the outputs before t (and does change t itself).
    for t in (0, 17, 39):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        other = model(changed)
        assert torch.allclose(other[:, :t], logits[:, :t], rtol=0, atol=1e-12), f"token {t} leaked backwards"
        assert not torch.allclose(other[:, t], logits[:, t])
    # Gradients: every parameter, finite.  Loss covers all positions.
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_liquid_units_start_with_their_configured_memory():
    # The block initialises the liquid cell itself: its memory at the first step must still span the
    # sampled time constants (1 to 64 tokens), on the block's real inputs (normed stream + spikes).
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((ROOT / "launch/presets/small.yaml").read_text())["model"])
    block = HybridLM(cfg).layers[0]
    xn = block.norm(torch.randn(4, 64, cfg.hidden_dim))
    rate = block.lif(block.spike_proj(xn))[0]
    with torch.no_grad():
        tau = block.liquid.effective_tau(torch.cat([xn, rate], -1))
    per_unit = tau.median(dim=1).values.median(dim=0).values
    assert per_unit.max() > 32 and per_unit.min() < 2 and 3 < per_unit.median() < 20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward_is_finite(dtype):
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(integration_mode="bidirectional", use_cross_attention=True,
                              use_adaptive_gating=True)).to(dtype)
    logits = model(torch.randint(0, V, (2, 24)))
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_observables_are_detached_scalars_from_the_last_forward():
    model = HybridLM(tiny_cfg(use_adaptive_gating=True, integration_mode="parallel"))
    model(torch.randint(0, V, (2, 12)))
    obs = model.observables()
    assert {"spike_rate/layer0", "spike_rate/layer1", "gate/layer0", "spike_rate/mean"} <= set(obs)
    for value in obs.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert 0.0 <= float(obs["spike_rate/mean"]) <= 1.0


def test_parameter_groups_exempt_norms_biases_embeddings_A_log_and_D():
    model = HybridLM(tiny_cfg())
    groups = model.parameter_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = (name.endswith(("A_log", ".D", "bias", "log_tau")) or "norm" in name or "embed" in name)
        assert (id(p) in no_decay) == exempt, name
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_deep_stack_is_stable_at_initialisation():
    torch.manual_seed(0)
    model = HybridLM(tiny_cfg(hidden_dim=32, num_layers=24, attention_every=4))
    ids = torch.randint(0, V, (2, 32))
    hidden = model.embed(ids)
    std0 = hidden.std().item()
    for layer in model.layers:
        hidden, _ = layer(hidden)
    assert hidden.std().item() < 3 * std0           # depth-scaled residual branches
    logits = model(ids)
    targets = torch.randint(0, V, ids.shape)
    assert abs(torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1)).item() - math.log(V)) < 0.1
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("bad,fields", [
    (dict(integration_mode="bidirectional", use_cross_attention=False), "model.use_cross_attention"),
    (dict(use_mamba=False, integration_mode="parallel"), "model.use_mamba"),
    (dict(use_mamba=False, use_adaptive_gating=True), "model.use_adaptive_gating"),
    (dict(integration_mode="sequential", use_cross_attention=True), "model.integration_mode"),
    (dict(use_cross_attention=True, integration_mode="parallel", cross_attn_heads=3), "model.cross_attn_heads"),
    (dict(use_adaptive_gating=True, num_gate_heads=5), "model.num_gate_heads"),
    (dict(num_attention_heads=3), "model.num_attention_heads"),
    (dict(beta=1.0), "model.beta"),
    (dict(spike_temporal_tau=0.0), "model.spike_temporal_tau"),
    (dict(mamba_d_state=0), "model.mamba_d_state"),
])
def test_invalid_combinations_fail_at_config_time_naming_the_fields(bad, fields):
    with pytest.raises(ConfigError, match=fields.replace(".", r"\.")) as err:
        tiny_cfg(**bad)
    assert str(err.value).count(". ") == 0  # one sentence


def test_cpu_path_never_imports_mamba_ssm_and_cuda_backend_is_refused_without_it():
    HybridLM(tiny_cfg())(torch.randint(0, V, (1, 5)))
    assert "mamba_ssm" not in sys.modules
    try:
        import mamba_ssm  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="mamba_backend"):
            HybridLM(tiny_cfg(mamba_backend="cuda"))


def test_state_dict_round_trip_and_mamba_key_names():
    model = HybridLM(tiny_cfg())
    keys = set(model.state_dict())
    for leaf in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                 "dt_proj.bias", "A_log", "D", "out_proj.weight"):
        assert f"layers.0.mamba.{leaf}" in keys
    clone = HybridLM(tiny_cfg())
    clone.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (1, 9))
    assert torch.equal(clone(ids), model(ids))


PRESETS = ["tiny", "small", "base", "production"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build(name):
    cfg = ModelConfig(**yaml.safe_load((ROOT / "launch/presets" / f"{name}.yaml").read_text())["model"])
    with torch.device("meta"):
        model = HybridLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    if name == "base":
        assert 90e6 < n < 110e6 and cfg.vocab_size > 50000          # ~100M with a 50k vocab
    if name == "small":
        assert (cfg.num_layers, cfg.liquid_units, cfg.spiking_units, cfg.hidden_dim) == (2, 64, 32, 128)
    if name == "production":
        assert (cfg.integration_mode, cfg.mamba_d_state, cfg.mamba_expand, cfg.num_gate_heads,
                cfg.cross_attn_heads) == ("bidirectional", 32, 2, 8, 16)
        assert cfg.use_mamba and cfg.use_adaptive_gating and cfg.use_cross_attention


def test_tiny_preset_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(**yaml.safe_load((ROOT / "launch/presets/tiny.yaml").read_text())["model"])
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameter_groups(0.1), lr=3e-3)
    ids = torch.randint(0, 16, (2, 17))  # a small alphabet: learnable quickly
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
