"""A trained run as a Hugging Face model folder: consolidated weights, generated modeling code, tokenizer, card.

    python -m pipeline.export outputs/demo --out exports/demo                 # latest checkpoint, fp32
    python -m pipeline.export outputs/demo --tag best --out exports/demo --dtype bf16

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)`, and runs under lm-evaluation-harness (docs/EXPORT.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.engine.checkpoint import checkpoint_folder, load_for_inference, saved_run_config, saved_world_size
from pipeline.metrics import read_metrics

from .codegen import HERE, arch_of, configuration_source, modeling_source

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"


def _load_module(path: Path, name: str):
    """A generated file imported as the package transformers would put it in (for its relative import)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _special_ids(tokenizer_path: Path) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return {name: (i, sp.id_to_piece(i)) for name, i in ids.items() if i >= 0}


def _write_tokenizer(out: Path, tokenizer_path: Path, arch, special: dict) -> None:
    shutil.copyfile(tokenizer_path, out / TOKENIZER)
    stem = f"tokenization_{arch.stem}"
    (out / f"{stem}.py").write_text((HERE / "tokenization.py").read_text().replace("Exported", arch.prefix))
    config = {
        "tokenizer_class": "SentencePieceBackend",  # transformers' own: no remote code needed to encode
        "auto_map": {"AutoTokenizer": [f"{stem}.{arch.prefix}Tokenizer", None]},
        "vocab_file": TOKENIZER,
        "legacy": True,  # sentencepiece.encode as is: data_prep's model has no dummy prefix to work around
        "add_bos_token": False,  # the training stream has no BOS: documents are separated by EOS only
        "add_eos_token": False,
        "split_special_tokens": True,  # the text "</s>" is text, as sentencepiece.encode treats it
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit"
    }
    config.update({f"{name}_token": piece for name, (_, piece) in special.items()})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _state_dict(model, dtype: torch.dtype, tied: bool) -> dict:
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":  # the same tensor as embed.weight; transformers re-ties it on load
            continue
        state[f"model.{name}"] = tensor.detach().to(dtype).contiguous()
    return state


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def model_card(run_dir: Path, folder: Path, run_config: dict, n_params: int, dtype: str) -> str:
    """README.md of the export: architecture, size, data, training length and the validation result."""
    model, data, train = run_config["model"], run_config.get("data", {}), run_config.get("train", {})
    state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    step = int(state.get("global_steps", 0))
    ds_config = json.loads((run_dir / "ds_config.json").read_text()) if (run_dir / "ds_config.json").is_file() else {}
    world = saved_world_size(folder) or 1
    samples = state.get("global_samples") or step * ds_config.get("train_batch_size", 0)
    tokens = samples * data.get("sequence_length", 0)
    evals = [r for r in read_metrics(run_dir, "eval") if r["step"] <= step]
    final = evals[-1] if evals else {}
    lines = [f"# {run_dir.name}", "",
             "A hybrid liquid / spiking / Mamba language model trained with this repository's DeepSpeed ZeRO-2 "
             "pipeline and exported by `python -m pipeline.export`.", "",
             "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(\"PATH\", trust_remote_code=True)",
             "tokenizer = AutoTokenizer.from_pretrained(\"PATH\", trust_remote_code=True)",
             "ids = tokenizer(\"def main(\", return_tensors=\"pt\").input_ids",
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))",
             "```", "",
             "## Model", "",
             f"- parameters: {n_params:,} ({n_params / 1e6:.2f}M), weights stored in {dtype}",
             f"- {model['num_layers']} hybrid blocks of width {model['hidden_dim']}: LIF spiking units "
             f"({model['spiking_units']}), liquid units ({model['liquid_units']}, `{model['liquid_backbone']}`)"
             + (f", Mamba (d_state {model['mamba_d_state']}, expand {model['mamba_expand']}, "
                f"`{model['integration_mode']}` integration)" if model["use_mamba"] else "")
             + (", liquid/Mamba cross-attention" if model.get("use_cross_attention") else "")
             + (", adaptive gating" if model.get("use_adaptive_gating") else ""),
             f"- causal self-attention layers: "
             + (f"after every {model['attention_every']} blocks ({model['num_attention_heads']} heads)"
                if model.get("attention_every") else "none"),
             f"- vocabulary: {model['vocab_size']} (sentencepiece, `tokenizer.model`)",
             "- generation carries the recurrent state (O(1) per token for the liquid, spiking and Mamba layers; "
             "KV caches for attention)",
             "- every field of the training config's `model` section is in `config.json` "
             "(`max_position_embeddings` as `learned_position_embeddings`)", "",
             "## Training", "",
             f"- checkpoint `{folder.name}`: step {step:,}, {tokens:,} training tokens "
             f"(sequence length {data.get('sequence_length', 'n/a')}, {world} data-parallel ranks)",
             f"- peak learning rate {train.get('lr', 'n/a')}, warmup {train.get('warmup_steps', 'n/a')} steps, "
             f"weight decay {train.get('weight_decay', 'n/a')}, seed {train.get('seed', 'n/a')}",
             f"- validation (step {final.get('step', 'n/a')}): loss {_fmt(final.get('loss'))} nats/token, "
             f"perplexity {_fmt(final.get('perplexity'), '.2f')}, bits per byte {_fmt(final.get('bpb'))}", ""]
    lines += ["## Training data", ""] + _data_summary(data.get("data_dir")) + [""]
    lines += ["## Files", "",
              "`model.safetensors` (weights), `config.json` + `configuration_*.py` + `modeling_*.py` (generated from "
              "the pipeline's model code), `tokenizer.model` + `tokenizer_config.json` (+ `tokenization_*.py`, an "
              "exact sentencepiece decode), `generation_config.json`, `training_config.json` (the run's whole "
              "config).", ""]
    return "\n".join(lines)


def _data_summary(data_dir: Optional[str]) -> list:
    from pipeline.data.manifest import DataError, load_manifest

    if not data_dir:
        return ["- (no data folder in the run config)"]
    try:
        manifest = load_manifest(data_dir)
    except (DataError, OSError) as err:
        return [f"- `{data_dir}` (its manifest is not readable here: {err})"]
    lines = [f"- `{data_dir}`"]
    for name in ("train", "validation"):
        try:
            split = manifest.split(name)
        except (KeyError, DataError):
            continue
        text_bytes = split.extra.get("text_bytes")
        lines.append(f"- {name}: {split.documents:,} documents, {split.tokens:,} tokens"
                     + (f", {text_bytes:,} bytes of text" if text_bytes else ""))
    for source in manifest.extra.get("sources") or []:
        lines.append(f"- source `{source.get('name', '?')}`: " + ", ".join(
            f"{source[k]:,} {k}" for k in ("files", "documents", "bytes") if isinstance(source.get(k), int)))
    tokenizer = manifest.tokenizer
    lines.append(f"- tokenizer: sentencepiece, {tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:16]}...")
    return lines


def write_folder(model, run_config: dict, tokenizer_path: Path, out: Path, dtype: str = "fp32") -> Path:
    """The Hugging Face files of `model` (a pipeline model built from `run_config["model"]`), without the card."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    arch = arch_of(run_config["model"])
    special = _special_ids(tokenizer_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"configuration_{arch.stem}.py").write_text(configuration_source(arch))
    (out / f"modeling_{arch.stem}.py").write_text(modeling_source(arch))
    config_module = _load_module(out / f"configuration_{arch.stem}.py", f"configuration_{arch.stem}")
    fields = dict(run_config["model"])
    fields["mamba_backend"] = "auto"  # a model trained with `cuda` must still load where mamba_ssm is absent
    ids = {f"{name}_token_id": i for name, (i, _) in special.items() if name in ("bos", "eos", "pad")}
    config = getattr(config_module, f"{arch.prefix}Config").from_model_fields(fields, **ids, dtype=str(DTYPES[dtype]).removeprefix("torch."))
    config.architectures = [f"{arch.prefix}ForCausalLM"]
    config.auto_map = {"AutoConfig": f"configuration_{arch.stem}.{arch.prefix}Config",
                       "AutoModelForCausalLM": f"modeling_{arch.stem}.{arch.prefix}ForCausalLM"}
    config.save_pretrained(out)
    save_file(_state_dict(model, DTYPES[dtype], run_config["model"].get("tie_embeddings", True)), str(out / WEIGHTS),
              metadata={"format": "pt"})
    _write_tokenizer(out, tokenizer_path, arch, special)
    GenerationConfig(**ids).save_pretrained(out)
    (out / "training_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    return out


def export_run(run_dir: str | Path, out: str | Path, tag: Optional[str] = None, dtype: str = "fp32") -> Path:
    """Writes the Hugging Face folder `out` from `run_dir`'s checkpoint `tag` (consolidated from the ZeRO
    partitions of any number of ranks); returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    folder = checkpoint_folder(run_dir, tag)
    run_config = saved_run_config(folder)
    arch_of(run_config["model"])  # an unknown architecture fails before the weights are read
    model, _, tokenizer_path = load_for_inference(str(run_dir), folder.name)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} is missing: launch/train.py copies the tokenizer into the run folder")
    write_folder(model, run_config, tokenizer_path, out, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(model_card(run_dir, folder, run_config, n_params, dtype))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.export",
                                description="Export a trained run as a Hugging Face model folder.")
    p.add_argument("run_dir", help="the run folder (train.out_dir) holding checkpoints/")
    p.add_argument("--out", required=True, help="the folder to write (created; files in it are replaced)")
    p.add_argument("--tag", default="latest", help="best, latest (default), stepN or a folder name under checkpoints/")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the stored weights")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.tag, args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} ({args.tag}) to {out}")
    return 0
