"""The ``"moe"`` entry of a MoE checkpoint: the experts' serialized programs and figures, and the stored gate.

Everything in it is a tensor or a plain value, so the checkpoint loads with ``torch.load(weights_only=True)``
and rebuilds the MoE without the expert files or their classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from lightning_hybridcomp.moe.expert_tuning import EXPERT_STAGES
from lightning_hybridcomp.moe.experts import Expert, ExpertSource, stored_program

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "StoredMoE",
    "check_same_experts",
    "checkpoint_entry",
    "read_expert_stage",
    "read_moe_entry",
]

CHECKPOINT_KEY = "moe"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StoredMoE:
    """What a MoE checkpoint holds besides the ``state_dict`` and the hyper-parameters.

    Attributes:
        experts: the stored experts, with the names and figures they were built with.
        gate_program: the exported user gate module, or ``None`` (no user gate, or one that could not be
            exported).
    """

    experts: list[ExpertSource]
    gate_program: ExportedProgram | None

    def gate_argument(
        self, gate: str | nn.Module | ExportedProgram, where: str
    ) -> str | nn.Module | ExportedProgram:
        """The ``gate`` to rebuild the MoE with, from the recorded ``gate`` hyper-parameter.

        ``"module"`` (a user gate module) becomes the module given instead, else the stored program.

        Raises:
            ValueError: if the checkpoint was trained with a gate module it does not hold and none is given.
        """
        if gate != "module":
            return gate
        if self.gate_program is not None:
            return self.gate_program
        raise ValueError(
            f"{where} was trained with a gate module that could not be exported; pass it as `gate=`"
            " (`load_moe(path, gate=module)` or `MoELightningModule.load_from_checkpoint(path, gate=module)`)."
        )


def checkpoint_entry(
    experts: Sequence[Expert],
    num_classes: int,
    gate_macs: int,
    gate_program: bytes | None,
    expert_stage: str = "float",
) -> dict[str, Any]:
    """The ``"moe"`` entry for a MoE over ``experts``: tensors and plain values only.

    ``expert_stage`` is ``MoELightningModule.expert_stage``; in ``"fake_quant"`` the stored programs are the
    fp32 experts, and the ``state_dict`` holds their fake-quant weights and observers.
    """
    return {
        "expert_stage": expert_stage,
        "format_version": FORMAT_VERSION,
        "experts": [_bytes_to_tensor(e.data) for e in experts],
        "expert_names": [e.name for e in experts],
        "expert_macs": [e.macs for e in experts],
        "expert_params": [e.params for e in experts],
        "expert_sizes": [e.size_bytes for e in experts],
        "expert_quantized": [e.quantized for e in experts],
        "fingerprints": [e.fingerprint for e in experts],
        "num_classes": num_classes,
        "gate_macs": gate_macs,
        "gate_program": None if gate_program is None else _bytes_to_tensor(gate_program),
    }


def read_moe_entry(checkpoint: Any, where: str) -> StoredMoE:
    """The experts and gate a MoE checkpoint stored; every program is checked before it is opened.

    Args:
        checkpoint: the loaded checkpoint dict.
        where: how messages name the checkpoint, e.g. ``"'moe.ckpt'"``.

    Raises:
        ValueError: if it is not a MoE checkpoint, was written by a newer format, or holds a program that is
            not safe to open.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict) or "experts" not in entry:
        raise ValueError(
            f"Expected {where} to be a MoELightningModule checkpoint (with a {CHECKPOINT_KEY!r} entry),"
            " but it is not."
        )
    if entry.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{where} was written by a newer lightning_hybridcomp (MoE checkpoint format"
            f" {entry['format_version']} > {FORMAT_VERSION}); upgrade the package."
        )
    count = len(entry["experts"])
    names = list(entry.get("expert_names") or [f"experts[{i}]" for i in range(count)])

    def recorded(key: str, i: int) -> Any:
        values = entry.get(key)
        return values[i] if isinstance(values, (list, tuple)) and i < len(values) else None

    experts = []
    for i, (tensor, name) in enumerate(zip(entry["experts"], names)):
        macs, params, size = (recorded(key, i) for key in ("expert_macs", "expert_params", "expert_sizes"))
        experts.append(
            ExpertSource(
                name=name,
                program=stored_program(_tensor_to_bytes(tensor), name),
                macs=None if macs is None else int(macs),
                params=None if params is None else int(params),
                size_bytes=None if size is None else int(size),
                quantized=bool(recorded("expert_quantized", i)),
            )
        )
    gate = entry.get("gate_program")
    gate_program = None if gate is None else stored_program(_tensor_to_bytes(gate), "the gate")
    return StoredMoE(experts=experts, gate_program=gate_program)


def read_expert_stage(checkpoint: Any, where: str) -> str:
    """The checkpoint's ``expert_stage``: ``"float"`` when it records none (written before stages existed, or
    not a MoE checkpoint, which :func:`read_moe_entry` and :func:`check_same_experts` refuse).

    Raises:
        ValueError: if it records an unknown stage.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    stage = entry.get("expert_stage", "float") if isinstance(entry, dict) else "float"
    if stage not in EXPERT_STAGES:
        raise ValueError(
            f"{where} records an unknown expert stage {stage!r}; expected one of {EXPERT_STAGES}."
        )
    return str(stage)


def check_same_experts(checkpoint: dict[str, Any], experts: Sequence[Expert]) -> None:
    """Refuse to resume from a checkpoint trained with other experts than ``experts``.

    Raises:
        RuntimeError: if the checkpoint has no MoE entry, another number of experts, or an expert whose
            weights differ (named).
    """
    entry = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(entry, dict):
        raise RuntimeError(
            f"Expected a MoELightningModule checkpoint with a {CHECKPOINT_KEY!r} entry, but it has none."
        )
    saved = list(entry.get("fingerprints", []))
    names = list(entry.get("expert_names", []))
    ours = [e.name for e in experts]
    if len(saved) != len(experts):
        raise RuntimeError(
            f"The checkpoint was trained with {len(saved)} experts ({names}), but this MoE has {len(experts)}"
            f" ({ours}). Build the MoE from the same experts, or use `load_moe(path)`."
        )
    for i, (expert, theirs) in enumerate(zip(experts, saved)):
        if expert.fingerprint != theirs:
            raise RuntimeError(
                f"Expert {i} of this MoE, {expert.name}, is not the expert the checkpoint was trained"
                f" with ({names[i] if i < len(names) else 'unknown'}): their weights differ. Pass the same expert"
                " files in the same order, or use `load_moe(path)`, which needs no expert files."
            )


def _bytes_to_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _tensor_to_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()
