"""Sparse per-sample dispatch for the Mixture of Experts: each expert runs once, on exactly its samples.

Pure functions over a routing decision (:class:`~lightning_hybridcomp.moe.gate.TopKGating`), with the dense
loop they are tested against; ``MoELightningModule`` calls them with its experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_hybridcomp.moe.gate import TopKGating, dense_gates
from lightning_hybridcomp.moe.metrics import LOG_EPS

__all__ = ["DispatchResult", "capacity_keep", "dense_dispatch", "log_mixture", "sparse_dispatch"]

ExpertFn = Callable[[Tensor], Tensor]


class DispatchResult(NamedTuple):
    """What the sparse dispatch computed for one batch.

    Attributes:
        probs: ``[B, C]`` mixed class probabilities (``sum_j w_j * softmax(expert_j(x))`` over kept slots).
        keep: ``[B, k]`` bool, ``False`` where a capacity limit dropped the assignment.
        counts: ``[N]`` int64, samples each expert actually ran on.
    """

    probs: Tensor
    keep: Tensor
    counts: Tensor


def capacity_keep(gating: TopKGating, num_experts: int, capacity_factor: float) -> Tensor:
    """``[B, k]`` bool mask of the assignments kept when each expert takes ``ceil(factor * B * k / N)`` at most.

    The assignments with the highest gate weights stay; ties go to the earlier sample.

    Example::

        >>> from lightning_hybridcomp.moe.gate import top_k_gate
        >>> gating = top_k_gate(torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [2.5, 0.0, 0.0]]), k=1)
        >>> capacity_keep(gating, num_experts=3, capacity_factor=2.0).squeeze(1).tolist()  # 2 per expert
        [False, True, True]
    """
    batch, k = gating.indices.shape
    capacity = max(1, math.ceil(capacity_factor * batch * k / num_experts))
    keep = torch.ones_like(gating.indices, dtype=torch.bool)
    weights = gating.weights.detach()
    for expert in range(num_experts):
        rows, slots = (gating.indices == expert).nonzero(as_tuple=True)
        if rows.numel() > capacity:
            # Highest gate weights stay; the stable sort breaks ties by sample order.
            order = torch.sort(weights[rows, slots], descending=True, stable=True).indices
            drop = order[capacity:]
            keep[rows[drop], slots[drop]] = False
    return keep


def sparse_dispatch(
    x: Tensor, gating: TopKGating, experts: Sequence[ExpertFn], num_classes: int, keep: Tensor | None = None
) -> DispatchResult:
    """Run each expert once, on exactly the samples routed to it, and mix their probabilities.

    Expert outputs are written into a ``[B, k, C]`` tensor by index assignment (every ``(sample, slot)``
    pair is written once, so no order-dependent accumulation) and reduced with the gate weights.

    Args:
        x: ``[B, *input_shape]`` images.
        gating: the routing decision.
        experts: one callable per expert, images to ``[b, num_classes]`` logits.
        num_classes: width of the experts' logits.
        keep: ``[B, k]`` assignments a capacity limit kept (:func:`capacity_keep`), ``None`` for all.
    """
    routed = gating.indices if keep is None else gating.indices.masked_fill(~keep, -1)
    batch, k = gating.indices.shape
    slot_probs = x.new_zeros(batch, k, num_classes, dtype=torch.float32)
    counts = torch.bincount(routed[routed >= 0], minlength=len(experts))
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows, slots = (routed == expert).nonzero(as_tuple=True)
        slot_probs[rows, slots] = experts[expert](x[rows]).float().softmax(dim=-1)
    probs = (gating.weights.unsqueeze(-1) * slot_probs).sum(dim=1)
    if keep is None:
        keep = torch.ones_like(gating.indices, dtype=torch.bool)
    return DispatchResult(probs=probs, keep=keep, counts=counts)


def log_mixture(probs: Tensor) -> Tensor:
    """The MoE's output: the log of the mixed probabilities (clamped away from zero).

    ``MoELightningModule.forward`` and the ExecuTorch runner (:class:`~lightning_hybridcomp.moe.edge.EdgeMoE`)
    both end here, so they predict alike.
    """
    return probs.clamp_min(LOG_EPS).log()


def dense_dispatch(
    x: Tensor, gating: TopKGating, experts: Sequence[ExpertFn], keep: Tensor | None = None
) -> Tensor:
    """Reference for :func:`sparse_dispatch`: every expert on every sample, masked with the dense gates.

    Costs all experts on all samples; for tests and benchmarks.
    """
    weights = gating.weights if keep is None else gating.weights * keep
    gates = dense_gates(TopKGating(gating.indices, weights, gating.probs, gating.logits), len(experts))
    all_probs = torch.stack([expert(x).float().softmax(dim=-1) for expert in experts])
    return torch.einsum("bn,nbc->bc", gates, all_probs)
