"""Hybrid liquid/spiking/Mamba LM training pipeline."""
