"""pipeline/engine/ds_adapter.py: each accessor against the installed (pinned) DeepSpeed, the version check, and
a static test that no other module of pipeline/, launch/ or bench/ touches DeepSpeed's private state."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.engine import ds_adapter

ROOT = Path(__file__).resolve().parent.parent

# What is private of DeepSpeed, as this code base has used it: attribute names, and names of its files.
PRIVATE_ATTRIBUTES = {
    "_config", "_hp_mapping", "hp_fragment_address", "loss_scaler", "cur_scale", "cur_hysteresis", "min_scale",
    "delayed_shift", "raise_error_at_min_scale", "scale_window", "consecutive_hysteresis", "last_overflow_iter",
    "cur_iter", "is_fp16_supported", "load_universal_checkpoint",
}
WRITE_ONLY = {"is_fp16_supported"}
PRIVATE_NAMES = {"safe_set_full_fp32_param", "safe_get_full_fp32_param", "ds_to_universal"}
PRIVATE_TEXT = re.compile(r"deepspeed_allreduce_buffer|optimizer\.optimizer\b")


def _violations(path: Path) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in WRITE_ONLY and not isinstance(node.ctx, ast.Store):
            continue  # reading the accelerator's own answer is its public API; replacing it is not
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in PRIVATE_NAMES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {node.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PRIVATE_ATTRIBUTES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: getattr/hasattr {node.value!r}")
    found += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group()}"
              for m in PRIVATE_TEXT.finditer(text) if not _in_comment(text, m.start())]
    return found


def _in_comment(text: str, at: int) -> bool:
    line = text[text.rfind("\n", 0, at) + 1:at]
    return "#" in line or line.lstrip().startswith(('"', "'", "`"))


def test_no_module_but_the_adapter_touches_deepspeed_internals():
    adapter = ROOT / "pipeline/engine/ds_adapter.py"
    files = [p for folder in ("pipeline", "launch", "bench") for p in (ROOT / folder).rglob("*.py") if p != adapter]
    assert len(files) > 20
    violations = [v for p in files for v in _violations(p)]
    assert not violations, "DeepSpeed internals outside pipeline/engine/ds_adapter.py:\n" + "\n".join(violations)


def test_the_static_check_catches_each_kind(tmp_path):
    bad = ROOT / "bench" / f"_probe_{os.getpid()}.py"
    bad.write_text("from deepspeed.utils import safe_set_full_fp32_param\n"
                   "x = engine._config\ny = getattr(engine.optimizer, 'loss_scaler', None)\n"
                   "z = engine.optimizer.optimizer\n")
    try:
        assert len(_violations(bad)) == 4
    finally:
        bad.unlink()


def test_version_check_names_the_tested_version():
    import deepspeed

    assert deepspeed.__version__ in ds_adapter.TESTED_VERSIONS, "requirements.txt pins a version the adapter knows"
    assert f"deepspeed=={ds_adapter.TESTED_VERSIONS[0]}" in (ROOT / "requirements.txt").read_text()
    ds_adapter.check_version()
    with pytest.raises(ConfigError, match=r"DeepSpeed 0\.1\.0 is installed.*tested only with 0\.19\.8"):
        ds_adapter.check_version("0.1.0")


# ---- the accessors against the real classes of the pinned version ---------------------------------------
def test_loss_scaler_accessors_on_deepspeeds_dynamic_scaler():
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=2.0 ** 8, scale_window=4, min_scale=2.0, delayed_shift=2,
                               consecutive_hysteresis=False)
    engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler))
    view = ds_adapter.LossScaler.of(engine)
    assert (view.scale, view.hysteresis, view.minimum) == (256.0, 2, 2.0)
    assert ds_adapter.current_loss_scale(engine) == 256.0
    assert not view.at_minimum(256.0, 2) and view.at_minimum(2.0, 1) and not view.at_minimum(2.0, 2)
    view.raise_at_min_scale(False)
    assert scaler.raise_error_at_min_scale is False
    scaler.cur_hysteresis = 1  # as DeepSpeed's update_scale leaves it after an overflow (it needs a process group)
    assert view.at_minimum(2.0, view.hysteresis)
    view.reset({"initial_scale_power": 4, "hysteresis": 3, "loss_scale_window": 9, "min_loss_scale": 1})
    assert (view.scale, view.hysteresis, scaler.scale_window, view.minimum) == (16.0, 3, 9, 1)
    assert scaler.last_overflow_iter == scaler.cur_iter - 1
    assert ds_adapter.LossScaler.of(SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1)], lr=1))) is None
    assert ds_adapter.current_loss_scale(SimpleNamespace(optimizer=None)) == 1.0


def test_fp32_master_accessors_without_zero():
    p = torch.nn.Parameter(torch.arange(4.0).to(torch.bfloat16))
    assert not ds_adapter.has_fp32_master(p) and ds_adapter.fragment_address(p) is None
    full = ds_adapter.get_full_fp32(p)
    assert full.dtype == torch.float32 and torch.equal(full, torch.arange(4.0))
    ds_adapter.set_full_fp32(p, torch.full((4,), 2.0))
    assert torch.equal(p.detach().float(), torch.full((4,), 2.0))
    from types import SimpleNamespace

    inner = torch.optim.SGD([p], lr=1)
    assert ds_adapter.inner_optimizer(SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner))) is inner
    assert ds_adapter.inner_optimizer(SimpleNamespace(optimizer=inner)) is inner


def test_zero_fragment_mapping_and_universal_switch_exist_in_the_pinned_version():
    """Under ZeRO these come from DeepSpeed objects that need an engine (test_plasticity.py drives them on 2
    ranks); here: the names the adapter uses exist where it looks for them."""
    import inspect

    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param  # noqa: F401
    from deepspeed.utils.tensor_fragment import tensor_fragment

    assert {"input_folder", "output_folder", "num_extract_workers", "num_merge_workers", "keep_temp_folder",
            "strict", "inject_missing_state"} <= set(re.findall(r"args\.(\w+)", inspect.getsource(ds_to_universal)))
    assert "load_universal_checkpoint" in inspect.getsource(DeepSpeedConfig)
    assert "hp_fragment_address" in inspect.getsource(tensor_fragment)


def test_fp16_switch_and_shm_name(monkeypatch):
    from types import SimpleNamespace

    accelerator = SimpleNamespace(is_fp16_supported=lambda: False)
    ds_adapter.allow_fp16_on_cpu(accelerator)
    assert accelerator.is_fp16_supported()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29123")
    path = ds_adapter.shm_buffer_path(1)
    assert path == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29123_1"
    import deepspeed

    shm_source = Path(deepspeed.__file__).parent / "ops/csrc/cpu/comm/shm.cpp"
    assert "deepspeed_allreduce_buffer" in shm_source.read_text(), "DeepSpeed's own name for the buffer"
