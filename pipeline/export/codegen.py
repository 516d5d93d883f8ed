"""Writes the self-contained Hugging Face code of an export out of the pipeline's own sources.

`modeling_<stem>.py` is the model's modules (`pipeline/model/*.py`) and `ModelConfig` (`pipeline/config.py`)
concatenated, their imports gathered at the top, followed by the `transformers` wrapper
(`pipeline/export/hf_wrapper.py`); `configuration_<stem>.py` is `hf_config.py` with ModelConfig's fields and
defaults filled in. Generated at every export, the files cannot drift from the code that trained the weights;
`tests/test_export.py` checks that every module's code is there verbatim and nothing imports `pipeline`.

A new architecture (`model.arch`) is one more `Arch` row in `ARCHS`: the modules that define it, in
dependency order, and its class.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent  # pipeline/
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Arch:
    model_type: str
    """`model_type` of config.json (the key transformers registers the classes under)."""
    prefix: str
    """Class-name prefix: `<prefix>Config`, `<prefix>ForCausalLM`."""
    stem: str
    """File stem: `modeling_<stem>.py`, `configuration_<stem>.py`."""
    modules: Tuple[str, ...]
    """`pipeline/model/<name>.py` files copied into the modeling file, each after the ones it imports."""
    core_class: str
    """The `nn.Module` built from `ModelConfig`, with `forward(ids, state, return_state)` and `init_state`."""
    no_split_modules: Tuple[str, ...] = ()
    """Blocks `device_map="auto"` must keep on one device."""


ARCHS: Dict[str, Arch] = {
    "hybrid": Arch(model_type="hybrid_lm", prefix="HybridLM", stem="hybrid_lm",
                   modules=("scan", "spiking", "liquid", "attention", "fusion", "mamba", "hybrid"),
                   core_class="HybridLM", no_split_modules=("HybridBlock", "AttentionLayer")),
}

# Replaces `pipeline/model/kernels/__init__.py`: the fused C++ CPU kernels are compiled from .cpp files next to
# that module, which an export does not carry. `None` is what the loaders return where a kernel cannot be
# built, so every caller takes its tensor-op path: the same math (tests/test_export.py bounds the difference).
KERNELS_STUB = '''
def lif_sweep(*args, **kwargs):
    return None


def selective_scan_cpu():
    return None


def diag_scan_cpu():
    return None


def rms_norm_cpu():
    return None
'''

# The Triton kernels (CUDA) live in modules of their own that an export does not carry either.
TRITON_OFF = '''
def use_triton(x) -> bool:  # noqa: F811  (replaces scan.py's: the Triton kernel modules are not exported)
    return False
'''

_RELATIVE_IMPORT = re.compile(r"^(\s+)from \.[\w.]* import .*$", re.MULTILINE)


def arch_of(model_config: dict) -> Arch:
    name = model_config.get("arch", "hybrid")
    if name not in ARCHS:
        raise ValueError(f"model.arch={name!r} has no export (pipeline/export/codegen.py ARCHS knows "
                         f"{', '.join(sorted(ARCHS))})")
    return ARCHS[name]


def _split_imports(source: str, where: str) -> Tuple[List[str], str]:
    """(top-level import statements, the source without them and without `from __future__`)."""
    tree = ast.parse(source, filename=where)
    lines = source.splitlines(keepends=True)
    imports, drop = [], set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno - 1, node.end_lineno))
            text = ast.get_source_segment(source, node)
            local = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("pipeline"))
            if not local and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append(text)
    body = "".join(line for i, line in enumerate(lines) if i not in drop)
    # Imports inside functions load the Triton kernel modules, which use_triton() = False never reaches.
    body = _RELATIVE_IMPORT.sub(lambda m: f"{m.group(1)}raise RuntimeError('not part of an exported model')", body)
    return imports, body


def _config_source() -> Tuple[List[str], str]:
    """ModelConfig and the two helpers its validation uses, from pipeline/config.py."""
    path = ROOT / "config.py"
    source = path.read_text()
    imports, _ = _split_imports(source, str(path))
    tree = ast.parse(source)
    wanted = ("ConfigError", "_require", "ModelConfig")
    lines = source.splitlines(keepends=True)
    segments = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in wanted:
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1  # with @dataclass
            segments.append("".join(lines[start:node.end_lineno]))
    if len(segments) != len(wanted):
        raise RuntimeError(f"{path} no longer defines {', '.join(wanted)}: update pipeline/export/codegen.py")
    return imports, "\n\n".join(segments) + "\n"


def model_sources(arch: Arch) -> Dict[str, str]:
    """The bodies copied into the modeling file: {pipeline-relative path: code without imports}."""
    out = {}
    for name in arch.modules:
        path = ROOT / "model" / f"{name}.py"
        out[f"pipeline/model/{name}.py"] = _split_imports(path.read_text(), str(path))[1]
    return out


def _section(title: str, body: str) -> str:
    return f"\n\n# {'-' * 100}\n# {title}\n# {'-' * 100}\n{body.strip()}\n"


def modeling_source(arch: Arch) -> str:
    imports: List[str] = []
    sections = []
    config_imports, config_body = _config_source()
    imports += config_imports
    sections.append(_section("pipeline/config.py: ModelConfig", config_body))
    sections.append(_section("pipeline/model/kernels: not exported (tensor-op paths)", KERNELS_STUB))
    for name in arch.modules:
        path = ROOT / "model" / f"{name}.py"
        module_imports, body = _split_imports(path.read_text(), str(path))
        imports += module_imports
        sections.append(_section(f"pipeline/model/{name}.py", body))
    sections.append(_section("Triton kernels: not exported", TRITON_OFF))
    wrapper_imports, wrapper = _split_imports((HERE / "hf_wrapper.py").read_text(), "hf_wrapper.py")
    imports += wrapper_imports
    wrapper = wrapper.replace("CoreModel", arch.core_class).replace("Exported", arch.prefix)
    wrapper = wrapper.replace("NO_SPLIT_MODULES", repr(list(arch.no_split_modules)))
    sections.append(_section("transformers wrapper (pipeline/export/hf_wrapper.py)", wrapper))
    seen, unique = set(), []
    for line in imports:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    unique.append(f"from .configuration_{arch.stem} import {arch.prefix}Config")
    header = (f'"""{arch.prefix} for transformers: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.\n\n'
              "Generated by `python -m pipeline.export` from the training pipeline's own model code (the sections\n"
              "below name their source files); do not edit, re-export instead.\n"
              '"""\n')
    return header + "from __future__ import annotations\n\n" + "\n".join(unique) + "\n" + "".join(sections)


def configuration_source(arch: Arch) -> str:
    from pipeline.config import ModelConfig

    defaults = {}
    for f in dataclasses.fields(ModelConfig):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        defaults[f.name] = value
    body = (HERE / "hf_config.py").read_text()
    body = body.replace("MODEL_TYPE", repr(arch.model_type)).replace("Exported", arch.prefix)
    fields = "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in defaults.items()) + "}"
    return body.replace("MODEL_FIELDS_DEFAULTS", fields)
