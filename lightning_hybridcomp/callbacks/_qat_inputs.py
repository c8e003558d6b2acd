"""Which example input QuantizationAwareTraining traces, rebuilds and exports its network with.

The package's one precedence rule (:func:`~lightning_hybridcomp._lightning.example_inputs`): the
``example_input_shape`` argument, the shape recorded when fake quantization was inserted (or read from a
checkpoint), the LightningModule's ``example_input_array``, then a training batch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_hybridcomp._lightning import device_of, example_inputs, make_example
from lightning_hybridcomp.callbacks._qat_state import QATProgress

__all__ = ["find_example_inputs", "recorded_example"]


def find_example_inputs(
    pl_module: pl.LightningModule,
    network: nn.Module,
    batch: Any,
    *,
    example_input_shape: list[int] | None,
    progress: QATProgress,
) -> Tensor:
    """The example input for ``network``, on its device (``batch`` may be ``None``).

    Raises:
        RuntimeError: if none of the sources gives one.
    """
    recorded = None
    if progress.example_shape is not None:
        recorded = (progress.example_shape, str(progress.example_dtype))
    example = example_inputs(
        pl_module,
        device=device_of(network, pl_module),
        shape=example_input_shape,
        recorded=recorded,
        batch=batch,
    )
    if example is not None:
        return example
    raise RuntimeError(
        "QuantizationAwareTraining could not find example inputs; pass `example_input_shape` to the callback."
    )


def recorded_example(
    network: nn.Module, progress: QATProgress, pl_module: pl.LightningModule | None
) -> Tensor:
    """An input of the shape and dtype the network was traced with, on its device.

    Raises:
        RuntimeError: before fake quantization recorded a shape.
    """
    if not progress.example_shape:
        raise RuntimeError("QuantizationAwareTraining does not know the network's input shape yet.")
    return make_example(progress.example_shape, progress.example_dtype, device_of(network, pl_module))
