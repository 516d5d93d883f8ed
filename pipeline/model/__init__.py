"""The hybrid liquid / spiking / Mamba language model (plain PyTorch; knows nothing of DeepSpeed)."""
from .hybrid import AttentionLayer, HybridBlock, HybridLM

__all__ = ["HybridLM", "HybridBlock", "AttentionLayer"]
