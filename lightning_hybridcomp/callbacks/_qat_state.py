"""What a QuantizationAwareTraining run has done so far, as it travels in a checkpoint.

Plain values only (lists, ints, floats, strings), so a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["STAGES", "STATE_VERSION", "QATProgress"]

STATE_VERSION = 1

#: The stages in order; ``qat/stage`` logs a stage's index.
STAGES = ("float", "fake_quant", "converted")


@dataclass
class QATProgress:
    """The checkpointed state of one QuantizationAwareTraining run.

    Attributes:
        stage: one of :data:`STAGES`.
        example_shape, example_dtype: shape and dtype of the example input the network was traced with.
        started_at: the epoch fake quantization was inserted at.
        observers_frozen, bn_frozen: whether the activation ranges and the BatchNorm statistics are frozen.
        qparams: the quantization parameters the conversion baked into the int8 program.
        costs: ``macs`` and ``params`` of the fake-quant or int8 network.
    """

    stage: str = "float"
    example_shape: list[int] | None = None
    example_dtype: str = "torch.float32"
    started_at: int | None = None
    observers_frozen: bool = False
    bn_frozen: bool = False
    qparams: dict[str, dict[str, float | int]] = field(default_factory=dict)
    costs: dict[str, int] = field(default_factory=dict)

    def state_dict(self, *, backend: str, network_name: str | None) -> dict[str, Any]:
        """The checkpoint form (``backend`` and ``network_name`` are recorded beside the progress)."""
        return {
            "version": STATE_VERSION,
            "backend": backend,
            "stage": self.stage,
            "network_name": network_name,
            "example_input_shape": list(self.example_shape) if self.example_shape else None,
            "example_input_dtype": self.example_dtype,
            "started_at": self.started_at,
            "observers_frozen": self.observers_frozen,
            "bn_frozen": self.bn_frozen,
            "qparams": {k: dict(v) for k, v in self.qparams.items()},
            "costs": dict(self.costs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the counters recorded by :meth:`state_dict` (missing keys take their defaults).

        ``stage`` and ``qparams`` are left as they are: they belong to the structure, which is rebuilt from
        the same state before the weights load. An example shape the checkpoint lacks keeps the known one.
        """
        self.started_at = state.get("started_at")
        self.observers_frozen = bool(state.get("observers_frozen", False))
        self.bn_frozen = bool(state.get("bn_frozen", False))
        self.costs = {k: int(v) for k, v in state.get("costs", {}).items()}
        shape = state.get("example_input_shape")
        self.example_shape = list(shape) if shape else self.example_shape
        self.example_dtype = str(state.get("example_input_dtype") or self.example_dtype)
