"""How far the fake-quant network's validation outputs are from the float network's (``qat/fake_quant_error``).

A forward hook captures each (input, output) pair of the fake-quant network; the float reference is computed
afterwards, once per captured call, with the hook removed so that it is not captured itself.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_hybridcomp.callbacks.qat_backends import QuantizationBackend

__all__ = ["FakeQuantErrorMonitor", "relative_error"]


def relative_error(output: Tensor, reference: Tensor) -> float:
    """Relative L2 distance ``||output - reference|| / ||reference||``.

    Example::

        >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0]))
        1.3333333730697632
    """
    return float(
        torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-12)
    )


class FakeQuantErrorMonitor:
    """Captures the fake-quant network's outputs during a validation epoch and measures their error.

    Args:
        backend: the backend that computes the float reference for a captured input.
    """

    def __init__(self, backend: QuantizationBackend) -> None:
        self._backend = backend
        self._hook: Any = None
        self._captured: list[tuple[Tensor, Tensor]] = []

    def attach(self, prepared: nn.Module) -> None:
        """Start capturing the calls of ``prepared`` (once; a second call keeps the first hook)."""
        if self._hook is None:
            self._hook = prepared.register_forward_hook(self._capture)

    def measure(
        self, prepared: nn.Module | None, float_network: nn.Module | None, pl_module: pl.LightningModule
    ) -> float | None:
        """The mean error of the calls captured since the last measurement; ``None`` if there were none."""
        if not self._captured:
            return None
        captured, self._captured = self._captured, []
        errors = [
            self._error(prepared, float_network, pl_module, inputs, output) for inputs, output in captured
        ]
        return sum(errors) / len(errors)

    def detach(self) -> None:
        """Stop capturing and drop what was captured."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = []

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self._captured.append((args[0].detach(), output.detach()))

    def _error(
        self,
        prepared: nn.Module | None,
        float_network: nn.Module | None,
        pl_module: pl.LightningModule,
        inputs: Tensor,
        output: Tensor,
    ) -> float:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()  # the reference forward below must not be captured
        try:
            with torch.no_grad():
                reference = self._backend.float_forward(prepared, float_network, pl_module, inputs)
        finally:
            if prepared is not None:
                self._hook = prepared.register_forward_hook(self._capture)
        return relative_error(output, reference)
