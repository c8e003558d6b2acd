"""Complementary experts: fp32 experts fine-tuned in fake-quant form on the samples the gate routes to them.

Pruned copies of one baseline make the same mistakes, so a gate over them has little to choose from. With
``MoELightningModule(quantize_experts=backend, freeze_experts=False)`` every expert joins the MoE's training
as a fake-quant network (the PT2E flow of :mod:`lightning_hybridcomp.callbacks.qat_backends`, its BatchNorm
folded into the convolutions first, so it keeps the running statistics it was trained with): the task loss
of the mixture reaches each expert only through the samples routed to it, so the experts specialise on
their share while they adapt to int8 rounding, and the gate learns whom to trust. When ``fit`` ends, every
expert becomes a real int8 program (``convert_pt2e``), and the MoE's checkpoint stores those.

Stages (``MoELightningModule.expert_stage``): ``"float"`` (built, not yet prepared), ``"fake_quant"``
(from ``setup("fit")``, checkpoints store the fp32 programs and the fake-quant weights and observers),
``"converted"`` (int8 programs). A fake-quant checkpoint resumes ``fit`` exactly; ``validate``, ``test``
and ``predict`` outside ``fit`` run the int8 MoE the end of ``fit`` would have produced from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.fx import GraphModule
from typing_extensions import Self

from lightning_hybridcomp._lightning import broadcast_tensors_, device_of, training_mode
from lightning_hybridcomp.artifacts import build_artifact
from lightning_hybridcomp.callbacks.qat_backends import PT2E_BACKENDS, QuantizationBackend, make_backend
from lightning_hybridcomp.moe.experts import Expert, ExpertSource, build_expert, stored_program
from lightning_hybridcomp.programs import load_checked_program

__all__ = [
    "EXPERT_STAGES",
    "QUANTIZE_EXPERT_BACKENDS",
    "ExpertStages",
    "check_quantize_experts",
    "convert_experts",
    "prepare_experts",
]

#: ``MoELightningModule.expert_stage`` values, in the order a fit goes through them.
EXPERT_STAGES = ("float", "fake_quant", "converted")
#: The QAT backends that can prepare a MoE's experts (conv nets, PT2E, BatchNorm folded).
QUANTIZE_EXPERT_BACKENDS = PT2E_BACKENDS


def check_quantize_experts(value: Any) -> str | None:
    """``None`` or the lower-case backend name; builds the backend once, so a missing extra fails now.

    Raises:
        ValueError: for anything but ``None`` or one of :data:`QUANTIZE_EXPERT_BACKENDS`.
        ImportError: for ``"xnnpack"`` without ExecuTorch installed (the message names the extra).
    """
    if value is None:
        return None
    name = value.lower() if isinstance(value, str) else value
    if name not in QUANTIZE_EXPERT_BACKENDS:
        raise ValueError(
            f"Expected `quantize_experts` to be None or one of {list(QUANTIZE_EXPERT_BACKENDS)} (the PT2E QAT"
            f" backends, for convolutional experts), got {value!r}."
        )
    make_backend(name)
    return str(name)


def prepare_experts(
    records: Sequence[Expert], backend_name: str, shape: tuple[int, ...], *, trainable: bool
) -> list[Expert]:
    """The experts as fake-quant networks (BatchNorm folded), trainable or not; their programs stay fp32.

    Raises:
        ValueError: naming the first expert that is int8 already (only fp32 experts can be fine-tuned in
            fake-quant form) or that the backend cannot prepare.
    """
    quantized = [r.name for r in records if r.quantized]
    if quantized:
        raise ValueError(
            f"`quantize_experts={backend_name!r}` fine-tunes fp32 experts in fake-quant form and converts them"
            f" to int8 when fit ends, but {quantized[0]} is int8 already. Give the fp32 experts (the pruned"
            " networks before conversion), or leave `quantize_experts=None` to route the int8 experts as they are."
        )
    backend = make_backend(backend_name)
    example = torch.randn(2, *shape)
    prepared = []
    for record in records:
        module = _prepare(backend, record, example)
        module.requires_grad_(trainable)
        prepared.append(replace(record, module=module, compiled=None))
    return prepared


def _prepare(backend: QuantizationBackend, record: Expert, example: torch.Tensor) -> torch.nn.Module:
    # A fresh copy of the stored fp32 program. As a plain GraphModule: an exported program's module refuses
    # `.train()`/`.eval()`, which tracing at inference needs.
    device = device_of(record.module)
    exported = stored_program(record.data, record.name).module()
    network = GraphModule(exported, exported.graph).to(device)
    try:
        return backend.prepare(network, example.to(device), fold_batch_norm=True)
    except Exception as err:
        raise ValueError(
            f"Could not prepare expert {record.name} for quantization-aware fine-tuning: {err}"
        ) from err


def convert_experts(records: Sequence[Expert], backend_name: str, shape: tuple[int, ...]) -> list[Expert]:
    """Each fake-quant expert as a real int8 program, measured and serialized like any int8 expert.

    Under DDP each rank's observers saw its own batches: rank zero's values are copied everywhere first, so
    every rank converts the same program.
    """
    backend = make_backend(backend_name)
    converted = []
    for record in records:
        broadcast_tensors_(record.module)
        device = device_of(record.module)
        network = backend.convert(record.module).to("cpu")
        # Built and measured as an artifact file, like the int8 experts the MoE loads from `.pt2` files.
        data, figures = build_artifact(network, torch.zeros(2, *shape), architecture=record.name)
        source = ExpertSource(
            name=record.name,
            program=load_checked_program(data, f"the int8 program of {record.name}"),
            macs=figures.macs,
            params=figures.params,
            size_bytes=figures.size_bytes,
            quantized=True,
        )
        expert = build_expert(source, shape)
        converted.append(replace(expert, module=expert.module.to(device)))
    return converted


class ExpertStages:
    """The ``quantize_experts`` life cycle of a ``MoELightningModule``'s experts, mixed into the module.

    ``"float"`` until ``setup("fit")`` prepares them, ``"fake_quant"`` while that fit trains them, and
    ``"converted"`` from its end (or from a ``validate``/``test``/``predict`` given a fake-quant checkpoint).
    """

    _expert_stage: str = "float"

    if TYPE_CHECKING:
        import lightning.pytorch as pl

        _records: list[Expert]
        hparams: Any
        trainer: pl.Trainer

        def _set_records(self, records: list[Expert]) -> None: ...

    @property
    def expert_stage(self) -> str:
        """``"float"``, ``"fake_quant"`` or ``"converted"``: where ``quantize_experts`` has taken the experts."""
        return self._expert_stage

    def convert_experts_(self) -> Self:
        """Convert the fake-quant experts to int8 programs now, in place (the end of ``fit`` does it).

        Returns:
            The MoE itself.

        Raises:
            RuntimeError: if the experts are not in fake-quant form (``expert_stage != "fake_quant"``).
        """
        if self._expert_stage != "fake_quant":
            raise RuntimeError(
                f"Expected fake-quant experts to convert, but `expert_stage` is {self._expert_stage!r}: only"
                " a MoE with `quantize_experts` has them, from `setup('fit')` until its fit ends."
            )
        shape = tuple(self.hparams["input_shape"])
        with training_mode(self, False):  # type: ignore[arg-type]
            self._set_records(convert_experts(self._records, self.hparams["quantize_experts"], shape))
        self._expert_stage = "converted"
        return self

    def _prepare_experts(self) -> None:
        backend = self.hparams["quantize_experts"]
        if backend is None:
            raise RuntimeError(
                "The checkpoint holds fake-quant experts; build the MoE with the `quantize_experts` backend"
                " it was trained with, or load it with `load_moe(path)`."
            )
        trainable = not self.hparams["freeze_experts"]
        self._set_records(
            prepare_experts(self._records, backend, tuple(self.hparams["input_shape"]), trainable=trainable)
        )
        self._expert_stage = "fake_quant"

    def _prepare_experts_for_fit(self) -> None:
        # From `setup("fit")`: before the optimizer and DDP are set up, so both see the fake-quant parameters.
        if self.hparams["quantize_experts"] is not None and self._expert_stage == "float":
            self._prepare_experts()

    def _refuse_converted_checkpoint(self, stage: str) -> None:
        if stage == "converted" and self._expert_stage == "fake_quant":
            raise RuntimeError(
                "The checkpoint's experts were converted to int8 when its fit ended, so this fit cannot resume"
                " from it; evaluate it with `load_moe(path)` or `Trainer.test(ckpt_path=...)` instead."
            )

    def _restore_expert_stage(self, stage: str) -> None:
        """Take the experts to the checkpoint's ``stage`` before its ``state_dict`` is loaded."""
        if stage == "converted":
            self._expert_stage = "converted"  # built from the checkpoint's int8 programs
        elif stage == "fake_quant" and self._expert_stage == "float":
            self._prepare_experts()  # the state_dict loaded next holds the fake-quant weights and observers

    def on_fit_end(self) -> None:
        if self._expert_stage == "fake_quant":
            self.convert_experts_()

    def _convert_outside_fit(self) -> None:
        # A fake-quant checkpoint given to validate/test/predict runs as the int8 MoE its fit would end in.
        if self._expert_stage == "fake_quant" and self.trainer.state.fn != TrainerFn.FITTING:
            self.convert_experts_()

    def on_validation_start(self) -> None:
        self._convert_outside_fit()

    def on_test_start(self) -> None:
        self._convert_outside_fit()

    def on_predict_start(self) -> None:
        self._convert_outside_fit()
