"""Lightning callbacks that compress a LightningModule's network during ``fit``."""

from lightning_hybridcomp.callbacks.distillation import KnowledgeDistillation, soft_target_loss
from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining

__all__ = [
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
    "StructuredPruning",
    "load_pruned_model",
    "soft_target_loss",
]
