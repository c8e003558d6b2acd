"""Sparse per-sample dispatch for the Mixture of Experts: each expert runs once, on exactly its samples.

Pure functions over a routing decision (:class:`~lightning_hybridcomp.moe.gate.TopKGating`), with the dense
loop they are tested against; ``MoELightningModule`` calls them with its experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_hybridcomp.moe.gate import TopKGating, dense_gates
from lightning_hybridcomp.moe.metrics import LOG_EPS
from lightning_hybridcomp.programs import config_values

__all__ = [
    "BucketedExpert",
    "DispatchResult",
    "bucket_size",
    "capacity_keep",
    "dense_dispatch",
    "log_mixture",
    "mix_expert_probabilities",
    "sparse_dispatch",
]

ExpertFn = Callable[[Tensor], Tensor]

#: Dynamo's recompile limit while a bucketed expert runs: above the number of buckets any batch meets.
_MAX_BUCKETS = 64


def bucket_size(n: int) -> int:
    """The sub-batch size a compiled expert runs at for ``n`` samples: the next of 1, 2, 3, 4, 6, 8, 12, 16, ...

    Powers of two and one and a half times them: at most a third of a bucket is padding (a quarter on
    average over uniform sizes, where power-of-two buckets pad up to a half), for about ``2 log2(B)``
    compiled sizes up to a batch of ``B``.

    Example::

        >>> [bucket_size(n) for n in (1, 2, 3, 5, 7, 21, 26, 64)]
        [1, 2, 3, 6, 8, 24, 32, 64]
    """
    if n <= 2:
        return max(n, 1)
    power = 1 << (n - 1).bit_length()  # the next power of two
    return 3 * power // 4 if n <= 3 * power // 4 else power


class BucketedExpert(nn.Module):
    """Runs a compiled expert on sub-batches zero-padded to :func:`bucket_size`, and drops the padding.

    A compiled int8 program is specialised to one batch size (a symbolic batch breaks torch 2.14's int8
    convolution lowering), and sparse dispatch hands each expert a different sub-batch size in every batch:
    unpadded, every new size recompiles, and past Dynamo's recompile limit (8) the expert falls back to
    slow eager int8. With buckets every size compiles once, about ``2 log2(B)`` sizes for batches of ``B``;
    for this expert's calls only, Dynamo's limit is raised to cover every bucket (two per power of two, so
    fewer than 64 below a batch of ``2**31``, also when two bucket rules share one compiled expert), so
    none falls back to eager. :attr:`buckets` holds the sizes it ran at. Rows are independent in eval mode,
    so the real rows' outputs are unchanged.

    Args:
        compiled: the compiled expert (:func:`~lightning_hybridcomp.artifacts.compile_artifact`).
        bucket: the padded size for a sub-batch of ``n`` (at least ``n``), :func:`bucket_size` by default.
    """

    def __init__(self, compiled: nn.Module, bucket: Callable[[int], int] = bucket_size) -> None:
        super().__init__()
        self.compiled = compiled
        self.bucket = bucket
        self.buckets: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        import torch._dynamo.config as dynamo_config

        n = x.shape[0]
        size = self.bucket(n)
        self.buckets.add(size)
        if size != n:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        with config_values(dynamo_config, recompile_limit=max(dynamo_config.recompile_limit, _MAX_BUCKETS)):
            return self.compiled(x)[:n]


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


def mix_expert_probabilities(
    slot_probs: Tensor, weights: Tensor, keep: Tensor | None = None, *, normalise: bool = True
) -> Tensor:
    r"""The MoE's mixture of the chosen experts' class probabilities: ``[B, k, C]`` and ``[B, k]`` to ``[B, C]``.

    :math:`\sum_j w_j q_j / \sum_j w_j` over the kept slots with ``normalise=True`` (a distribution at every
    ``k``: at ``k = 1`` it is the chosen expert's own probabilities), :math:`\sum_j w_j q_j` with
    ``normalise=False`` (the rule of training, where top-1 keeps Switch's raw router probability as the
    weight). A sample whose every slot was dropped by a capacity limit gets an all-zero row either way. The one
    definition of the mixture: the MoE, its dense reference and exported runtimes compute it here.

    Args:
        slot_probs: ``[B, k]`` class probabilities of each sample's chosen experts, ``[B, k, C]``.
        weights: ``[B, k]`` gate weights of those experts.
        keep: ``[B, k]`` bool, the assignments a capacity limit kept; ``None`` for all.
        normalise: divide by the kept weights' sum.

    Example::

        >>> q = torch.tensor([[[1.0, 0.0]]])  # one sample, k = 1, two classes
        >>> mix_expert_probabilities(q, torch.tensor([[0.6]])).tolist()
        [[1.0, 0.0]]
        >>> mix_expert_probabilities(q, torch.tensor([[0.6]]), normalise=False).tolist()
        [[0.6000000238418579, 0.0]]
    """
    if keep is not None:
        weights = weights * keep
    if normalise:
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), weights)
    return (weights.unsqueeze(-1) * slot_probs).sum(dim=1)


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
    x: Tensor,
    gating: TopKGating,
    experts: Sequence[ExpertFn],
    num_classes: int,
    keep: Tensor | None = None,
    *,
    normalise: bool = True,
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
        normalise: mix with normalised weights (:func:`mix_expert_probabilities`).
    """
    routed = gating.indices if keep is None else gating.indices.masked_fill(~keep, -1)
    batch, k = gating.indices.shape
    if batch == 1 and keep is None:
        # One image (the edge device's case): its k experts in turn, without grouping a batch. The same
        # values as the general path, which would run each of them on this one image too.
        chosen = routed[0].tolist()
        slot_probs = torch.stack([experts[e](x).float().softmax(dim=-1) for e in chosen], dim=1)
        counts = torch.bincount(routed[0], minlength=len(experts))
    else:
        slot_probs = x.new_zeros(batch, k, num_classes, dtype=torch.float32)
        counts = torch.bincount(routed[routed >= 0], minlength=len(experts))
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows, slots = (routed == expert).nonzero(as_tuple=True)
            slot_probs[rows, slots] = experts[expert](x[rows]).float().softmax(dim=-1)
    if keep is None:
        keep = torch.ones_like(gating.indices, dtype=torch.bool)
    probs = mix_expert_probabilities(slot_probs, gating.weights, keep, normalise=normalise)
    return DispatchResult(probs=probs, keep=keep, counts=counts)


def log_mixture(probs: Tensor) -> Tensor:
    """The MoE's output: the log of the mixed probabilities (clamped away from zero).

    ``MoELightningModule.forward`` and the ExecuTorch runner (:class:`~lightning_hybridcomp.moe.edge.EdgeMoE`)
    both end here, so they predict alike.
    """
    return probs.clamp_min(LOG_EPS).log()


def dense_dispatch(
    x: Tensor,
    gating: TopKGating,
    experts: Sequence[ExpertFn],
    keep: Tensor | None = None,
    *,
    normalise: bool = True,
) -> Tensor:
    """Reference for :func:`sparse_dispatch`: every expert on every sample, masked with the dense gates.

    Costs all experts on all samples; for tests and benchmarks. Computed independently of
    :func:`mix_expert_probabilities`: the dense gate matrix, renormalised per row with ``normalise=True``.
    """
    weights = gating.weights if keep is None else gating.weights * keep
    if normalise:
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(1e-30), weights)
    gates = dense_gates(TopKGating(gating.indices, weights, gating.probs, gating.logits), len(experts))
    all_probs = torch.stack([expert(x).float().softmax(dim=-1) for expert in experts])
    return torch.einsum("bn,nbc->bc", gates, all_probs)
