"""The contract between a callback that changes the network's structure and QuantizationAwareTraining.

QAT must start after the last structural change, rebuild that structure before a checkpoint's weights load,
record it in artifacts, and try its own preparation on the structure it will receive; this protocol says
what it reads for that, so that neither callback module imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import nn

__all__ = ["StructuralCompression"]


@runtime_checkable
class StructuralCompression(Protocol):
    """A callback that removes parts of the network during ``fit`` (``StructuredPruning`` implements it).

    Attributes:
        network: fully qualified name of the submodule it changes (``""`` for the LightningModule).
    """

    network: str

    @property
    def finished(self) -> bool:
        """Whether every structural change is done."""
        ...

    @property
    def last_step_epoch(self) -> int | None:
        """The epoch of the last change (known after ``setup``)."""
        ...

    @property
    def step_label(self) -> str:
        """How artifacts record the change, e.g. ``"prune:l2:0.5"``."""
        ...

    def restore_structure_(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any] | None = None
    ) -> None:
        """Give ``pl_module`` the structure recorded in ``checkpoint`` before its weights load."""
        ...

    def preview_network(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
        """A copy of the network as the whole schedule will leave it (``None`` once changes started)."""
        ...
