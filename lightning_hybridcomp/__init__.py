"""Hybrid compression for PyTorch Lightning: structured pruning, quantization-aware training, MoE routing."""

from lightning_hybridcomp.__about__ import __version__
from lightning_hybridcomp.callbacks import StructuredPruning, load_pruned_model
from lightning_hybridcomp.profiling import ModelProfile, profile_model

__all__ = ["ModelProfile", "StructuredPruning", "__version__", "load_pruned_model", "profile_model"]
