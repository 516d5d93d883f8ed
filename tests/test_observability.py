"""What the run shows while it trains: the FLOP count behind MFU, the peak it is divided by, peak memory,
bits per byte, and the console's progress display (a bar on a terminal, the plain line elsewhere)."""
from __future__ import annotations

import io
import math
import os
import sys
import time

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsrun import ROOT
from pipeline.config import ModelConfig
from pipeline.flops import MFU, flops_breakdown, gpu_peak_flops, peak_flops
from pipeline.metrics import bits_per_byte, peak_memory_gb, setup_logging
from pipeline.model import HybridLM
from pipeline.progress import Progress


def preset(name: str, **changes) -> ModelConfig:
    model = yaml.safe_load((ROOT / "launch/presets" / f"{name}.yaml").read_text())["model"]
    return ModelConfig(**{**model, **changes})


@pytest.mark.parametrize("cfg", [
    preset("tiny"),                                                    # every feature on
    preset("small"),                                                   # sequential Mamba, attention layer
    preset("tiny", integration_mode="parallel", spike_to_mamba_method="rate", use_adaptive_gating=False,
           num_spike_steps=1, liquid_backbone="cfc"),
    ModelConfig(vocab_size=300, hidden_dim=48, use_mamba=False, attention_every=1, tie_embeddings=False),
], ids=["tiny", "small", "tiny-parallel-cfc", "no-mamba"])
def test_flop_count_agrees_with_torch_flop_counter(cfg, one_thread):
    """FlopCounterMode sees matmuls, convolutions and attention, not elementwise work. So it is compared
    with our matmul and attention terms plus the one part of the scans that runs as a matmul: the
    selective scan's contraction with C (2 E N per token), which the blocked scan also runs on its
    padding positions (T=32: 6 chunks of 6, so 36/32 of it). The math SDPA backend is forced because
    the CPU flash kernel is missing from FlopCounterMode's table."""
    B, T = 2, 32
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    counted = counter.get_total_flops() / (B * T)
    ours = flops_breakdown(cfg, T)
    contraction = 2 * cfg.mamba_expand * cfg.hidden_dim * cfg.mamba_d_state * cfg.num_layers if cfg.use_mamba else 0
    expected = ours["matmul"] + ours["attention"] + contraction
    assert counted == pytest.approx(expected, rel=0.02)
    assert ours["scan"] > 0


def test_mfu_of_a_short_cpu_training_lies_in_the_unit_interval(one_thread):
    cfg = preset("tiny")
    B, T = 8, 64
    model = HybridLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mfu = MFU(cfg, T, "cpu")
    assert mfu.source.startswith("measured") and "measured" in mfu.describe()
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    start = time.perf_counter()
    for _ in range(3):
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    tokens_per_s = 3 * B * T / (time.perf_counter() - start)
    assert 0.0 < mfu(tokens_per_s) <= 1.0


def test_peak_comes_from_config_then_datasheet():
    assert peak_flops("cpu", configured=123e12) == (123e12, "configured")
    assert gpu_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("NVIDIA L40S", torch.bfloat16) == 362e12, "not the L4's"
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) in (19.5e12, 156e12)
    assert gpu_peak_flops("Imaginary GPU 9000", torch.bfloat16) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from /proc")
def test_peak_memory_on_cpu_is_the_process_peak_resident_set():
    rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert rss_kib / 2**20 <= peak_memory_gb("cpu") <= total_gib


def test_bits_per_byte():
    # 2 bits per token (2 ln 2 nats), 100 tokens for 200 bytes: 1 bit per byte
    assert bits_per_byte(2 * math.log(2), stream_tokens=100, text_bytes=200) == pytest.approx(1.0)


RECORD = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.6, "loss_scale": 1024.0, "task": "B"}
LINE = "step 3: loss 2.5000  lr 1.00e-03  grad_norm 0.500  1235 tok/s  scale 1024"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def rank0_log(monkeypatch, tmp_path):
    """make(stream): the trainer's rank-0 logger with its console on `stream`. Called in the test body:
    pytest's output capture sets sys.stdout anew between a fixture's setup and the test's call."""
    made = []

    def make(stream):
        monkeypatch.setattr(sys, "stdout", stream)
        made.append(setup_logging(tmp_path, rank=0))
        return made[-1]

    yield make
    for log in made:
        for handler in log.handlers:
            handler.close()
        log.handlers.clear()


def test_progress_prints_the_plain_line_when_not_a_terminal(rank0_log, tmp_path):
    stream = io.StringIO()
    with Progress(rank0_log(stream), total_steps=10) as progress:
        progress.update(3, RECORD)
    assert stream.getvalue().rstrip().endswith(LINE)
    assert "%|" not in stream.getvalue()
    assert (tmp_path / "training.log").read_text().rstrip().endswith(LINE)


def test_progress_draws_a_bar_on_a_terminal(rank0_log, tmp_path):
    stream = FakeTerminal()
    log = rank0_log(stream)
    progress = Progress(log, total_steps=10)
    progress.update(3, RECORD)
    log.info("eval step 3: loss 2.4000")
    progress.update(6, RECORD)
    progress.close()
    shown = stream.getvalue()
    assert "6/10" in shown and "loss 2.5000" in shown and "1,235 tok/s" in shown and "task B" in shown
    assert "INFO step 3:" not in shown, "the bar replaces the plain line on the console"
    assert "INFO eval step 3: loss 2.4000" in shown, "other log lines still reach the console"
    assert LINE in (tmp_path / "training.log").read_text(), "training.log keeps the plain line"
    log.info(LINE)  # after close(), the console is the logger's own handler again
    assert stream.getvalue().rstrip().endswith(LINE)


def test_progress_shows_nothing_on_other_ranks(rank0_log, tmp_path):
    stream = FakeTerminal()
    with Progress(rank0_log(stream), total_steps=10, enabled=False) as progress:
        progress.update(3, RECORD)
    assert stream.getvalue() == "" and not (tmp_path / "training.log").read_text()
