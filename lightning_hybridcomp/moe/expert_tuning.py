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
from typing import Any

import torch
from torch.fx import GraphModule

from lightning_hybridcomp._lightning import broadcast_tensors_
from lightning_hybridcomp.callbacks.qat_backends import QuantizationBackend, make_backend
from lightning_hybridcomp.moe.experts import Expert, ExpertSource, build_expert, stored_program
from lightning_hybridcomp.programs import export_for_artifact

__all__ = [
    "EXPERT_STAGES",
    "QUANTIZE_EXPERT_BACKENDS",
    "check_quantize_experts",
    "convert_experts",
    "prepare_experts",
]

#: ``MoELightningModule.expert_stage`` values, in the order a fit goes through them.
EXPERT_STAGES = ("float", "fake_quant", "converted")
#: The QAT backends that can prepare a MoE's experts (conv nets, PT2E, BatchNorm folded).
QUANTIZE_EXPERT_BACKENDS = ("x86_pt2e", "xnnpack")


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
    device = _device(record)
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
        device = _device(record)
        program = export_for_artifact(backend.convert(record.module).to("cpu"), torch.zeros(2, *shape))
        expert = build_expert(ExpertSource(name=record.name, program=program, quantized=True), shape)
        converted.append(replace(expert, module=expert.module.to(device)))
    return converted


def _device(record: Expert) -> torch.device:
    tensors = [*record.module.parameters(), *record.module.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")
