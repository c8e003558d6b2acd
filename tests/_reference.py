"""Independent reference figures for the tests: MACs counted layer by layer from forward hooks.

The package counts MACs with PyTorch's FLOP counter on whatever the forward dispatches; this counts them
from the shapes each Conv/Linear layer sees, the textbook way, so that the two can be checked against
each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def reference_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of Conv and Linear layers for ``example`` (per sample for a batch of one)."""
    total = 0

    def conv(module: nn.modules.conv._ConvNd, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += out.numel() * fan_in

    def linear(module: nn.Linear, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += out.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def reference_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
