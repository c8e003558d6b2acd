"""ExecuTorch as an optional dependency: one import guard naming the extra, and the XNNPACK quantizer.

Everything edge-related (the ``xnnpack`` QAT backend, ``.pte`` export and loading, the pipeline's edge
column) imports ExecuTorch through :func:`require_executorch`, so a missing install reads the same everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

__all__ = [
    "EDGE_INSTALL",
    "QUANTIZER_MODULE",
    "ExecuTorchMissingError",
    "executorch_available",
    "require_executorch",
    "xnnpack_quantizer",
]

#: The command that installs what the edge features need.
EDGE_INSTALL = 'pip install "lightning-hybridcomp[edge]"'
#: Where ExecuTorch keeps its XNNPACK quantizer.
QUANTIZER_MODULE = "executorch.backends.xnnpack.quantizer.xnnpack_quantizer"


class ExecuTorchMissingError(ImportError):
    """ExecuTorch is not installed; the message names the feature and the extra that provides it."""


def executorch_available() -> bool:
    """Whether ``executorch`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):
        return False


def require_executorch(feature: str, module: str = "executorch") -> ModuleType:
    """Import ``module`` of ExecuTorch, or raise one clear error saying what needs it and how to install it.

    Args:
        feature: what the user asked for, e.g. ``"QuantizationAwareTraining(backend='xnnpack')"``.
        module: the ExecuTorch module to import.

    Raises:
        ExecuTorchMissingError: (an ``ImportError``) when ExecuTorch is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExecuTorchMissingError(
            f"{feature} needs ExecuTorch, which is not installed ({err}). Install the package's edge extra:"
            f" `{EDGE_INSTALL}` (ExecuTorch 1.5, beside torch 2.14 and torchao 0.18)."
        ) from err


def xnnpack_quantizer(*, is_qat: bool, feature: str) -> Any:
    """ExecuTorch's ``XNNPACKQuantizer`` with symmetric per-channel int8 weights for every conv and linear."""
    quantizer_module = require_executorch(feature, QUANTIZER_MODULE)
    quantizer = quantizer_module.XNNPACKQuantizer()
    quantizer.set_global(
        quantizer_module.get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)
    )
    return quantizer
