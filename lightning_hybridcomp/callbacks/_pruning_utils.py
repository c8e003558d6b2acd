"""Private building blocks of :class:`StructuredPruning`: torch-pruning factories and structure replay.

Kept apart from the callback so that the pieces that touch torch-pruning internals are small, named
and testable on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

# A pruning record as torch-pruning writes it: (root module name, out-channel pruning?, indices).
PruningRecord = list[Any]

IMPORTANCE_NAMES = ("l1", "l2", "taylor", "bn_scale", "lamp", "fpgm", "random")
PRUNER_NAMES = ("base", "group_norm", "bn_scale", "growing_reg")
REGULARIZING_PRUNERS = ("group_norm", "bn_scale", "growing_reg")

# Attribute set on a pruned network that says which records were applied to this very module object,
# so that no code path (resume, test after fit, a second callback) can apply a record twice.
APPLIED_HISTORY_ATTR = "_hybridcomp_pruning_history"


def make_importance(name: str) -> tp.importance.Importance:
    """A torch-pruning importance criterion from its short name (case-insensitive)."""
    key = name.lower()
    factories: dict[str, Callable[[], tp.importance.Importance]] = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }
    return factories[key]()


def pruner_class(name: str) -> type[tp.pruner.BasePruner]:
    """The torch-pruning pruner class for a short name (case-insensitive)."""
    classes: dict[str, type[tp.pruner.BasePruner]] = {
        "base": tp.pruner.BasePruner,
        "group_norm": tp.pruner.GroupNormPruner,
        "bn_scale": tp.pruner.BNScalePruner,
        "growing_reg": tp.pruner.GrowingRegPruner,
    }
    return classes[name.lower()]


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (the module itself otherwise)."""
    orig = getattr(module, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else module


@contextlib.contextmanager
def eager_mode() -> Iterator[None]:
    """Run compiled code eagerly, so that graph tracing sees every layer and hook."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6 has no stance; compiled wrappers then trace as compiled
        yield
        return
    with set_stance("force_eager"):
        yield


@contextlib.contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore the train/eval flag of every submodule on exit.

    torch-pruning switches the whole network to eval mode when it traces it, and Lightning does not
    switch back at the next epoch, so BatchNorm and dropout would silently stay in eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def preserved_requires_grad(module: nn.Module) -> Iterator[None]:
    """Restore ``requires_grad`` by parameter name on exit: pruned parameters are new, trainable objects."""
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    try:
        yield
    finally:
        for name, p in module.named_parameters():
            if name in flags and p.requires_grad != flags[name]:
                p.requires_grad_(flags[name])


def output_layers(graph: tp.DependencyGraph, root_types: Sequence[type]) -> list[nn.Module]:
    """Layers whose output channels are the network's outputs (e.g. the classifier head).

    Walks back from the graph's sinks through channel-preserving nodes (activations, normalisation,
    reshapes, additions, concatenations) and stops at the first layer of a root type on each path.
    """
    sinks = [node for node in graph.module2node.values() if not node.outputs]
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = list(sinks)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        module = node.module
        if isinstance(module, nn.Module) and isinstance(module, tuple(root_types)):
            if module not in found:
                found.append(module)
            continue
        stack.extend(node.inputs)
    return found


def prunable_groups(pruner: tp.pruner.BasePruner) -> list[Any]:
    """The dependency groups the pruner may remove channels from (ignored layers excluded)."""
    return list(
        pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
    )


def plain_records(records: Sequence[Sequence[Any]]) -> list[PruningRecord]:
    """Pruning records as plain Python values (safe for ``torch.load(weights_only=True)``)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in records]


class ParameterSlicing:
    """Records how each parameter was sliced during a pruning step, to slice optimizer state the same way.

    torch-pruning creates every pruned parameter in ``BasePruningFunc._prune_parameter_and_grad`` (also the
    place that slices ``.grad``). Wrapping that one method for the duration of a step gives, for every
    original parameter, the exact sequence of ``index_select`` calls, whatever the layer type.
    """

    def __init__(self) -> None:
        self._root_of: dict[int, Tensor] = {}
        self._ops: dict[int, list[tuple[int, list[int]]]] = {}
        self._final: dict[int, Tensor] = {}
        self._alive: list[Tensor] = []  # keep ids unique while recording
        self._original: Any = None

    def __enter__(self) -> ParameterSlicing:
        base = tp.pruner.function.BasePruningFunc
        self._original = base._prune_parameter_and_grad
        original = self._original
        recorder = self

        def recording(func_self: Any, weight: Tensor, keep_idxs: Sequence[int], pruning_dim: int) -> Tensor:
            new = original(func_self, weight, keep_idxs, pruning_dim)
            recorder._record(weight, new, pruning_dim, keep_idxs)
            return new

        base._prune_parameter_and_grad = recording
        return self

    def __exit__(self, *exc: object) -> None:
        tp.pruner.function.BasePruningFunc._prune_parameter_and_grad = self._original

    def _record(self, old: Tensor, new: Tensor, dim: int, keep_idxs: Sequence[int]) -> None:
        root = self._root_of.get(id(old), old)
        self._ops.setdefault(id(root), []).append((dim, [int(i) for i in keep_idxs]))
        self._root_of[id(new)] = root
        self._final[id(root)] = new
        self._alive.extend((old, new))

    def was_sliced(self, param: Tensor) -> bool:
        return id(param) in self._ops

    def slice_like(self, param: Tensor, value: Tensor) -> Tensor | None:
        """``value`` (shaped like the original ``param``) sliced as ``param`` was; ``None`` if not possible."""
        if tuple(value.shape) != tuple(param.shape):
            return None
        out = value
        for dim, keep in self._ops.get(id(param), []):
            out = out.index_select(dim, torch.tensor(keep, device=out.device, dtype=torch.long))
        return out

    def carry_optimizer_state_(
        self, by_name: dict[str, dict[str, Any]], params_by_name: Mapping[str, Tensor]
    ) -> None:
        """Slice captured per-name optimizer state to the surviving channels, in place.

        ``by_name`` maps parameter names to ``{"shape": ..., "state": {...}}`` as
        :class:`TrainingStateSnapshot` captures them; ``params_by_name`` gives the *original* parameter
        objects. State tensors shaped like the parameter (momentum, Adam moments) are sliced; scalars (the
        step count) are kept; an entry holding any other shape is dropped, so that parameter starts afresh.
        """
        for name in list(by_name):
            param = params_by_name.get(name)
            if param is None or not self.was_sliced(param):
                continue
            new_state: dict[str, Any] = {}
            for key, value in by_name[name]["state"].items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    sliced = self.slice_like(param, value)
                    if sliced is None:
                        del by_name[name]
                        break
                    new_state[key] = sliced
                else:
                    new_state[key] = value
            else:
                by_name[name] = {"shape": tuple(self._final[id(param)].shape), "state": new_state}


class AgreedImportance(tp.importance.Importance):
    """Averages an importance criterion's scores over all processes while ``active``.

    Under DDP each rank scores channels on its own (Taylor on local gradients, random on its own
    generator); averaging the scores with an all-reduce makes every rank take the same decision.
    """

    def __init__(self, inner: Any, reduce: Callable[[Tensor], Tensor]) -> None:
        self.inner = inner
        self.reduce = reduce
        self.active = False

    def __call__(self, group: Any) -> Tensor | None:
        scores = self.inner(group)
        if scores is None or not self.active:
            return scores
        return self.reduce(scores.detach().float().contiguous())
