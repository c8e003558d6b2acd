"""Mixture of Experts over compressed classifiers: a learned top-k gate and sparse per-sample dispatch."""

from lightning_hybridcomp.moe.dispatch import mix_expert_probabilities
from lightning_hybridcomp.moe.gate import (
    Gate,
    GateNetwork,
    TopKGating,
    assignment_loss,
    balanced_assignment,
    dense_gates,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    routing_mask,
    top_k_gate,
    with_other_owners,
)
from lightning_hybridcomp.moe.metrics import RoutingStatistics
from lightning_hybridcomp.moe.module import DispatchResult, MoELightningModule, load_moe

__all__ = [
    "DispatchResult",
    "Gate",
    "GateNetwork",
    "MoELightningModule",
    "RoutingStatistics",
    "TopKGating",
    "assignment_loss",
    "balanced_assignment",
    "dense_gates",
    "importance_loss",
    "load_balancing_loss",
    "load_moe",
    "mix_expert_probabilities",
    "router_z_loss",
    "routing_mask",
    "top_k_gate",
    "with_other_owners",
]
