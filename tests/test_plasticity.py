"""STDP and metaplasticity: the rules against plain references, and their life under real 2-rank DeepSpeed ZeRO-2
engines (fp32, emulated fp16 with DeepSpeed's real loss scaler, bf16) and through launch/train.py.

`plasticity_driver.py` runs every engine scenario in one launch (one process-group start-up for all of them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsrun import ROOT, free_port, tiny_data, train, train_records  # noqa: F401  (tiny_data is a fixture)
from pipeline.config import ConfigError, PlasticityConfig
from pipeline.plasticity import (STDP, MetaAdamW, MetaPlasticity, bounded, metaplastic_groups, stdp_delta,
                                        stdp_terms)
from pipeline.run_config import load_yaml_config

TINY = str(ROOT / "launch/presets/tiny.yaml")


# ---- the rules, without DeepSpeed -----------------------------------------------------------

def reference_terms(pre, post, tau_plus, tau_minus):
    """The trace rule token by token in float64 (what stdp_terms computes with scans and two matmuls)."""
    pre, post = pre.double(), post.double()
    B, T, H = pre.shape
    S = post.shape[-1]
    trace_pre, trace_post = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, S, dtype=torch.float64)
    ltp, ltd = torch.zeros(S, H, dtype=torch.float64), torch.zeros(S, H, dtype=torch.float64)
    for t in range(T):
        trace_pre = trace_pre * (1 - 1 / tau_plus) + pre[:, t]
        ltd += torch.einsum("bs,bh->sh", trace_post, pre[:, t])  # post spikes strictly before this token
        trace_post = trace_post * (1 - 1 / tau_minus) + post[:, t]
        ltp += torch.einsum("bs,bh->sh", post[:, t], trace_pre)
    return ltp / (B * T), ltd / (B * T), post.mean((0, 1))


def test_stdp_terms_equal_the_token_by_token_rule():
    torch.manual_seed(0)
    pre = torch.randn(3, 37, 5, dtype=torch.float64)  # 37: the blocked scan pads to whole chunks
    post = (torch.rand(3, 37, 4) < 0.3).double()
    for got, want in zip(stdp_terms(pre, post, 4.0, 7.0), reference_terms(pre, post, 4.0, 7.0)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # fp16 inputs are traced in fp32
    ltp, ltd, rate = stdp_terms(pre.half(), post.half(), 4.0, 7.0)
    assert ltp.dtype == torch.float32
    torch.testing.assert_close(ltp.double(), reference_terms(pre.half(), post, 4.0, 7.0)[0], rtol=1e-5, atol=1e-5)


def test_homeostatic_depression_and_the_bound():
    ltp, ltd = torch.ones(2, 3), torch.ones(2, 3)
    delta = stdp_delta(ltp, ltd, 1.0, 1.0, depression_scale=torch.tensor([0.5, 2.0]))
    assert delta[0].tolist() == [0.5] * 3 and delta[1].tolist() == [-1.0] * 3  # below target: net potentiation
    weight = torch.full((2, 3), 2.0)
    assert torch.equal(bounded(torch.full((2, 3), 1e-3), weight, 0.01), torch.full((2, 3), 1e-3))
    clipped = bounded(torch.ones(2, 3), weight, 0.01)
    torch.testing.assert_close(clipped.norm(), 0.01 * weight.norm())


def test_stdp_counts_only_accepted_training_micro_batches():
    from pipeline.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(load_yaml_config(TINY).model)
    stdp = STDP(PlasticityConfig(stdp="pair"), model)
    ids = torch.randint(0, 512, (2, 16))
    model.eval()
    model(ids)  # evaluation records nothing
    with pytest.raises(RuntimeError, match="must follow a training forward"):
        stdp.accept_micro_batch()
    model.train()
    model(ids)  # a micro-batch the guard skipped: its terms are overwritten by the next forward
    model(ids)
    stdp.accept_micro_batch()
    assert stdp._count == 1
    before = [w.detach().clone() for w in stdp.weights]
    stdp.after_step()
    assert stdp.applied == 1 and all(not torch.equal(b, w) for b, w in zip(before, stdp.weights))


def adamw_pair(strength):
    """The same toy model twice: plain AdamW, and MetaAdamW with matrices at `strength` and 1-D parameters exempt."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 4))
    meta = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 4))
    meta.load_state_dict(plain.state_dict())
    settings = dict(lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)
    return plain, meta, torch.optim.AdamW(plain.parameters(), **settings), \
        MetaAdamW(metaplastic_groups(meta.parameters(), strength), **settings)


def step_both(plain, meta, opt_plain, opt_meta, x):
    for model, opt in ((plain, opt_plain), (meta, opt_meta)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def test_meta_scales_outward_updates_by_the_documented_factor():
    m = 30.0
    plain, meta, opt_plain, opt_meta = adamw_pair(m)
    assert [g["meta"] for g in opt_meta.param_groups] == [m, 0.0]
    assert all(p.ndim >= 2 for p in opt_meta.param_groups[0]["params"])
    x = torch.randn(8, 6)
    step_both(plain, meta, opt_plain, opt_meta, x)  # step 1: the reference is the initial weights; |W - W_ref| = 0
    for a, b in zip(plain.parameters(), meta.parameters()):
        assert torch.equal(a, b)
    # known importances: each matrix element at a chosen distance (either side) from its reference
    torch.manual_seed(1)
    for p in opt_meta.param_groups[0]["params"]:
        opt_meta.state[p]["meta_ref"] = p.detach() - 0.05 * torch.randn_like(p)
    w0 = {name: p.detach().clone() for name, p in meta.named_parameters()}
    refs = {name: opt_meta.state[p]["meta_ref"].clone() for name, p in meta.named_parameters() if p.ndim >= 2}
    step_both(plain, meta, opt_plain, opt_meta, x)  # Adam's moments depend on the gradients only: equal in both
    for (name, a), b in zip(plain.named_parameters(), meta.parameters()):
        if name not in refs:
            assert torch.equal(a, b), f"{name} is exempt (1-D) and must take the plain AdamW step"
            continue
        update, distance = a.detach() - w0[name], w0[name] - refs[name]
        away = update * distance > 0
        expected = torch.where(away, w0[name] + update * (1 - torch.tanh(m * distance.abs()) ** 2), a.detach())
        assert torch.equal(b.detach(), expected), name
        assert 0 < int(away.sum()) < away.numel()
        assert torch.equal(b.detach()[~away], a.detach()[~away]), "inward updates are taken in full, bit for bit"
        shrink = (b.detach() - w0[name])[away].abs() / update[away].abs()
        assert float(shrink.max()) < 1.0


def test_meta_reference_is_retaken_at_a_task_start():
    plain, meta, opt_plain, opt_meta = adamw_pair(10.0)
    x = torch.randn(8, 6)
    for _ in range(3):
        step_both(plain, meta, opt_plain, opt_meta, x)
    matrix = opt_meta.param_groups[0]["params"][0]
    assert not torch.equal(opt_meta.state[matrix]["meta_ref"], matrix.detach())
    component = MetaPlasticity(PlasticityConfig(meta=True), type("E", (), {"optimizer": opt_meta})(), meta)
    component.on_task_start(None)
    state = component.state_dict()
    assert state["reset_pending"] and state["task_starts"] == 1
    before = matrix.detach().clone()
    step_both(plain, meta, opt_plain, opt_meta, x)
    assert torch.equal(opt_meta.state[matrix]["meta_ref"], before) and not opt_meta.reset_pending
    record = component.train_record()
    assert set(record) >= {"meta_rel_update/0", "meta_drift/0", "meta_task_starts"}


# ---- configuration and the migration table ---------------------------------------------------

OLD_FLAGS = {"--use-stdp": None, "--stdp-type": None, "--stdp-learning-rate": ("stdp_learning_rate", 0.01),
             "--stdp-tau-plus": ("stdp_tau_plus", 20.0), "--stdp-tau-minus": ("stdp_tau_minus", 20.0),
             "--stdp-target-rate": ("stdp_target_rate", 0.1), "--use-meta-plasticity": None, "--meta-lr": None,
             "--meta-history-length": None, "--meta-hidden-dim": None}


def test_every_old_plasticity_flag_has_a_key_a_default_and_a_migration_row():
    fields = {f.name: f for f in dataclasses.fields(PlasticityConfig)}
    assert all(f.default is not dataclasses.MISSING for f in fields.values())
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|")]
    for flag, default in OLD_FLAGS.items():
        row = [r for r in rows if f"`{flag}`" in r or f"`{flag} " in r]
        assert row, f"README's migration table has no row for {flag}"
        keys = re.findall(r"plasticity\.(\w+)", row[0])
        assert keys, f"the row of {flag} names no plasticity.* key: {row[0]}"
        assert all(k in fields for k in keys), f"{flag}: {keys} are not all fields of PlasticityConfig"
        if default is not None:
            name, old = default
            assert name in keys and fields[name].default == old, f"{flag}: default of plasticity.{name}"
    cfg = load_yaml_config(TINY, ["--plasticity.stdp", "homeostatic", "--plasticity.meta", "true"])
    assert cfg.plasticity.enabled and cfg.to_dict()["plasticity"]["stdp"] == "homeostatic"
    assert not load_yaml_config(TINY).plasticity.enabled


@pytest.mark.parametrize("field, value", [("stdp_tau_plus", 0.5), ("stdp_target_rate", 0.0), ("stdp_a_minus", -1.0),
                                          ("stdp_max_update", 0.0), ("meta_strength", 0.0)])
def test_bad_plasticity_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"plasticity.{field}"):
        PlasticityConfig(**{field: value})


# ---- real DeepSpeed ZeRO-2 engines (2 ranks) -----------------------------------------------

@pytest.fixture(scope="module")
def driven(tmp_path_factory):
    out = tmp_path_factory.mktemp("plasticity")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "tests/plasticity_driver.py"),
           str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.distributed
def test_stdp_changes_the_spiking_weights_by_the_rule_on_the_recorded_spikes(driven):
    """lr 0: STDP alone moves the weights, step after step (it survives engine.step()); STDP off: nothing moves."""
    cfg = PlasticityConfig(stdp="homeostatic", stdp_learning_rate=0.04, stdp_a_plus=1.0, stdp_a_minus=1.2,
                           stdp_tau_plus=4.0, stdp_tau_minus=6.0, stdp_target_rate=0.2, stdp_rate_tau=2.0,
                           stdp_max_update=0.03)  # as in the driver
    rank0 = driven[0]
    weights = [w.double() for w in rank0["rule_w0"]]
    rate_avg = None
    clipped = 0
    for k in range(3):
        new_rates = []
        for i in range(len(weights)):
            # every rank's micro-batches of this step, for layer i
            pre = torch.cat([pre for rank in driven for j, pre, _ in rank["rule_spikes"][k] if j == i])
            post = torch.cat([post for rank in driven for j, _, post in rank["rule_spikes"][k] if j == i])
            ltp, ltd, rate = reference_terms(pre, post, cfg.stdp_tau_plus, cfg.stdp_tau_minus)
            r = rate if rate_avg is None else rate_avg[i] + (rate - rate_avg[i]) / cfg.stdp_rate_tau
            new_rates.append(r)
            update = cfg.stdp_learning_rate * (cfg.stdp_a_plus * ltp - cfg.stdp_a_minus * (r / cfg.stdp_target_rate)[:, None] * ltd)
            limit = cfg.stdp_max_update * weights[i].norm()
            if update.norm() > limit:
                clipped += 1
                update = update * limit / update.norm()
            weights[i] = weights[i] + update
            torch.testing.assert_close(rank0["rule_masters"][k][i].double(), weights[i], rtol=2e-5, atol=2e-7)
            assert torch.equal(rank0["rule_modules"][k][i], rank0["rule_masters"][k][i]), "module == master at once"
        rate_avg = new_rates
    assert clipped >= 1 and clipped < 6, "the driver's settings exercise the bound on some steps, not all"
    for got, want in zip(rank0["rule_rate_avg"], rate_avg):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for w_off, w0 in zip(rank0["rule_off"], rank0["rule_w0"]):
        assert torch.equal(w_off, w0), "with STDP off (and lr 0) the weights do not move"
    for k in range(3):  # bit-identical on both ranks, step by step
        for a, b in zip(driven[0]["rule_modules"][k], driven[1]["rule_modules"][k]):
            assert torch.equal(a, b)
    assert rank0["rule_record"]["stdp_applied_steps"] == 3


@pytest.mark.distributed
def test_checkpoint_round_trip_continues_bit_identically(driven):
    for rank in driven:
        assert all(rank["roundtrip_no_lag"]), "module weights equal the fp32 masters right after each update"
        assert rank["roundtrip_pending_after_load"], "a task start just before the checkpoint resets after the resume"
        full, resumed = rank["roundtrip_full"], rank["roundtrip_resumed"]
        for kind in ("masters", "modules"):
            for name, value in full[kind].items():
                assert torch.equal(value, resumed[kind][name]), (kind, name)
        assert all(torch.equal(a, b) for a, b in zip(full["refs"], resumed["refs"]))
        assert full["stdp"]["applied"] == resumed["stdp"]["applied"] == 4
        assert all(torch.equal(a, b) for a, b in zip(full["stdp"]["rate_avg"], resumed["stdp"]["rate_avg"]))
        assert full["meta"] == resumed["meta"]
    for name, value in driven[0]["roundtrip_full"]["modules"].items():
        assert torch.equal(value, driven[1]["roundtrip_full"]["modules"][name]), name
    record = driven[0]["roundtrip_record"]
    assert {"stdp_rel_update/layer0", "stdp_rel_update/layer1", "meta_rel_update/layers.0",
            "meta_drift/layers.0"} <= set(record)
    assert 0 < record["stdp_rel_update/layer0"] < 10 and 0 < record["meta_rel_update/layers.0"] < 1


@pytest.mark.distributed
def test_a_step_skipped_by_the_fp16_scaler_applies_no_plastic_update(driven):
    for rank in driven:
        assert rank["fp16_applied"] == [True, False, True]
        masters = rank["fp16_masters"]
        assert all(torch.equal(a, b) for a, b in zip(masters[1], masters[0])), "nothing applied on the skipped step"
        assert all(not torch.equal(a, b) for a, b in zip(masters[2], masters[1])), "the next applied step updates"
        assert rank["fp16_counts"] == (2, 1)
        for module, master in zip(rank["fp16_modules"][-1], masters[-1]):
            assert module.dtype == torch.float16 and torch.equal(module, master.half())
    assert all(torch.equal(a, b) for a, b in zip(driven[0]["fp16_modules"][-1], driven[1]["fp16_modules"][-1]))


@pytest.mark.distributed
def test_bf16_keeps_the_update_in_the_fp32_master(driven):
    for rank in driven:
        assert rank["bf16_counts"] == (2, 0)
        for module, master, w0 in zip(rank["bf16_modules"], rank["bf16_masters"], rank["bf16_w0"]):
            assert module.dtype == torch.bfloat16 and torch.equal(module, master.bfloat16())
            assert 0 < float((master - w0).norm() / w0.norm()) < 0.05


@pytest.mark.distributed
def test_meta_acts_elementwise_on_the_flat_zero_partitions(driven):
    """Strength 1e6: after the first step (reference = start) no matrix element moves further out on its side of
    the start value; norms and biases (exempt) do."""
    for rank in driven:
        history = rank["meta_history"]
        start = history[0]
        exempt_moved_out = 0.0
        for k in (2, 3):
            for name, w0 in start.items():
                before, after = history[k - 1][name] - w0, history[k][name] - w0
                if w0.ndim >= 2:
                    same_side = (before.abs() > 1e-4) & (torch.sign(before) == torch.sign(after))
                    assert same_side.any()
                    assert float((after.abs() - before.abs())[same_side].max()) <= 1e-6, name
                else:
                    exempt_moved_out = max(exempt_moved_out, float((after.abs() - before.abs()).max()))
        assert exempt_moved_out > 1e-3
    for name, value in driven[0]["meta_history"][-1].items():
        assert torch.equal(value, driven[1]["meta_history"][-1][name])
    assert driven[0]["meta_record"]["meta_rel_update/layers.0"] > 0.1  # much of the Adam update held back


@pytest.mark.distributed
def test_trainer_logs_plasticity_and_retakes_the_reference_at_each_task(tiny_data, tmp_path):
    """Through launch/train.py: fp16 with an overflow at step 2, a 2-task continual schedule, both mechanisms."""
    run = tmp_path / "run"
    train(tiny_data, run, "--train.max_steps", "4", "--continual.num_tasks", "2", "--continual.eval_batches", "1",
          "--train.eval_batches", "1", "--train.eval_interval", "100", "--train.allow_cpu_fp16", "true",
          "--stability.drill_inf_grad_steps", "[2]", "--plasticity.stdp", "homeostatic", "--plasticity.meta", "true",
          ds_config="ds_configs/fp16_stable.json")
    records = train_records(run)
    assert sorted(records) == [1, 2, 3, 4]
    assert "stdp_rel_update/layer0" in records[1] and "stdp_rel_update/layer1" in records[3]
    assert "stdp_rel_update/layer0" not in records[2], "the skipped step applied no STDP"
    assert records[2]["stdp_skipped_steps"] == 1 and records[4]["stdp_applied_steps"] == 3
    assert "meta_rel_update/layers.0" in records[1] and "meta_drift/layers.0" in records[4]
    assert records[1]["meta_task_starts"] == 1 and records[4]["meta_task_starts"] == 2
    assert json.loads((run / "ds_config.json").read_text())["zero_allow_untested_optimizer"] is True
    assert "retaken at the start of task 'part2'" in (run / "training.log").read_text()
