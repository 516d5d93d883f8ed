"""Export a trained run as a Hugging Face model folder (`python -m pipeline.export RUN_DIR --out DIR`)."""
from .hf import export_run

__all__ = ["export_run"]
