"""Checkpoints of torchao's int8 weights: tensor subclasses stored as their plain inner tensors.

Lightning's loader cannot read tensor subclasses back (its callable ``map_location`` is refused for them),
so a checkpoint holds each subclass tensor ``k`` as ``k::<inner name>`` plain tensors instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flatten_tensor_subclasses_", "unflatten_tensor_subclasses_"]

_INNER_SEP = "::"


def _is_tensor_subclass(value: Any) -> bool:
    return (
        isinstance(value, Tensor)
        and type(value) not in (Tensor, nn.Parameter)
        and hasattr(value, "__tensor_flatten__")
    )


def flatten_tensor_subclasses_(state: dict[str, Any]) -> None:
    """Replace each tensor-subclass entry ``k`` by its plain inner tensors ``k::<name>``."""
    for key, value in list(state.items()):
        if not _is_tensor_subclass(value):
            continue
        names, _ = value.__tensor_flatten__()
        for name in names:
            inner = getattr(value, name)
            if _is_tensor_subclass(inner):
                raise RuntimeError(f"Cannot checkpoint {key!r}: its {name!r} is itself a tensor subclass.")
            state[f"{key}{_INNER_SEP}{name}"] = inner.detach()
        del state[key]


def unflatten_tensor_subclasses_(state: dict[str, Any], pl_module: nn.Module) -> None:
    """Load ``k::<name>`` entries into the rebuilt module's subclass tensors and put those back as ``k``."""
    if not any(_INNER_SEP in key for key in state):
        return
    with torch.no_grad():
        for key, tensor in pl_module.state_dict(keep_vars=True).items():
            if not _is_tensor_subclass(tensor):
                continue
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                source = state.pop(f"{key}{_INNER_SEP}{name}", None)
                if source is None:
                    raise RuntimeError(f"The checkpoint has no {name!r} data for the int8 tensor {key!r}.")
                getattr(tensor, name).copy_(source)
            state[key] = tensor
