"""The figures QuantizationAwareTraining reports for its int8 network: artifact bytes, MACs and params.

They are measured on the artifact the network would be saved as, so the logs and a saved file agree.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_hybridcomp.artifacts import ArtifactMetadata, build_artifact

__all__ = ["measure_artifact", "publish_to_loggers", "summary_metrics"]


def measure_artifact(
    network: nn.Module, example: Callable[[], Tensor], *, steps: tuple[str, ...], architecture: str
) -> ArtifactMetadata | None:
    """The metadata of ``network``'s artifact, built in memory; ``None``, with a warning, if it cannot be built.

    ``example`` gives the export's input; what it raises is reported like a failed export.
    """
    try:
        _, summary = build_artifact(network, example(), steps=steps, architecture=architecture)
    except Exception as err:  # a converted model that cannot be re-exported still evaluates
        rank_zero_warn(f"QuantizationAwareTraining: could not measure the int8 artifact ({err}).")
        return None
    return summary


def summary_metrics(summary: ArtifactMetadata) -> dict[str, float]:
    """The artifact's figures under their log keys."""
    return {
        "qat/size_bytes": float(summary.size_bytes),
        "qat/macs": float(summary.macs),
        "qat/params": float(summary.params),
    }


def publish_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put ``metrics`` in ``trainer.callback_metrics`` and in every logger.

    For the end of ``fit``, where Lightning no longer allows ``pl_module.log``.
    """
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
