"""Hybrid compression for PyTorch Lightning: structured pruning, quantization-aware training, MoE routing."""

from lightning_hybridcomp.__about__ import __version__
from lightning_hybridcomp._io import UnreadableCheckpointError
from lightning_hybridcomp.artifacts import (
    ArtifactMetadata,
    LoadedArtifact,
    compile_artifact,
    load_artifact,
    save_artifact,
)
from lightning_hybridcomp.callbacks import (
    KnowledgeDistillation,
    QuantizationAwareTraining,
    StructuredPruning,
    load_pruned_model,
)
from lightning_hybridcomp.moe import MoELightningModule, load_moe
from lightning_hybridcomp.profiling import ModelProfile, profile_model

__all__ = [
    "ArtifactMetadata",
    "KnowledgeDistillation",
    "LoadedArtifact",
    "MoELightningModule",
    "ModelProfile",
    "QuantizationAwareTraining",
    "StructuredPruning",
    "UnreadableCheckpointError",
    "__version__",
    "compile_artifact",
    "load_artifact",
    "load_moe",
    "load_pruned_model",
    "profile_model",
    "save_artifact",
]
