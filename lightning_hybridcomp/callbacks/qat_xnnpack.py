"""The ``xnnpack`` QAT backend: the PT2E flow of ``x86_pt2e`` with ExecuTorch's XNNPACK quantizer.

Symmetric int8 activations and per-channel int8 weights for every conv and linear, the scheme ExecuTorch's
XNNPACK delegate runs; the converted network lowers to a ``.pte`` with :func:`lightning_hybridcomp.edge.export_executorch`.
"""

from __future__ import annotations

from typing import Any

from lightning_hybridcomp._executorch import QUANTIZER_MODULE as _QUANTIZER_MODULE
from lightning_hybridcomp._executorch import require_executorch, xnnpack_quantizer
from lightning_hybridcomp.callbacks.qat_backends import PT2EBackend

__all__ = ["XNNPACKBackend"]


class XNNPACKBackend(PT2EBackend):
    """PT2E quantization-aware training for ExecuTorch's XNNPACK delegate (needs the ``edge`` extra)."""

    hint = (
        "The network's forward must be exportable with `torch.export` (one tensor in, no data-dependent"
        " Python control flow); to quantize only a part, name it with `module=...`."
    )

    _feature = "QuantizationAwareTraining(backend='xnnpack')"

    def __init__(self) -> None:
        # Refused at construction, before any training, when the edge extra is missing.
        require_executorch(self._feature, _QUANTIZER_MODULE)

    def quantizer(self) -> Any:
        return xnnpack_quantizer(is_qat=True, feature=self._feature)
