"""bench/: the per-component breakdown, the GPU speed table (run on a CPU with a tiny model), the matched
Transformer and the loop's steady-state parsing. Timings are never asserted, only their bookkeeping."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model import (COMPONENTS, TransformerLM, breakdown, component_calls, flops_per_token,  # noqa: E402
                               hybrid_config, make_optimizer, matched_transformer, num_params, print_breakdown,
                               time_interleaved)
from bench.gpu_model_check import speed  # noqa: E402
from pipeline.flops import model_flops_per_token  # noqa: E402
from pipeline.model import HybridLM  # noqa: E402


@pytest.fixture
def one_thread():
    # A second thread on a shared 2-core machine mostly waits for the other core; the bookkeeping is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hybrid() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(hybrid_config(32, 512, preset="tiny"))  # every feature on, one attention layer


def test_every_part_of_the_model_is_one_component_call():
    model = tiny_hybrid()
    calls = component_calls(model, torch.zeros(1, 1, dtype=torch.long))
    counts = {name: sum(n == name for n, _, _ in calls) for name in COMPONENTS}
    layers = model.cfg.num_layers
    assert counts == {"embedding": 1, "spiking": layers, "liquid": layers, "encoder": layers, "mamba": layers,
                      "cross": 2 * layers, "gate": layers, "attention": 1, "head": 1, "optimizer": 0, "other": 0}
    # No module is timed twice, and every parameter but the block norms' (glue) belongs to a timed module.
    modules = [m for _, m, _ in calls]
    assert len({id(m) for m in modules}) == len(modules)
    owned = {id(p) for _, m, _ in calls for p in m.parameters()}
    for layer in model.layers:
        owned |= {id(p) for name, p in layer.named_parameters()
                  if name.split(".")[0] in ("liquid_out", "spike_adapter", "lif")}
    owned |= {id(model.lm_head.weight)}
    glue = [n for n, p in model.named_parameters() if id(p) not in owned]
    assert all(n.endswith("norm.weight") for n in glue), glue


def test_breakdown_has_every_component_and_fits_in_the_step(one_thread, capsys):
    model = tiny_hybrid()
    opt = make_optimizer(model)
    B, T = 4, 64
    parts = breakdown(model, opt, B, T, reps=5)
    assert set(parts) == set(COMPONENTS) | {"step"}
    measured = {k: v for k, v in parts.items() if k not in ("other", "step")}
    assert all(v > 0 for v in measured.values()), measured
    step = parts["step"]
    assert sum(measured.values()) + parts["other"] == pytest.approx(step)
    # Each part timed alone does the work it does inside the step, so together they fit in it
    # (with room for timing noise); counting a component twice would overflow it.
    assert sum(measured.values()) < 1.3 * step, parts
    print_breakdown(parts, "tiny")
    out = capsys.readouterr().out
    assert all(label in out for label in COMPONENTS.values())


def test_gpu_speed_table_runs_on_a_cpu(one_thread, tmp_path, capsys):
    cfg = hybrid_config(32, 512, preset="tiny")
    res = speed(cfg, [(16, 2), (32, 2), (64, 1)], "cpu", None, reps=1, warmup=1, rehearsal=True)
    out = capsys.readouterr().out
    assert "hybrid PyTorch tok/s" in out and "Transformer tok/s" in out and "CPU rehearsal" in out
    assert [(r["T"], r["B"]) for r in res["rows"]] == [(16, 2), (32, 2), (64, 1)]
    for r in res["rows"]:
        assert r["ratio_torch"] == pytest.approx(r["hybrid_torch_tok_s"] / r["transformer_tok_s"])
    targets = {t["name"]: t for t in res["targets"]}
    assert set(targets) == {"ratio_at_32", "mfu_at_32", "drop_32_to_64"}
    ref, long = res["rows"][1], res["rows"][2]
    assert targets["ratio_at_32"]["pass"] == (ref["ratio_torch"] >= 0.5)
    drop = 1 - long["hybrid_torch_tok_s"] / ref["hybrid_torch_tok_s"]
    assert targets["drop_32_to_64"]["value"] == pytest.approx(drop)
    assert targets["mfu_at_32"]["value"] == pytest.approx(ref["hybrid_torch_mfu_measured"])
    lines = out.splitlines()
    for name in targets:
        assert any(line.strip().startswith(name) and line.rstrip().endswith(("PASS", "FAIL")) for line in lines)
    assert set(res["breakdown"]["seconds"]) == set(COMPONENTS) | {"step"}
    assert all(label in out for label in COMPONENTS.values())
    json.dumps(res)  # gpu_check.json takes it as it is


def test_matched_transformer_is_the_closest_in_parameters():
    cfg = hybrid_config(512, 8000)
    target = num_params(HybridLM(cfg))
    assert round(target / 1e5) == 521  # the issue's CPU hybrid: 52.1M
    base = matched_transformer(cfg, target)
    layers = len(base.blocks)
    assert base.embed.weight.shape == (8000, 512) and base.blocks[0].fc.out_features == 4 * 512
    assert (base.head.weight is base.embed.weight) == cfg.tie_embeddings

    def params(n):  # counted like the model, without building another 50M-parameter model
        H = 512
        return num_params(base) + (n - layers) * (12 * H * H + 4 * H)

    assert abs(params(layers) - target) <= min(abs(params(layers - 1) - target), abs(params(layers + 1) - target))
    assert params(layers) == num_params(base)


def test_gpu_hybrid_is_the_issues_size():
    torch.manual_seed(0)
    cfg = hybrid_config(640, 32000, 8)
    with torch.device("meta"):
        n = num_params(HybridLM(cfg))
    assert round(n / 1e5) == 1076


def test_transformer_flops_follow_the_hybrids_convention():
    L, H, V, T = 3, 64, 100, 128
    model = TransformerLM(V, H, L, 1, 4 * H, tie=True)
    # 2 per weight of every matmul (the tied head too), attention 4*T*H per layer, training = 3 x forward
    assert flops_per_token(model, T) == 3 * (2 * (12 * H * H * L + V * H) + L * 4 * T * H)
    cfg = hybrid_config(32, 512, preset="tiny")
    assert flops_per_token(HybridLM(cfg), T) == model_flops_per_token(cfg, T)


def test_runs_take_turns_step_by_step():
    order = []
    runs = {}
    for name in ("a", "b"):
        model = TransformerLM(50, 16, 1, 1, 64, tie=True)
        runs[name] = (model, make_optimizer(model), lambda name=name: order.append(name))
    times = time_interleaved(runs, 50, 2, 8, reps=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert [len(t) for t in times.values()] == [2, 2] and all(x > 0 for t in times.values() for x in t)
