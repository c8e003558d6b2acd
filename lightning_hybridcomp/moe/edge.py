"""The Mixture of Experts on ExecuTorch: gate and experts as the methods of one ``.pte``, routed on the host.

:func:`export_moe_program` lowers the gate (``gate``: images -> router logits) and every expert
(``expert_<i>``: images -> logits) of a :class:`~lightning_hybridcomp.moe.MoELightningModule` into one
multi-method program; :class:`EdgeMoE` runs it with the module's own routing maths (``top_k_gate``,
``sparse_dispatch``, ``log_mixture``), so it predicts what the module predicts at its evaluation top-k.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_hybridcomp._validation import is_int
from lightning_hybridcomp.edge_programs import (
    FORMAT_VERSION,
    EdgeMetadata,
    ExecuTorchProgram,
    edge_example,
    lower_to_xnnpack,
    write_program,
)
from lightning_hybridcomp.moe.dispatch import capacity_keep, log_mixture, sparse_dispatch
from lightning_hybridcomp.moe.gate import TopKGating, top_k_gate
from lightning_hybridcomp.programs import cpu_copy, export_for_artifact, program_params_and_dtype

if TYPE_CHECKING:
    from lightning_hybridcomp.moe.module import MoELightningModule

__all__ = ["EdgeMoE", "export_moe_program"]


class _RouterLogits(nn.Module):
    """The gate as an edge method: images -> clean router logits (no noise outside training)."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        logits, _ = self.gate(x)
        return logits


def export_moe_program(
    moe: MoELightningModule, path: str | os.PathLike[str], *, max_batch: int, allow_undelegated: bool
) -> EdgeMetadata:
    """Write ``moe`` as one ``.pte`` with the methods ``gate`` and ``expert_0`` ... ``expert_<N-1>``.

    The side-car records the evaluation top-k (``extra["top_k"]``), the capacity limit when it applies in
    evaluation, and each expert's MACs and name. Called by :func:`lightning_hybridcomp.edge.export_executorch`.
    """
    moe._require_built()
    if moe.expert_stage == "fake_quant":
        raise ValueError(
            "Expected the MoE's experts to be int8 or fp32 programs, but they are fake-quant networks (a"
            " checkpoint written during a fit with `quantize_experts`); call `moe.convert_experts_()` first."
        )
    example = edge_example(torch.zeros(1, *moe.hparams["input_shape"]), max_batch)
    was_training = moe.training
    moe.eval()
    try:
        programs = {
            "gate": export_for_artifact(cpu_copy(_RouterLogits(moe.gate)), example, max_batch=len(example))
        }
        for i, record in enumerate(moe.expert_records):
            programs[f"expert_{i}"] = export_for_artifact(
                cpu_copy(record.module), example, max_batch=len(example)
            )
    finally:
        moe.train(was_training)
    figures = [program_params_and_dtype(p) for p in programs.values()]
    data, left = lower_to_xnnpack(
        programs, max_batch=max_batch, allow_undelegated=allow_undelegated, where="the MoE"
    )
    top_k = int(moe.eval_top_k if moe.eval_top_k is not None else moe.top_k)
    capacity = moe.capacity_factor if moe.capacity_in_eval else None
    quantized = [r.quantized for r in moe.expert_records]
    metadata = EdgeMetadata(
        format_version=FORMAT_VERSION,
        kind="moe",
        architecture=f"MoE of {moe.num_experts} experts",
        methods=tuple(programs),
        input_shape=tuple(int(s) for s in example.shape[1:]),
        input_dtype="float32",
        num_classes=int(moe.num_classes),
        max_batch=max_batch,
        dtype="int8" if all(quantized) else "float32",
        macs=moe.gate_macs + sum(moe.expert_macs),
        params=sum(params for params, _ in figures),
        steps=("moe",),
        quantizer=None,
        undelegated=left,
        extra={
            "top_k": top_k,
            "capacity_factor": capacity,
            "gate_macs": moe.gate_macs,
            "expert_macs": moe.expert_macs,
            "expert_names": moe.expert_names,
            "expert_dtypes": [dtype for _, dtype in figures[1:]],
        },
    )
    return write_program(path, data, metadata)


class EdgeMoE(ExecuTorchProgram):
    """A MoE ``.pte`` in the ExecuTorch runtime, routed top-k on the host: ``moe(x)`` -> log mixture probabilities.

    The gate method scores the experts, ``top_k_gate`` picks :attr:`top_k` of them per image, each chosen
    expert method runs once on exactly its images (``sparse_dispatch``), and ``log_mixture`` mixes their
    probabilities: the same functions ``MoELightningModule.forward`` uses, so ``moe(x).argmax(-1)`` equals the
    module's prediction at its evaluation top-k.

    Attributes:
        top_k: experts per image, the exported MoE's evaluation top-k unless set (1 to the number of experts).
    """

    def __init__(self, program: Any, metadata: EdgeMetadata, path: Path) -> None:
        super().__init__(program, metadata, path)
        self.num_experts = sum(m.startswith("expert_") for m in metadata.methods)
        self._top_k = int(metadata.extra.get("top_k", 1))
        factor = metadata.extra.get("capacity_factor")
        self.capacity_factor = None if factor is None else float(factor)
        self._experts = [functools.partial(self.run, f"expert_{i}") for i in range(self.num_experts)]

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not is_int(value) or not 1 <= value <= self.num_experts:
            raise ValueError(f"Expected `top_k` to be an integer in [1, {self.num_experts}], got {value!r}.")
        self._top_k = int(value)

    def route(self, x: Tensor) -> TopKGating:
        """The routing decision for the images ``x``: the gate method's logits through ``top_k_gate``."""
        return top_k_gate(self.run("gate", x), self.top_k)

    def __call__(self, x: Tensor) -> Tensor:
        gating = self.route(x)
        keep = (
            None
            if self.capacity_factor is None
            else capacity_keep(gating, self.num_experts, self.capacity_factor)
        )
        return log_mixture(sparse_dispatch(x, gating, self._experts, self.metadata.num_classes, keep).probs)
