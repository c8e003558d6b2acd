"""Where the network QuantizationAwareTraining works on sits in the LightningModule, and which version is there.

The fake-quant or int8 version replaces the float network in place: as the named submodule, or, for the
LightningModule's own ``forward``, as the child ``qat_network`` that ``forward`` is routed to.
"""

from __future__ import annotations

import types
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.fx import GraphModule

from lightning_hybridcomp._lightning import forward_network, replace_module_, resolve_module
from lightning_hybridcomp.callbacks._pruning_utils import APPLIED_HISTORY_ATTR

__all__ = ["HOST_NAME", "HostedNetwork"]

#: The child that holds a traced ``forward`` of the whole LightningModule.
HOST_NAME = "qat_network"


class HostedNetwork:
    """The network to quantize: its place in the LightningModule, its float original and what is there now.

    Attributes:
        name: fully qualified name of the network in the LightningModule, ``""`` for its own ``forward``
            (``None`` until :meth:`resolve_`).
        float_network: the float network the hosted version was prepared from.
        hosted: the fake-quant or int8 version now in the LightningModule (``None`` while it is float).
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.float_network: nn.Module | None = None
        self.hosted: nn.Module | None = None

    def resolve_(self, pl_module: pl.LightningModule, module: str | None) -> None:
        """Find the network once: the submodule ``module``, else the forward network, else ``forward``."""
        if self.name is not None:
            return
        if module is not None:
            resolve_module(pl_module, module, arg_name="module")
            self.name = module
            return
        forward = forward_network(pl_module)
        if forward is not None:
            self.name = next(name for name, child in pl_module.named_children() if child is forward)
            return
        self.name = ""

    def current(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network in ``pl_module`` now, whichever version it is."""
        if not self.name:
            return pl_module
        return resolve_module(pl_module, self.name, arg_name="module")

    def host_(self, pl_module: pl.LightningModule, new: nn.Module) -> None:
        """Put ``new`` in the network's place in ``pl_module``."""
        history = getattr(self.float_network, APPLIED_HISTORY_ATTR, None)
        if history is not None and new is not self.float_network:
            # StructuredPruning recognises its network by this record; the traced copy must carry it too.
            object.__setattr__(new, APPLIED_HISTORY_ATTR, history)
        if not self.name:
            if new is not pl_module:
                pl_module.add_module(HOST_NAME, new)
                object.__setattr__(pl_module, "forward", types.MethodType(_hosted_forward, pl_module))
        elif pl_module.get_submodule(self.name) is not new:
            replace_module_(pl_module, self.name, new)
        self.hosted = new

    def unhost_(self, pl_module: pl.LightningModule, restored: nn.Module) -> None:
        """Put the float network ``restored`` back in the network's place in ``pl_module``."""
        if not self.name:
            if HOST_NAME in pl_module._modules:
                delattr(pl_module, HOST_NAME)
            pl_module.__dict__.pop("forward", None)
        elif pl_module.get_submodule(self.name) is not restored:
            replace_module_(pl_module, self.name, restored)
        self.hosted = None
        self.float_network = None

    def describe(self) -> str:
        """The network as messages name it."""
        return f"module {self.name!r}" if self.name else "the LightningModule's forward"

    def architecture(self) -> str:
        """The float network's class name, as artifacts record it."""
        network = self.float_network
        if network is None or isinstance(network, GraphModule):
            return "network"
        return type(network).__name__


def _hosted_forward(self: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, HOST_NAME)(*args, **kwargs)
