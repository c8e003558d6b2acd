"""Pruned checkpoints: find the StructuredPruning state in a checkpoint, rebuild the structure, load.

One place for what the callback (resuming and evaluating under a Trainer), :func:`load_pruned_model` and
the MoE's expert loader all do with a checkpoint whose network lost channels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._lightning import (
    device_of,
    init_arguments,
    make_example,
    required_init_parameters,
    resolve_module,
)
from lightning_hybridcomp.callbacks._pruning_utils import (
    APPLIED_HISTORY_ATTR,
    PruningRecord,
    eager_mode,
    plain_records,
    preserved_modes,
    preserved_requires_grad,
    unwrap_compiled,
)

__all__ = [
    "STATE_NAME",
    "apply_state_structure_",
    "apply_structure_",
    "find_pruning_state",
    "load_pruned_model",
    "pruned_model_from_checkpoint",
]

#: The name under which Lightning stores the callback's state in a checkpoint's ``callbacks``.
STATE_NAME = "StructuredPruning"


def apply_structure_(network: nn.Module, history: Sequence[Sequence[Any]], example_inputs: Tensor) -> int:
    """Bring ``network`` to the structure described by ``history``; return how many records were applied.

    Records already applied to this module object are skipped, so calling this twice is harmless.

    Raises:
        RuntimeError: if the network already carries a structure that ``history`` does not extend (it was
            pruned differently, e.g. by a later step than the checkpoint); channels cannot be put back.
        ValueError: if ``history`` names layers the network does not have or channels they do not have
            (the records come from another architecture).
    """
    target = plain_records(history)
    applied: list[PruningRecord] = getattr(network, APPLIED_HISTORY_ATTR, [])
    if target[: len(applied)] != applied:
        raise RuntimeError(
            f"The network already carries {len(applied)} pruning records that the checkpoint's {len(target)}"
            " records do not start with, so its structure cannot be restored in place (removed channels cannot"
            " be put back). Pass a freshly constructed module, or use `load_pruned_model(checkpoint_path, cls)`."
        )
    remaining = target[len(applied) :]
    if not remaining:
        return 0
    layers = dict(network.named_modules())
    unknown = sorted({name for name, _, _ in remaining if name not in layers})
    if unknown:
        raise ValueError(
            f"The checkpoint's pruning records name layers that {type(network).__name__} does not have"
            f" ({unknown[:5]}): it was written for another architecture."
        )
    with preserved_modes(network), preserved_requires_grad(network), eager_mode():
        graph = tp.DependencyGraph().build_dependency(network, example_inputs=example_inputs, verbose=False)
        try:
            graph.load_pruning_history(copy.deepcopy(remaining))
        except (IndexError, RuntimeError, KeyError, AttributeError) as err:
            raise ValueError(
                f"The checkpoint's pruning records do not fit {type(network).__name__} (a record removes"
                f" channels its layer does not have): it was written for another architecture or width."
                f" {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            ) from err
    for p in network.parameters():
        p.grad = None
    setattr(network, APPLIED_HISTORY_ATTR, applied + remaining)
    return len(remaining)


def apply_state_structure_(model: nn.Module, state: Mapping[str, Any]) -> int:
    """Give ``model`` the structure a StructuredPruning ``state`` records; returns the records applied.

    The pruned submodule is the one the state names (``""``: ``model`` itself), traced with the example
    shape and dtype the state recorded. Records the network already carries are not applied again.
    """
    history = state.get("history") or []
    if not history:
        return 0
    network = unwrap_compiled(resolve_module(model, state.get("network", ""), arg_name="network"))
    example = make_example(state["example_input_shape"], state["example_input_dtype"], device_of(network))
    return apply_structure_(network, history, example)


def find_pruning_state(checkpoint: Any) -> dict[str, Any] | None:
    """The :class:`StructuredPruning` state a loaded checkpoint carries, or ``None`` (also for non-dicts)."""
    if not isinstance(checkpoint, Mapping):
        return None
    callbacks = checkpoint.get("callbacks") or {}
    for key, value in callbacks.items():
        if isinstance(key, str) and key.split("{", 1)[0] == STATE_NAME:
            return value
    return None


def load_pruned_model(
    checkpoint_path: str | Path,
    module: type[pl.LightningModule] | nn.Module,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a pruned model from a checkpoint written during a run with :class:`StructuredPruning`.

    The checkpoint is read with ``torch.load(weights_only=True)``; the structure is replayed from the
    pruning records it carries, then the weights are loaded and the model is put in eval mode.

    Args:
        checkpoint_path: a Lightning checkpoint written by a Trainer that had ``StructuredPruning``.
        module: the LightningModule class (built as ``cls(**checkpoint["hyper_parameters"])``, as Lightning's
            ``load_from_checkpoint`` builds it: a class with ``__init__`` arguments must call
            ``save_hyperparameters()``), or a freshly constructed instance of the original architecture.
        map_location: where to load the tensors.

    Returns:
        The pruned model with the checkpoint's weights, in eval mode.

    Raises:
        ValueError: if the file is missing, unreadable with ``weights_only=True`` or corrupt; if it carries no
            StructuredPruning state; if a class with required ``__init__`` arguments is given but the checkpoint has
            no hyper-parameters; or if it
            was written for another architecture (its records or weights do not fit ``module``).
        TypeError: if ``module`` is neither an ``nn.Module`` instance nor a LightningModule class.

    Example::

        >>> model = load_pruned_model("checkpoints/last.ckpt", MyLitModel)  # doctest: +SKIP
        >>> model(torch.randn(1, 3, 32, 32))  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(checkpoint_path, what="`checkpoint_path`", map_location=map_location)
    return pruned_model_from_checkpoint(
        checkpoint, module, source=str(checkpoint_path), map_location=map_location
    )


def pruned_model_from_checkpoint(
    checkpoint: Any,
    module: type[pl.LightningModule] | nn.Module,
    *,
    source: str,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """:func:`load_pruned_model` on a checkpoint already read with ``torch.load(weights_only=True)``.

    Args:
        checkpoint: the loaded checkpoint.
        module: as for :func:`load_pruned_model`.
        source: the checkpoint's file, for error messages.
        map_location: where the model's tensors go.
    """
    state = find_pruning_state(checkpoint)
    if state is None:
        raise ValueError(
            f"Expected `checkpoint_path` to point to a checkpoint written with the StructuredPruning callback, but"
            f" {source!r} has no StructuredPruning state. Load an unpruned checkpoint with"
            " `YourModule.load_from_checkpoint`."
        )
    if isinstance(module, type):
        if not issubclass(module, pl.LightningModule):
            raise TypeError(
                f"Expected `module` to be a LightningModule class or an instance, got class {module.__name__}."
            )
        hparams = checkpoint.get("hyper_parameters")
        required = required_init_parameters(module)
        if hparams is None and required:
            # Lightning writes no hyper-parameters for a module without __init__ arguments; one that has
            # arguments without defaults cannot be built from the checkpoint alone.
            raise ValueError(
                f"Expected the checkpoint to hold `hyper_parameters` to construct {module.__name__}, which requires"
                f" {required}, found none: call `self.save_hyperparameters()` in its __init__, or pass a"
                " constructed instance as `module`."
            )
        model: nn.Module = module(**init_arguments(hparams))
    elif isinstance(module, nn.Module):
        model = module
    else:
        raise TypeError(
            f"Expected `module` to be a LightningModule class or an nn.Module, got {type(module).__name__}."
        )
    model.to(map_location)
    apply_state_structure_(model, state)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:600]
        raise ValueError(
            f"The weights in {source!r} do not fit {type(model).__name__} after its pruning"
            f" records were replayed: the checkpoint was written for another architecture. {detail}"
        ) from err
    return model.eval()
