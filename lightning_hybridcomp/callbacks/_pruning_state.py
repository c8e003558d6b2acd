"""What a StructuredPruning run has done so far, as it travels in a checkpoint.

Plain values only (lists, ints, strings, CPU tensors), so a checkpoint loads with
``torch.load(weights_only=True)`` and :mod:`~lightning_hybridcomp.callbacks.pruned_checkpoints` can rebuild
the structure from it without the callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch_pruning as tp
from torch import nn

from lightning_hybridcomp.callbacks._pruner import TaylorGradients
from lightning_hybridcomp.callbacks._pruning_utils import PruningRecord, plain_records

__all__ = ["STATE_VERSION", "PruningProgress"]

STATE_VERSION = 1


@dataclass
class PruningProgress:
    """The checkpointed state of one StructuredPruning run.

    Attributes:
        history: torch-pruning's records of every channel removal, in order.
        steps_done: the callback's pruning steps applied.
        pruner_step: torch-pruning's own step counter (several per callback step behind a cost target).
        example_spec: ``(shape, dtype)`` of the example input the dependency graph was traced with.
        initial_cost, cost: ``(MACs, params)`` before the first step and now.
        initial_channels: per layer name, ``[out, in]`` channels of the original network (ratios and
            per-layer caps refer to them after a resume).
        scope_channels: torch-pruning's per-scope initial channel counts (global pruning).
        exhausted: a cost target proved unreachable and pruning stopped.
        summaries: one dict per applied step (see ``StructuredPruning.step_summaries``).
        taylor_gradients: gradient sums since the last step, for Taylor importance.
    """

    history: list[PruningRecord] = field(default_factory=list)
    steps_done: int = 0
    pruner_step: int = 0
    example_spec: tuple[list[int], str] | None = None
    initial_cost: tuple[int, int] | None = None
    cost: tuple[int, int] | None = None
    initial_channels: dict[str, list[int | None]] = field(default_factory=dict)
    scope_channels: dict[str, int] = field(default_factory=dict)
    exhausted: bool = False
    summaries: list[dict[str, Any]] = field(default_factory=list)
    taylor_gradients: TaylorGradients = field(default_factory=TaylorGradients)

    def complete_step(
        self,
        records: list[PruningRecord],
        *,
        epoch: int,
        pruner: tp.pruner.BasePruner,
        cost: tuple[int, int],
        seconds: float,
    ) -> dict[str, Any]:
        """Record one applied step (its ``records``, the pruner's counters, the new cost); returns its summary."""
        assert self.initial_cost is not None
        self.history.extend(records)
        self.steps_done += 1
        self.pruner_step = pruner.current_step
        self.scope_channels = {str(k): int(v) for k, v in pruner._scope_initial_channels.items()}
        self.taylor_gradients = TaylorGradients()
        self.cost = cost
        macs, params = cost
        summary = {
            "step": self.steps_done,
            "epoch": epoch,
            "params": params,
            "macs": macs,
            "params_ratio": params / max(self.initial_cost[1], 1),
            "macs_ratio": macs / max(self.initial_cost[0], 1),
            "seconds": seconds,
        }
        self.summaries.append(summary)
        return summary

    def sync_initial_channels_(self, pruner: tp.pruner.BasePruner, network: nn.Module) -> None:
        """Record a fresh pruner's per-layer initial channels, or give a resumed one the original network's.

        A pruner built on an already pruned network (a resume) would take the pruned widths as the
        originals, so ratios and per-layer caps would shrink; the recorded originals are put back.
        """
        name_of = {m: n for n, m in network.named_modules()}
        if not self.history:
            self.initial_channels = {
                name_of[m]: [pruner.layer_init_out_ch[m], pruner.layer_init_in_ch.get(m)]
                for m in pruner.layer_init_out_ch
                if m in name_of
            }
            return
        for m in list(pruner.layer_init_out_ch):
            saved = self.initial_channels.get(name_of.get(m, ""))
            if saved is not None:
                pruner.layer_init_out_ch[m], pruner.layer_init_in_ch[m] = saved
        pruner._scope_initial_channels = dict(self.scope_channels)

    def state_dict(self, *, network: str, iterative_steps: int) -> dict[str, Any]:
        """The checkpoint form (``network`` and ``iterative_steps`` are recorded beside the progress)."""
        return {
            "version": STATE_VERSION,
            "network": network,
            "history": plain_records(self.history),
            "steps_done": self.steps_done,
            "pruner_step": self.pruner_step,
            "iterative_steps": iterative_steps,
            "example_input_shape": list(self.example_spec[0]) if self.example_spec else None,
            "example_input_dtype": self.example_spec[1] if self.example_spec else None,
            "initial_macs": self.initial_cost[0] if self.initial_cost else None,
            "initial_params": self.initial_cost[1] if self.initial_cost else None,
            "macs": self.cost[0] if self.cost else None,
            "params": self.cost[1] if self.cost else None,
            "initial_channels": {k: list(v) for k, v in self.initial_channels.items()},
            "scope_channels": dict(self.scope_channels),
            "exhausted": self.exhausted,
            "summaries": [dict(s) for s in self.summaries],
            "taylor_gradients": self.taylor_gradients.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PruningProgress:
        """The progress recorded by :meth:`state_dict` (missing keys take their defaults)."""
        shape, dtype = state.get("example_input_shape"), state.get("example_input_dtype")
        progress = cls(
            history=plain_records(state.get("history", [])),
            steps_done=int(state.get("steps_done", 0)),
            pruner_step=int(state.get("pruner_step", 0)),
            example_spec=(list(shape), str(dtype)) if shape is not None and dtype is not None else None,
            initial_channels={k: list(v) for k, v in state.get("initial_channels", {}).items()},
            scope_channels=dict(state.get("scope_channels", {})),
            exhausted=bool(state.get("exhausted", False)),
            summaries=[dict(s) for s in state.get("summaries", [])],
        )
        if state.get("initial_macs") is not None:
            progress.initial_cost = (int(state["initial_macs"]), int(state["initial_params"]))
        if state.get("macs") is not None:
            progress.cost = (int(state["macs"]), int(state["params"]))
        progress.taylor_gradients.load_state_dict(state.get("taylor_gradients", {}))
        return progress
