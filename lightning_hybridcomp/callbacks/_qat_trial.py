"""QuantizationAwareTraining's trial before training: fake quantization inserted into a throw-away copy.

A network the backend cannot trace or annotate is refused before any epoch is paid for, with the upstream
reason in one line; the copy has the structure an attached pruning callback will leave.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_hybridcomp._graph_passes import NondeterministicProgramError
from lightning_hybridcomp._lightning import copy_network, device_of, peek_training_inputs
from lightning_hybridcomp.callbacks._qat_hosting import HostedNetwork
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.qat_backends import QuantizationBackend
from lightning_hybridcomp.programs import ExportError

__all__ = ["trial_prepare"]


def trial_prepare(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    backend: QuantizationBackend,
    backend_name: str,
    network: HostedNetwork,
    pruning: Sequence[StructuralCompression],
    example_inputs: Callable[[nn.Module], Tensor],
) -> None:
    """Insert fake quantization into a copy of the network pruning will leave, before any training.

    Args:
        trainer, pl_module: the run about to train.
        backend, backend_name: the backend to try and its name for the message.
        network: the network to quantize.
        pruning: the attached callbacks that will change its structure first.
        example_inputs: the callback's example for a network; raises ``RuntimeError`` when it knows none,
            and a training batch is peeked at instead.

    Raises:
        ValueError: if the preparation fails (the package's own ``ExportError`` is raised as it is).
    """
    # The trial draws no random numbers from the run's generators and repeats no warning.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = _network_after_pruning(trainer, pl_module, network, pruning)
        example = _trial_example(trainer, pl_module, copy, example_inputs)
        if example is not None:
            _try_prepare(backend, backend_name, network.describe(), copy, example)


def _try_prepare(
    backend: QuantizationBackend, backend_name: str, description: str, network: nn.Module, example: Tensor
) -> None:
    backend.check(network)
    try:
        backend.prepare(network, example)
    except (ExportError, NondeterministicProgramError):
        raise  # already the package's message, with torch.export's reason and a hint
    except Exception as err:  # export and torchao raise anything from UserError to AssertionError
        reason = " ".join(str(err).split())[:400] or "no message"
        raise ValueError(
            f"QuantizationAwareTraining cannot quantize {description} with backend"
            f" {backend_name!r}: a trial preparation failed ({type(err).__name__}: {reason}). {backend.hint}"
            " Nothing was trained or changed."
        ) from None


def _network_after_pruning(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    network: HostedNetwork,
    pruning: Sequence[StructuralCompression],
) -> nn.Module:
    """A copy of the network to quantize with the structure the attached pruning callbacks will leave."""
    name = network.name or ""
    for cb in pruning:
        pruned_name = cb.network
        preview = cb.preview_network(trainer, pl_module)
        if preview is None:
            continue
        if pruned_name == name:
            return preview
        if not pruned_name or name.startswith(pruned_name + "."):
            return preview.get_submodule(name[len(pruned_name) :].lstrip("."))
    return copy_network(network.current(pl_module))


def _trial_example(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    network: nn.Module,
    example_inputs: Callable[[nn.Module], Tensor],
) -> Tensor | None:
    with contextlib.suppress(RuntimeError):
        return example_inputs(network)
    peeked = peek_training_inputs(trainer)
    return None if peeked is None else peeked.to(device_of(network, pl_module))
