"""Taking a trained model anywhere: the Hugging Face export (transformers, lm-evaluation-harness) and W&B logging.

One real 2-rank training run (with `--train.wandb` offline, stopped and resumed) is exported; transformers must
give the pipeline model's logits, loss and greedy generations, and lm-eval's numbers on the local tasks in
tests/lm_eval_tasks must be the pipeline's own log-likelihoods.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dsrun import ROOT, tiny_data, train  # noqa: E402,F401  (tiny_data is a fixture)
from pipeline.config import ModelConfig  # noqa: E402
from pipeline.engine.evaluation import lm_loss  # noqa: E402
from pipeline.export.codegen import ARCHS, model_sources, modeling_source  # noqa: E402
from pipeline.export.hf import write_folder  # noqa: E402
from pipeline.metrics import read_metrics  # noqa: E402
from pipeline.model import HybridLM  # noqa: E402

OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)


def load_generate():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "launch/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_hf(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs).eval()


# ---- the generated code ------------------------------------------------------------------------------------

def test_modeling_file_is_the_pipelines_model_code_and_imports_no_pipeline():
    arch = ARCHS["hybrid"]
    source = modeling_source(arch)
    for path, body in model_sources(arch).items():
        assert body.strip() in source, f"{path} is not in the generated modeling file verbatim"
    assert "class ModelConfig:" in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("pipeline"), ast.unparse(node)
            assert node.level == 0 or node.module == f"configuration_{arch.stem}", ast.unparse(node)


CASES = {
    "bidirectional-gate-attention": dict(integration_mode="bidirectional", use_cross_attention=True,
                                         use_adaptive_gating=True, spike_to_mamba_method="temporal",
                                         attention_every=2),
    "cfc-positions-untied": dict(liquid_backbone="cfc", max_position_embeddings=64, tie_embeddings=False),
    "no-mamba": dict(use_mamba=False, attention_every=1),
}


@pytest.fixture(scope="module")
def tokenizer_model(data_tokenizer) -> Path:
    return data_tokenizer  # conftest's 300-piece sentencepiece model


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_model_matches_the_pipeline_model(name, tokenizer_model, tmp_path):
    cfg = ModelConfig(vocab_size=300, hidden_dim=16, num_layers=2, liquid_units=8, spiking_units=8,
                      num_attention_heads=2, mamba_d_state=4, num_gate_heads=2, cross_attn_heads=2, beta=0.8,
                      spike_temporal_tau=4.0, **CASES[name])
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # large random weights: greedy decoding that wanders instead of repeating one token
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    write_folder(model, {"model": asdict(cfg)}, tokenizer_model, tmp_path)
    hf = load_hf(tmp_path)
    assert "mamba_ssm" not in sys.modules  # the CPU path never needs it
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        out = hf(ids, labels=ids)
    # The pipeline model runs the fused C++ CPU kernels, the export the tensor ops they replace; weights this
    # large make logits of size ~5, so the bound scales with them (the trained run below is held to 1e-5).
    assert (out.logits - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert out.loss.item() == pytest.approx(lm_loss(expected[:, :-1], ids[:, 1:]).item(), abs=1e-5)
    prompt = ids[0, :7].tolist()
    reference = load_generate().generate(model, prompt, 24, temperature=0.0)
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert generated[0, len(prompt):].tolist() == reference
    if name != "no-mamba":  # a sequence that wanders through the state, not one repeated token
        assert len(set(reference)) > 3
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 47, [1] * 50]))


def test_bf16_export_stores_bf16_weights(tokenizer_model, tmp_path):
    from safetensors import safe_open

    cfg = ModelConfig(vocab_size=300, hidden_dim=16, num_layers=1, liquid_units=8, spiking_units=8, mamba_d_state=4)
    model = HybridLM(cfg).eval()
    write_folder(model, {"model": asdict(cfg)}, tokenizer_model, tmp_path, dtype="bf16")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "model.lm_head.weight" not in f.keys()  # tied: transformers re-ties it on load
    hf = load_hf(tmp_path)
    assert hf.dtype == torch.bfloat16
    assert hf.model.lm_head.weight.data_ptr() == hf.model.embed.weight.data_ptr()


# ---- a real run: W&B offline, stopped and resumed, then exported ---------------------------------------------

@pytest.fixture(scope="module")
def wandb_run(tiny_data, tmp_path_factory) -> Path:
    pytest.importorskip("wandb")
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    common = ["--train.max_steps", "12", "--train.eval_interval", "6", "--train.checkpoint_interval", "6",
              "--train.wandb", "pipeline-test", "--train.wandb_tags", "[tiny,ci]"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    os.environ.update(env)
    train(tiny_data, run_dir, *common, "--train.exit_after_steps", "6")
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    train(tiny_data, run_dir, *common, "--train.resume", "auto")
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    return run_dir


def read_wandb_file(path: Path) -> list:
    """The records of an offline `.wandb` file (a LevelDB-style log: 32 KiB blocks of length-prefixed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.distributed
def test_wandb_logs_the_metrics_records_config_plots_and_one_run_across_the_resume(wandb_run):
    run_id = (wandb_run / "wandb_run_id").read_text().strip()
    files = sorted(glob.glob(str(wandb_run / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2, "one offline file per invocation, both of the same W&B run"
    history, config = [], {}
    for f in files:
        for record in read_wandb_file(Path(f)):
            if record.HasField("history"):
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            if record.HasField("run"):
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            if record.HasField("config"):
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    logged = {(h["step"], k): v for h in history if "step" in h for k, v in h.items() if "/" in k}
    for r in read_metrics(wandb_run):
        for key, value in r.items():
            if key not in ("kind", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert logged[(r["step"], f"{r['kind']}/{key}")] == pytest.approx(value), (r["kind"], key)
    assert max(step for step, _ in logged) == 12
    assert any(k[1] == "eval/loss" for k in logged)
    train_config = config["train"]
    train_config = json.loads(train_config) if isinstance(train_config, str) else train_config
    assert train_config.get("value", train_config)["wandb"] == "pipeline-test"
    plots = [k for h in history for k, v in h.items() if k.startswith("report/") and k.endswith("/_type")
             and v == "image-file"]  # an image is logged as nested keys (report/<name>/_type, .../path, ...)
    assert plots, "the report's plots were not logged"


@pytest.fixture(scope="module")
def exported(wandb_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    result = subprocess.run([sys.executable, "-m", "pipeline.export", str(wandb_run), "--tag", "best", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **OFFLINE))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.distributed
def test_export_of_a_two_rank_zero2_run_loads_and_agrees(wandb_run, exported):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pipeline.engine.checkpoint import load_for_inference

    model, _, tokenizer = load_for_inference(str(wandb_run), "best")
    hf = load_hf(exported)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    ids = torch.tensor([sp.encode((ROOT / "pipeline/config.py").read_text())[:256]])
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"fp32 logits max abs difference: {diff:.3g}")
    assert diff <= 1e-5
    prompt = sp.encode("def main(")
    reference = load_generate().generate(model, prompt, 32, temperature=0.0, eos_id=sp.eos_id())
    assert hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist() == reference
    text = "class A:\n    def f(self, x):  # é 漢 </s>\n        return x"
    plain = AutoTokenizer.from_pretrained(str(exported))  # transformers' own class: no remote code to encode
    exact = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    assert plain.encode(text) == exact.encode(text) == sp.encode(text)
    assert exact.decode(sp.encode(text)) == text
    card = (exported / "README.md").read_text()
    final = [r for r in read_metrics(wandb_run, "eval")][-1]
    assert f"{hf.num_parameters():,}" in card and f"loss {final['loss']:.4f}" in card and f"{final['bpb']:.4f}" in card
    assert "step 12," in card and "2 data-parallel ranks" in card


def test_export_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.export", str(tmp_path), "--out", str(tmp_path / "x")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "holds no checkpoint" in result.stderr


# ---- lm-evaluation-harness on the export ------------------------------------------------------------------

def pipeline_loglikelihood(model, sp, context: str, continuation: str) -> float:
    """lm-eval's split of (context, continuation) into tokens (`_encode_pair`), scored by the pipeline model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = sp.encode(context + continuation), sp.encode(context)
    cont = whole[len(ctx):]  # where a piece merges across the boundary ("self." + "_name") ctx is no prefix of whole:
    with torch.no_grad():    # lm-eval scores ctx + cont, and so does this
        logp = torch.log_softmax(model(torch.tensor([(ctx + cont)[:-1]]))[0, -len(cont):].double(), dim=-1)
    return float(logp.gather(1, torch.tensor(cont).unsqueeze(1)).sum())


@pytest.mark.distributed
def test_lm_eval_runs_offline_and_agrees_with_the_pipeline(wandb_run, exported, tmp_path):
    pytest.importorskip("lm_eval")
    import sentencepiece as spm

    from pipeline.engine.checkpoint import load_for_inference

    out = tmp_path / "lm_eval"
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={exported},trust_remote_code=True,dtype=float32", "--tasks", "pipeline_code_mc,pipeline_code_gen",
           "--include_path", "tests/lm_eval_tasks", "--device", "cpu", "--batch_size", "1", "--log_samples",
           "--output_path", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **OFFLINE))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in ("pipeline_code_mc", "pipeline_code_gen")}

    model, _, tokenizer = load_for_inference(str(wandb_run), "best")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    correct = []
    for s in sorted(samples["pipeline_code_mc"], key=lambda s: s["doc_id"]):
        doc = s["doc"]
        ours = [pipeline_loglikelihood(model, sp, doc["context"], choice) for choice in doc["choices"]]
        theirs = [float(resp[0][0]) for resp in s["resps"]]  # [[loglikelihood, is_greedy]] per choice, as text
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == doc["answer"])
    acc = results["pipeline_code_mc"]["acc,none"]
    print(f"lm-eval pipeline_code_mc acc {acc:.4f}, pipeline {sum(correct) / len(correct):.4f}")
    assert acc == pytest.approx(sum(correct) / len(correct))

    gen = load_generate()
    matches = []
    for s in sorted(samples["pipeline_code_gen"], key=lambda s: s["doc_id"]):
        doc = s["doc"]
        ids = sp.encode(doc["context"])
        text = sp.decode(gen.generate(model, ids, 12, temperature=0.0, eos_id=sp.eos_id()))
        text = text.split("\n")[0]
        theirs = s["resps"][0][0]
        assert theirs == text, (doc, theirs, text)
        matches.append(text == doc["target"])
    em = results["pipeline_code_gen"]["exact_match,none"]
    print(f"lm-eval pipeline_code_gen exact_match {em:.4f}, pipeline {sum(matches) / len(matches):.4f}")
    assert em == pytest.approx(sum(matches) / len(matches))
