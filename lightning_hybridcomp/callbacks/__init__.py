"""Lightning callbacks that compress a LightningModule's network during ``fit``."""

from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining", "StructuredPruning", "load_pruned_model"]
