"""Routing statistics of the Mixture of Experts as a torchmetrics ``Metric``: load, cost and gate entropy.

Every state is a sum, so torchmetrics reduces it across processes (``dist_reduce_fx="sum"``) and every rank
computes the same figures; the maths is in two pure functions beside the class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_hybridcomp.moe.gate import routing_mask

__all__ = ["LOG_EPS", "RoutingStatistics"]

LOG_EPS = 1e-12
"""Floor of probabilities before a logarithm, so an all-dropped sample gives a finite loss."""

_COUNT_STATES = ("assigned", "executed")
_SCALAR_STATES = ("samples", "correct", "nll", "entropy", "dropped")


def _routing_update(
    probs: Tensor, indices: Tensor, counts: Tensor, keep: Tensor, log_probs: Tensor, target: Tensor | None
) -> dict[str, Tensor]:
    """The float64 sums one batch adds to each state of :class:`RoutingStatistics`."""
    num_experts = probs.shape[1]
    entropy = -(probs * probs.clamp_min(LOG_EPS).log()).sum(dim=-1)
    zero = torch.zeros((), device=probs.device)
    return {
        "assigned": routing_mask(indices, num_experts).sum(dim=0).double(),
        "executed": counts.double(),
        "samples": torch.tensor(float(probs.shape[0]), dtype=torch.float64, device=probs.device),
        "correct": (
            (log_probs.argmax(dim=-1) == target).sum().float() if target is not None else zero
        ).double(),
        "nll": (F.nll_loss(log_probs, target, reduction="sum") if target is not None else zero).double(),
        "entropy": entropy.sum().double(),
        "dropped": (~keep).sum().double(),
    }


def _routing_compute(states: dict[str, Tensor], expert_macs: Sequence[int], gate_macs: int) -> dict[str, Any]:
    """The routing figures of :class:`RoutingStatistics` from its summed states."""
    assigned, executed = states["assigned"], states["executed"]
    n = assigned.shape[0]
    seen, correct, nll, entropy, dropped = (float(states[key].item()) for key in _SCALAR_STATES)
    samples = max(seen, 1.0)
    load = assigned / assigned.sum().clamp_min(1.0)
    nonzero = load[load > 0]
    return {
        "acc": correct / samples,
        "loss": nll / samples,
        "expected_macs": gate_macs
        + float(sum(executed[i].item() / samples * expert_macs[i] for i in range(n))),
        "routing_entropy": max(0.0, float(-(nonzero * nonzero.log()).sum() / math.log(n))),
        "gate_entropy": entropy / samples,
        "dead_expert_share": float((assigned == 0).sum().item()) / n,
        "dropped_fraction": dropped / max(float(assigned.sum().item()), 1.0),
        "samples": seen,
        "expert_load": [float(v) for v in load.tolist()],
    }


class RoutingStatistics(Metric):
    r"""How a Mixture of Experts routed and what it cost, accumulated over batches and processes.

    :meth:`compute` returns a dict of plain floats:

    * ``expected_macs``: gate MACs + :math:`\sum_i (n_i / n) \cdot \mathrm{MACs}_i`, with :math:`n_i` the
      samples expert :math:`i` ran on and :math:`n` the samples seen;
    * ``expert_load``: list, the share of routing assignments given to each expert (sums to 1);
    * ``routing_entropy``: entropy of those loads divided by :math:`\log N` (1 = balanced, 0 = one expert);
    * ``gate_entropy``: mean entropy (nats) of the router's per-sample probabilities;
    * ``dead_expert_share``: share of experts that received no assignment;
    * ``dropped_fraction``: share of assignments a capacity limit dropped;
    * ``samples``: samples seen;
    * ``acc`` and ``loss``: accuracy and mean NLL of the mixture (0 when no targets were given).

    Every state is a float64 sum (``dist_reduce_fx="sum"``): torchmetrics adds them up across processes
    before :meth:`compute`, so under DDP each rank computes identical figures over all samples.

    Args:
        expert_macs: MACs per sample of each expert.
        gate_macs: MACs per sample of the gate.
        kwargs: passed to :class:`torchmetrics.Metric`, e.g. ``sync_on_compute=False`` for figures of this
            process only.

    Example::

        >>> metric = RoutingStatistics(expert_macs=[100, 300], gate_macs=10)
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
        >>> indices = torch.tensor([[0], [1], [0]])  # top-1 routing
        >>> metric.update(probs, indices, torch.tensor([2, 1]), torch.ones(3, 1, dtype=torch.bool),
        ...               probs.log())
        >>> figures = metric.compute()
        >>> [round(v, 4) for v in figures["expert_load"]], round(figures["expected_macs"], 2)  # 10 + 2/3 100 + 1/3 300
        ([0.6667, 0.3333], 176.67)
        >>> figures["dead_expert_share"], figures["samples"]
        (0.0, 3.0)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, expert_macs: Sequence[int], gate_macs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(expert_macs) < 1:
            raise ValueError(
                f"Expected `expert_macs` to hold one figure per expert, got {list(expert_macs)}."
            )
        self.expert_macs = [int(m) for m in expert_macs]
        self.gate_macs = int(gate_macs)
        for name in _COUNT_STATES:
            self.add_state(
                name, torch.zeros(len(self.expert_macs), dtype=torch.float64), dist_reduce_fx="sum"
            )
        for name in _SCALAR_STATES:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        probs: Tensor,
        indices: Tensor,
        counts: Tensor,
        keep: Tensor,
        log_probs: Tensor,
        target: Tensor | None = None,
    ) -> None:
        """Add one routed batch.

        Args:
            probs: ``[B, N]`` router probabilities.
            indices: ``[B, k]`` chosen experts (before any capacity drop).
            counts: ``[N]`` samples each expert actually ran on.
            keep: ``[B, k]`` bool, ``False`` where a capacity limit dropped the assignment.
            log_probs: ``[B, C]`` log of the mixed class probabilities.
            target: ``[B]`` class labels, or ``None`` for routing figures only.

        Raises:
            ValueError: if ``probs`` or ``counts`` do not cover this metric's experts.
        """
        n = len(self.expert_macs)
        if probs.dim() != 2 or probs.shape[1] != n or counts.shape != (n,):
            raise ValueError(
                f"Expected `probs` of shape [batch, {n}] and `counts` of shape [{n}] (one per expert), got"
                f" {tuple(probs.shape)} and {tuple(counts.shape)}."
            )
        for name, value in _routing_update(probs, indices, counts, keep, log_probs, target).items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> dict[str, Any]:
        """The routing figures over everything added since the last reset (all processes together)."""
        states = {name: getattr(self, name) for name in (*_COUNT_STATES, *_SCALAR_STATES)}
        return _routing_compute(states, self.expert_macs, self.gate_macs)
