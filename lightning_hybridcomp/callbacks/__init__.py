"""Lightning callbacks that compress a LightningModule's network during ``fit``."""

from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model

__all__ = ["StructuredPruning", "load_pruned_model"]
