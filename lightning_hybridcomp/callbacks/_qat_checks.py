"""The checks QuantizationAwareTraining runs on its arguments, the Trainer's schedule and a checkpoint's state.

Each raises one ``ValueError``/``TypeError`` (arguments) or ``RuntimeError`` (state) that names what was
expected and what to change, before anything is quantized or trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_hybridcomp._lightning import forward_network
from lightning_hybridcomp._validation import expect_bool, expect_choice, expect_int, expect_shape
from lightning_hybridcomp.callbacks._qat_state import STAGES
from lightning_hybridcomp.callbacks.qat_backends import BACKENDS

__all__ = [
    "LEGACY_BACKENDS",
    "CheckedArguments",
    "check_arguments",
    "check_checkpoint_state",
    "check_converted",
    "check_example_source",
    "check_schedule",
    "check_start",
    "check_start_before_end",
]

#: The engines of `torch.ao.quantization` that users ask for; their PT2E successor is 'x86_pt2e'.
LEGACY_BACKENDS = ("fbgemm", "qnnpack", "x86", "onednn", "eager", "fx")


class CheckedArguments(NamedTuple):
    """The constructor arguments that validation normalises (the lower-cased backend, the shape as a list)."""

    backend: str
    example_input_shape: list[int] | None


def check_arguments(
    *,
    backend: Any,
    module: Any,
    start_epoch: Any,
    start_step: Any,
    freeze_observers_epoch: Any,
    freeze_bn_epoch: Any,
    convert_on_fit_end: Any,
    example_input_shape: Any,
    log_fake_quant_error: Any,
    verbose: Any,
) -> CheckedArguments:
    """Validate every QuantizationAwareTraining argument; see the class docstring for their meaning."""
    hint = ""
    if isinstance(backend, str) and backend.lower() in LEGACY_BACKENDS:
        hint = (
            "The eager/FX engines of `torch.ao.quantization` are deprecated; 'x86_pt2e' is their PT2E"
            " successor and produces the same int8 x86 kernels."
        )
    key = expect_choice(backend, "backend", BACKENDS, hint=hint)
    if module is not None and (not isinstance(module, str) or not module):
        raise TypeError(
            f"Expected `module` to be None or the fully qualified name of a submodule, got {module!r}."
        )
    expect_int(start_epoch, "start_epoch")
    expect_int(start_step, "start_step", optional=True)
    if start_step is not None and start_epoch != 0:
        raise ValueError(
            f"Expected only one of `start_epoch` and `start_step`, got start_epoch={start_epoch} and"
            f" start_step={start_step}. Keep start_epoch=0 when starting at a step."
        )
    expect_int(freeze_observers_epoch, "freeze_observers_epoch", optional=True)
    expect_int(freeze_bn_epoch, "freeze_bn_epoch", optional=True)
    if freeze_observers_epoch is not None:
        if key == "linear_int8":
            raise ValueError(
                "Expected `freeze_observers_epoch` to be None for backend 'linear_int8': its activations are"
                " quantized dynamically per token, there are no observers to freeze."
            )
        if start_step is None and freeze_observers_epoch <= start_epoch:
            raise ValueError(
                f"Expected `freeze_observers_epoch` to be after `start_epoch`={start_epoch}, got"
                f" {freeze_observers_epoch}: frozen before they observed anything, the activation ranges would"
                " stay empty."
            )
    shape = expect_shape(example_input_shape, "example_input_shape")
    expect_bool(convert_on_fit_end, "convert_on_fit_end")
    expect_bool(log_fake_quant_error, "log_fake_quant_error")
    expect_bool(verbose, "verbose")
    return CheckedArguments(backend=key, example_input_shape=shape)


def check_example_source(
    pl_module: pl.LightningModule,
    network: nn.Module,
    *,
    network_name: str | None,
    example_input_shape: list[int] | None,
    stage: str,
) -> None:
    """Refuse a submodule without ``example_input_shape``: no batch or ``example_input_array`` fits it."""
    whole = not network_name or network is forward_network(pl_module) or stage != "float"
    if example_input_shape is None and not whole:
        raise ValueError(
            f"Expected `example_input_shape` for module {network_name!r}: it is a submodule, so neither"
            " `example_input_array` nor a training batch can be fed to it. Pass e.g."
            " example_input_shape=[2, 64, 8, 8]."
        )


def check_schedule(trainer: pl.Trainer, *, start_epoch: int, start_step: int | None) -> None:
    """Refuse a start that the Trainer's ``max_epochs`` or ``max_steps`` never reaches."""
    max_epochs = trainer.max_epochs
    if start_step is None and max_epochs is not None and max_epochs >= 0 and start_epoch >= max_epochs:
        raise ValueError(
            f"Expected `start_epoch` to be below `max_epochs`={max_epochs}, got {start_epoch}: fake"
            " quantization would never start."
        )
    max_steps = trainer.max_steps
    if start_step is not None and max_steps is not None and max_steps >= 0 and start_step >= max_steps:
        raise ValueError(
            f"Expected `start_step` to be below `max_steps`={max_steps}, got {start_step}: fake"
            " quantization would never start."
        )


def check_start(
    trainer: pl.Trainer, *, stage: str, start: int, start_epoch: int, start_step: int | None, warn: bool
) -> bool:
    """Refuse to train a converted network or to start after ``max_epochs``; returns whether it warned.

    ``start`` is the epoch fake quantization will really start at, after the last pruning step; with
    ``warn`` a start later than ``start_epoch`` is reported once.
    """
    if stage == "converted":
        raise RuntimeError(
            "The network was already converted to int8 by this QuantizationAwareTraining callback and cannot be"
            " trained further. Fit a fresh model, or resume an earlier checkpoint with"
            " `trainer.fit(model, ckpt_path=...)`."
        )
    warned = warn and start_step is None and start != start_epoch and stage == "float"
    if warned:
        rank_zero_warn(
            f"QuantizationAwareTraining: `start_epoch`={start_epoch} comes before the last pruning step"
            f" (epoch {start}); fake quantization waits and starts at epoch {start}, after pruning."
        )
    if stage == "float":
        if start_step is None:
            check_start_before_end(trainer, start)
        else:
            check_step_before_end(trainer, start_step)
    return warned


def check_step_before_end(trainer: pl.Trainer, start_step: int) -> None:
    """Refuse a ``start_step`` at or after the fit's last step, as ``estimated_stepping_batches`` counts it.

    Run at ``on_train_start``, once the training dataloader's length is known (``max_steps`` is checked at
    ``setup``). Not checked: a dataloader of unknown length (Lightning then estimates ``max_steps``, -1 when
    unbounded), and manual optimization, whose ``global_step`` counts optimizer steps, not batches.
    """
    if not trainer.lightning_module.automatic_optimization or not math.isfinite(trainer.num_training_batches):
        return
    total = trainer.estimated_stepping_batches
    if math.isfinite(total) and 0 <= total <= start_step:
        raise ValueError(
            f"Expected `start_step` to be below the fit's {int(total)} optimizer steps (max_epochs="
            f"{trainer.max_epochs} of {trainer.num_training_batches} batches, accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}), got {start_step}: fake quantization would never start. Lower"
            " start_step or train longer."
        )


def check_start_before_end(trainer: pl.Trainer, start: int) -> None:
    """Refuse a fake-quantization start (after the last pruning step) at or after ``max_epochs``.

    Run at ``setup`` as soon as the pruning schedule is known (a pruning callback listed before this one),
    and again at ``on_train_start``.
    """
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and start >= max_epochs:
        raise ValueError(
            f"Expected fake quantization to start before `max_epochs`={max_epochs}, but it would start at epoch"
            f" {start} (after the last pruning step). Raise max_epochs to at least {start + 1}."
        )


def check_checkpoint_state(state: Any, *, fitting: bool, backend: str, network_name: str | None) -> str:
    """The stage a checkpoint's QAT ``state`` records, once it is one this callback can rebuild.

    ``"float"`` when there is nothing to rebuild (no state, or a float-stage one).
    """
    target = state.get("stage", "float") if isinstance(state, Mapping) else "float"
    if target not in STAGES:
        raise RuntimeError(f"The checkpoint records an unknown QAT stage {target!r}.")
    if target == "float" or state is None:
        return "float"
    if fitting and target == "converted":
        raise RuntimeError(
            "The checkpoint holds the converted int8 model, which cannot be trained further. Evaluate it with"
            " `trainer.test(model, ckpt_path=...)`, or resume from a checkpoint written before conversion."
        )
    saved_backend = state.get("backend", backend)
    if saved_backend != backend:
        raise RuntimeError(
            f"The checkpoint was quantized with backend {saved_backend!r}, this callback uses {backend!r}."
            f" Set `backend={saved_backend!r}`."
        )
    saved_name = state.get("network_name")
    if saved_name is not None and saved_name != network_name:
        raise RuntimeError(
            f"The checkpoint quantized network {saved_name!r}, but this callback selects {network_name!r}."
            " Set `module` to the same submodule."
        )
    if not state.get("example_input_shape"):
        raise RuntimeError("The checkpoint's QAT state has no example input shape; it cannot be rebuilt.")
    return str(target)


def check_converted(stage: str, hosted: nn.Module | None) -> nn.Module:
    """The int8 network, for saving; refuses a network that is not converted yet."""
    if stage != "converted" or hosted is None:
        raise RuntimeError(
            f"Expected the network to be converted to int8 before saving an artifact, but it is in the"
            f" {stage!r} stage. Call this after `trainer.fit` with `convert_on_fit_end=True` (or after"
            " `trainer.test(model, ckpt_path=...)` on a QAT checkpoint)."
        )
    return hosted
