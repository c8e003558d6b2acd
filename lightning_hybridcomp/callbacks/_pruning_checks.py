"""The checks StructuredPruning runs on its arguments (at construction) and on the Trainer (at ``setup``).

Each raises one ``ValueError``/``TypeError`` that names the argument, what was expected and what to change,
before anything is pruned or trained.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_hybridcomp._lightning import refuse_spawning_strategy
from lightning_hybridcomp._validation import (
    expect_bool,
    expect_choice,
    expect_int,
    expect_names,
    expect_ratio,
    expect_shape,
    is_number,
)
from lightning_hybridcomp.callbacks._pruning_utils import (
    APPLIED_HISTORY_ATTR,
    IMPORTANCE_NAMES,
    PRUNER_NAMES,
    REGULARIZING_PRUNERS,
    PruningRecord,
)

__all__ = [
    "TARGETS",
    "CheckedArguments",
    "check_arguments",
    "check_history",
    "check_ranks_agree",
    "check_schedule",
    "check_trainer",
]

#: What ``pruning_ratio`` is a fraction of: channels removed per layer, or MACs / parameters removed.
TARGETS = ("channels", "macs", "params")


class CheckedArguments(NamedTuple):
    """The constructor arguments that validation normalises (lower-cased names, lists, the Taylor flag)."""

    target: str
    importance: str | tp.importance.Importance
    pruner: str
    ignored_layers: list[str]
    example_input_shape: list[int] | None
    taylor: bool


def check_arguments(
    *,
    pruning_ratio: Any,
    target: Any,
    iterative_steps: Any,
    start_epoch: Any,
    epochs_between_steps: Any,
    importance: Any,
    pruner: Any,
    regularization: Any,
    global_pruning: Any,
    network: Any,
    ignored_layers: Any,
    keep_output_layers: Any,
    round_to: Any,
    max_layer_ratio: Any,
    example_input_shape: Any,
    verbose: Any,
) -> CheckedArguments:
    """Validate every StructuredPruning argument; see the class docstring for their meaning."""
    kind = expect_choice(
        target,
        "target",
        TARGETS,
        hint="`pruning_ratio` is the fraction of channels (per layer), MACs or parameters removed.",
    )
    expect_ratio(
        pruning_ratio,
        "pruning_ratio",
        closed_low=True,
        closed_high=False,
        hint=f"It is the fraction of {'channels' if kind == 'channels' else 'the original ' + kind} removed:"
        " for example 0.7 keeps 30%.",
    )
    expect_int(iterative_steps, "iterative_steps", low=1)
    expect_int(start_epoch, "start_epoch")
    expect_int(epochs_between_steps, "epochs_between_steps", low=1)
    if isinstance(importance, str):
        if importance.lower() not in IMPORTANCE_NAMES:
            raise ValueError(
                f"Expected `importance` to be a torch-pruning Importance instance or one of {IMPORTANCE_NAMES},"
                f" got {importance!r}."
            )
    elif not isinstance(importance, tp.importance.Importance):
        raise TypeError(
            f"Expected `importance` to be a name or a `torch_pruning.importance.Importance` instance, got"
            f" {type(importance).__name__}."
        )
    pruner_name = expect_choice(pruner, "pruner", PRUNER_NAMES)
    if regularization is not None:
        if pruner_name not in REGULARIZING_PRUNERS:
            raise ValueError(
                f"Expected `regularization` to be None for pruner {pruner!r}, got {regularization!r}. Sparsity"
                f" regularisation needs one of the pruners {REGULARIZING_PRUNERS}."
            )
        if not (is_number(regularization) and regularization > 0):
            raise ValueError(f"Expected `regularization` to be a positive float, got {regularization!r}.")
    expect_bool(global_pruning, "global_pruning")
    if not isinstance(network, str):
        raise TypeError(
            f"Expected `network` to be the fully qualified name of a submodule (a str, '' for the whole"
            f" LightningModule), got {type(network).__name__}. Layers are selected by name, not by object."
        )
    ignored = expect_names(ignored_layers, "ignored_layers", example="['net.fc', 'net.layer4.*']")
    expect_int(round_to, "round_to", low=1, optional=True)
    expect_ratio(max_layer_ratio, "max_layer_ratio")
    shape = expect_shape(example_input_shape, "example_input_shape")
    expect_bool(keep_output_layers, "keep_output_layers")
    expect_bool(verbose, "verbose")
    taylor = (isinstance(importance, str) and importance.lower() == "taylor") or isinstance(
        importance, tp.importance.GroupTaylorImportance
    )
    if taylor and start_epoch == 0:
        raise ValueError(
            "Expected `start_epoch` >= 1 with Taylor importance, got 0: Taylor scores need the gradients of at"
            " least one epoch of training before the first step."
        )
    return CheckedArguments(
        target=kind,
        importance=importance.lower() if isinstance(importance, str) else importance,
        pruner=pruner_name,
        ignored_layers=ignored,
        example_input_shape=shape,
        taylor=taylor,
    )


def check_trainer(trainer: pl.Trainer, stage: str) -> None:
    """Refuse Lightning's ``ModelPruning`` beside StructuredPruning, and process-spawning strategies."""
    from lightning.pytorch.callbacks import ModelPruning

    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    if any(isinstance(cb, ModelPruning) for cb in callbacks):
        raise ValueError(
            "Expected `callbacks` not to contain Lightning's `ModelPruning` together with StructuredPruning:"
            " ModelPruning masks weights by parameter object and would keep masking the removed tensors."
            " Use one of the two."
        )
    refuse_spawning_strategy(trainer, stage, "unpruned model, which cannot hold them")


def check_schedule(
    trainer: pl.Trainer, schedule: list[int], *, start_epoch: int, epochs_between_steps: int
) -> None:
    """Refuse a schedule whose last step falls at or after ``max_epochs``; warn when it leaves few epochs."""
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or not schedule:
        return
    last = schedule[-1]
    if last >= max_epochs:
        raise ValueError(
            f"Expected the pruning schedule to end before `max_epochs`={max_epochs}, but the last of"
            f" `iterative_steps`={len(schedule)} steps (`start_epoch`={start_epoch},"
            f" `epochs_between_steps`={epochs_between_steps}) falls at epoch {last}. Lower the steps or"
            f" raise max_epochs to at least {last + 1 + epochs_between_steps} to leave recovery epochs."
        )
    if last + epochs_between_steps > max_epochs:
        rank_zero_warn(
            f"StructuredPruning: the last step (epoch {last}) leaves {max_epochs - last} fine-tuning epochs,"
            f" fewer than the {epochs_between_steps} between steps."
        )


def check_history(network: nn.Module, history: list[PruningRecord]) -> None:
    """Refuse a network that carries other pruning records than the callback's state (reuse, or pruned elsewhere)."""
    applied = getattr(network, APPLIED_HISTORY_ATTR, [])
    if applied != history:
        raise RuntimeError(
            f"The network carries {len(applied)} pruning records but this StructuredPruning state holds"
            f" {len(history)}: the callback was already used for another model or the model was pruned"
            " elsewhere. Use a new StructuredPruning instance with a freshly constructed model, or resume with"
            " `trainer.fit(model, ckpt_path=...)`."
        )


def check_ranks_agree(trainer: pl.Trainer, records: list[PruningRecord]) -> None:
    """Under DDP, make sure every rank removed the same channels in a step; every rank raises if not."""
    if trainer.world_size <= 1:
        return
    reference = trainer.strategy.broadcast(records, src=0)
    # Decided together, so that every rank raises instead of one waiting forever in a collective.
    if not trainer.strategy.reduce_boolean_decision(reference == records, all=True):
        raise RuntimeError(
            "StructuredPruning: the ranks removed different channels. Importance scores are averaged over"
            " ranks, so this means their networks or scores already differed (e.g. a custom importance that"
            " is not deterministic given identical inputs)."
        )
