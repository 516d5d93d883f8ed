"""The hybrid liquid / spiking / Mamba language model and the baseline Transformer (plain PyTorch; knows nothing
of DeepSpeed). Every place that builds a model calls `build_model(model_config)`."""
from torch import nn

from pipeline.config import ModelConfig

from .hybrid import AttentionLayer, HybridBlock, HybridLM
from .transformer import TransformerLM


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg.arch` names, freshly initialised (seed torch first for identical weights on every rank)."""
    return TransformerLM(cfg) if cfg.arch == "transformer" else HybridLM(cfg)


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token (and position) embeddings and an untied output head: the count that
    compares architectures at another vocabulary size (Kaplan et al. 2020)."""
    embeddings = {id(p) for name, m in model.named_modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    embeddings.add(id(model.lm_head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


__all__ = ["HybridLM", "HybridBlock", "AttentionLayer", "TransformerLM", "build_model", "non_embedding_parameters"]
