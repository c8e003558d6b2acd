"""What StructuredPruning asks of torch-pruning: build a pruner, step it to a cost, try a whole schedule.

The callback decides *when* (epochs, resume, DDP agreement, optimizers); this module holds *how*, on any
network, with no Lightning state: the settings, the pruner they build, pruning down to a MACs or
parameter fraction, and the trial run that refuses a network torch-pruning cannot handle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_hybridcomp._lightning import TimeLimitExceeded, copy_network, time_limit, training_mode
from lightning_hybridcomp.callbacks._pruning_utils import (
    AgreedImportance,
    eager_mode,
    make_importance,
    output_layers,
    preserved_modes,
    preserved_requires_grad,
    pruner_class,
)
from lightning_hybridcomp.profiling import count_macs_and_params

__all__ = ["MICRO_STEPS", "PrunerSettings", "TaylorGradients", "TrialFailure"]

# torch-pruning steps behind a cost target or a global ranking: each removes about 1% of the channels, so
# a cost target is met to within that, and a layer exceeds `max_layer_ratio` by at most that (torch-pruning
# checks the cap before a step, not within it).
MICRO_STEPS = 100
_ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM)


class TrialFailure(Exception):
    """A trial run failed; ``stage`` says where and ``__cause__`` is torch-pruning's error."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage

    def as_value_error(self, what: str) -> ValueError:
        """The error a user sees: ``what`` failed, at which stage, torch-pruning's reason, what to change."""
        cause = self.__cause__
        reason = " ".join(str(cause).split())[:300] or "no message"
        return ValueError(
            f"{what}: a trial run failed while {self.stage} ({type(cause).__name__}: {reason}). {self.hint()}."
            " Nothing was trained or changed."
        )

    def hint(self) -> str:
        """What a user can change, for this stage and cause."""
        if isinstance(self.__cause__, TimeLimitExceeded):
            return (
                "torch-pruning cannot trace this network's dependencies in reasonable time (seen with shifted"
                " window attention, e.g. Swin). Prune a convolutional part with `network=...`, or raise"
                " `StructuredPruning.graph_time_limit` if the network is only very large"
            )
        if self.stage == "running the pruned network":
            return (
                "The forward still expects the old widths: it reads a size stored at construction (e.g."
                " `hidden_dim` of vision transformers) that removing channels does not update. Keep those"
                " layers in `ignored_layers`, or prune a submodule whose forward reads only tensor shapes"
            )
        return (
            "torch-pruning cannot follow one of its operations (seen with channel shuffles, e.g."
            " ShuffleNet). Add the layers around that operation to `ignored_layers`, or prune a submodule"
            " with `network=...`"
        )


@dataclass(frozen=True)
class PrunerSettings:
    """The torch-pruning side of a StructuredPruning configuration.

    Attributes:
        importance: an importance name or a torch-pruning ``Importance``.
        pruner: the pruner name (``"base"`` or a regularising one).
        iterative_steps: the callback's number of steps.
        channel_ratio: fraction of channels removed, when no cost target is set.
        cost_target: ``("macs" | "params", fraction kept)``, or ``None``.
        global_pruning, round_to, max_layer_ratio, regularization, keep_output_layers: as the callback's
            arguments of the same names.
    """

    importance: str | tp.importance.Importance
    pruner: str
    iterative_steps: int
    channel_ratio: float | None
    cost_target: tuple[str, float] | None
    global_pruning: bool
    round_to: int | None
    max_layer_ratio: float
    regularization: float | None
    keep_output_layers: bool

    @property
    def micro_steps(self) -> int:
        """torch-pruning steps over the whole schedule."""
        if self.cost_target is not None:
            return MICRO_STEPS
        if self.global_pruning:
            return self.iterative_steps * math.ceil(MICRO_STEPS / self.iterative_steps)
        return self.iterative_steps

    @property
    def pruner_ratio(self) -> float:
        """torch-pruning's final channel ratio; per-layer ranking is clamped to the per-layer cap."""
        final = 1.0 if self.cost_target is not None else float(self.channel_ratio or 0.0)
        return final if self.global_pruning else min(final, self.max_layer_ratio)

    def build(
        self,
        network: nn.Module,
        example: Tensor,
        ignored: list[nn.Module],
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[tp.pruner.BasePruner, AgreedImportance | None]:
        """torch-pruning's pruner over ``network``; with ``reduce`` its importance is agreed over ranks."""
        with preserved_modes(network), preserved_requires_grad(network), eager_mode():
            ignored = list(ignored)
            if self.keep_output_layers:
                graph = tp.DependencyGraph().build_dependency(
                    network, example_inputs=(example,), verbose=False
                )
                ignored += [m for m in output_layers(graph, _ROOT_TYPES) if m not in ignored]
            importance: Any = (
                make_importance(self.importance) if isinstance(self.importance, str) else self.importance
            )
            agreement = None
            if reduce is not None:
                agreement = AgreedImportance(importance, reduce)
                importance = agreement
            kwargs: dict[str, Any] = {
                "importance": importance,
                "global_pruning": self.global_pruning,
                "pruning_ratio": self.pruner_ratio,
                "iterative_steps": self.micro_steps,
                "ignored_layers": ignored,
                "round_to": self.round_to,
                "max_pruning_ratio": self.max_layer_ratio,
            }
            if self.regularization is not None:
                kwargs["reg"] = self.regularization
            pruner = pruner_class(self.pruner)(network, (example,), **kwargs)
        return pruner, agreement

    def advance(
        self,
        pruner: tp.pruner.BasePruner,
        network: nn.Module,
        example: Tensor,
        step: int,
        initial_cost: tuple[int, int],
    ) -> float | None:
        """Apply the callback's ``step`` (1-based) of :attr:`iterative_steps` with ``pruner``.

        A channel ratio advances torch-pruning's own schedule to the step's share; a cost target prunes
        until ``1 - (1 - kept) * step / iterative_steps`` of the ``initial_cost`` (MACs, params) is left.
        Returns ``None``, or the cost ratio where a cost target ran out of channels.
        """
        if self.cost_target is None:
            until = step * pruner.iterative_steps // self.iterative_steps
            while pruner.current_step < until:
                pruner.step()
            return None
        kind, kept = self.cost_target
        fraction = 1.0 - (1.0 - kept) * step / self.iterative_steps
        initial = initial_cost[0] if kind == "macs" else initial_cost[1]
        return self.prune_to_cost(pruner, network, example, initial, kind, fraction)

    def prune_to_cost(
        self,
        pruner: tp.pruner.BasePruner,
        network: nn.Module,
        example: Tensor,
        initial: int,
        kind: str,
        fraction: float,
    ) -> float | None:
        """Step ``pruner`` until the ``kind`` cost is at most ``fraction`` of ``initial``.

        Returns ``None`` when the target was met, else the cost ratio where the pruner ran out of channels.
        """
        if not self.global_pruning:
            # With the same ratio r in every layer, MACs and params shrink at most like (1 - r)^2, so
            # 1 - sqrt(fraction) is a lower bound of the ratio needed; jumping to 80% of it skips most
            # micro-steps without overshooting. (Global ranking has no such bound: it steps all the way.)
            bound = 1.0 - math.sqrt(fraction)
            jump = min(int(0.8 * bound / self.pruner_ratio * pruner.iterative_steps), pruner.iterative_steps)
            if jump > pruner.current_step + 1:
                pruner.current_step = jump - 1
                pruner.step()
        while True:
            macs, params = count_macs_and_params(network, example[:1])
            value = macs if kind == "macs" else params
            if value <= fraction * initial:
                return None
            if pruner.current_step >= pruner.iterative_steps:
                return value / max(initial, 1)
            pruner.step()

    def trial(
        self,
        network: nn.Module,
        example: Tensor,
        ignored: list[nn.Module],
        *,
        taylor: bool,
        graph_seconds: float | None,
        check: Callable[[tp.pruner.BasePruner], None],
    ) -> nn.Module:
        """Prune a copy of ``network`` through the whole schedule at once and run its forward once.

        ``ignored`` are modules of ``network``; ``check`` sees the pruner before any channel goes (the
        callback's own configuration errors propagate from it unchanged).

        Raises:
            TrialFailure: from torch-pruning's error, with the stage that failed.
        """
        trial = copy_network(network)
        copy_of = dict(zip(network.modules(), trial.modules()))
        stage = "building the dependency graph"
        try:
            with time_limit(graph_seconds, "building torch-pruning's dependency graph"):
                pruner, _ = self.build(trial, example, [copy_of[m] for m in ignored])
        except Exception as err:  # torch-pruning raises anything from ZeroDivisionError to AssertionError
            raise TrialFailure(stage) from err
        check(pruner)
        try:
            stage = "removing channels"
            with preserved_modes(trial), preserved_requires_grad(trial), eager_mode():
                if taylor:
                    trial.zero_grad()
                    trial(example).float().sum().backward()
                if self.cost_target is None:
                    while pruner.current_step < pruner.iterative_steps:
                        pruner.step()
                else:
                    kind, target = self.cost_target
                    initial = count_macs_and_params(trial, example[:1])[0 if kind == "macs" else 1]
                    self.prune_to_cost(pruner, trial, example, initial, kind, target)
                for p in trial.parameters():
                    p.grad = None
                stage = "running the pruned network"
                with torch.no_grad(), training_mode(trial, False):
                    trial(example)
        except Exception as err:
            raise TrialFailure(stage) from err
        return trial


class TaylorGradients:
    """Sums of the gradients of every training batch since the last step, for Taylor importance.

    torch-pruning's Taylor importance reads ``p.grad``; by the time a step runs (the start of an epoch) the
    optimizer has consumed them, so the sums are kept here, checkpointed with the callback, and put back
    into ``p.grad`` just before the step.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}

    def accumulate(self, network: nn.Module) -> None:
        """Add the network's current gradients to the sums."""
        for name, p in network.named_parameters():
            if p.grad is None:
                continue
            grad = p.grad.detach()
            acc = self.sums.get(name)
            if acc is None or acc.shape != grad.shape:
                self.sums[name] = grad.clone()
            else:
                # Sums restored from a checkpoint live on the CPU.
                self.sums[name] = acc.to(grad.device).add_(grad)

    def install(self, network: nn.Module) -> None:
        """Write the sums into ``p.grad`` of every parameter (zeros where none was recorded)."""
        if not self.sums:
            raise RuntimeError(
                "StructuredPruning: Taylor importance needs gradients from training batches before the step, but"
                " none were recorded since the previous step (no optimizer step ran). Start pruning later or pick"
                " another `importance`."
            )
        for name, p in network.named_parameters():
            grad = self.sums.get(name)
            if grad is not None and grad.shape == p.shape:
                p.grad = grad.to(device=p.device, dtype=p.dtype)
            else:
                # Frozen parameters have no gradient; count their Taylor contribution as zero.
                p.grad = torch.zeros_like(p)

    def state_dict(self) -> dict[str, Tensor]:
        """The sums on the CPU, for a checkpoint."""
        return {k: v.detach().cpu() for k, v in self.sums.items()}

    def load_state_dict(self, sums: dict[str, Tensor]) -> None:
        """Restore the sums of :meth:`state_dict`."""
        self.sums = dict(sums)
