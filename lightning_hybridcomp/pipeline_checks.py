"""Every problem of a pipeline configuration, found in seconds before the first epoch.

Each phase's components are built by the code the phase itself runs, with the model on the meta device,
so every constructor's own validation and every callback's ``setup`` checks run before anything trains;
the problems are reported together, each with the YAML path of the value it is about.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Collection, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_hybridcomp._lightning import late_build_hooks
from lightning_hybridcomp._validation import is_int
from lightning_hybridcomp.callbacks.distillation import KnowledgeDistillation
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import ClassEmphasis
from lightning_hybridcomp.moe._arguments import check_expert_classes
from lightning_hybridcomp.moe.gate import feature_expert_index
from lightning_hybridcomp.moe.module import MoELightningModule
from lightning_hybridcomp.pipeline_config import (
    PHASE_TRAINER_ARGUMENTS,
    PIPELINE_MOE_OPTIONS,
    PipelineConfigError,
    check_init_args,
)

if TYPE_CHECKING:
    from lightning_hybridcomp.pipeline import Pipeline

__all__ = ["check_pipeline"]

_T = TypeVar("_T")
_S = TypeVar("_S")
# The package's messages name the argument they are about in backticks: "Expected `start_epoch` >= 1 ...".
_NAMED_ARGUMENT = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
#: What a component's constructor or a Trainer raises for a value it refuses.
_REFUSALS = (ValueError, TypeError, MisconfigurationException)


class _Problems:
    """Collects refusals with the YAML path of the value each one names."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []
        self.errors: list[BaseException] = []

    def attempt(
        self, build: Callable[[], _T], section: str, paths: dict[str, str] | None = None
    ) -> _T | None:
        """``build()``, or ``None`` after recording its refusal under the path of the argument it names."""
        try:
            return build()
        except _REFUSALS as err:
            if isinstance(err, PipelineConfigError):  # a refusal that names its own paths
                entries = err.problems
            else:
                message = " ".join(str(err).split())
                named = [paths[n] for n in _NAMED_ARGUMENT.findall(message) if paths and n in paths]
                entries = [(named[0] if named else section, message)]
            for entry in entries:
                if entry not in self.found:
                    self.found.append(entry)
                    self.errors.append(err)
            return None


class _CheckedModel(NamedTuple):
    """A model the callbacks are checked on, and whether its own hooks built its network (see below)."""

    module: pl.LightningModule
    built_late: bool


def _on_meta(pipeline: Pipeline, lr: float | None) -> _CheckedModel:
    """The model on the meta device, with the network its own hooks build; a model whose constructor
    cannot run there is built for real."""
    try:
        model = pipeline.baseline_model(lr, device="meta")
    except Exception:  # a constructor that computes on tensors (a dummy forward, `.item()`) fails on meta
        model = pipeline.baseline_model(lr)
    return _CheckedModel(model, _build_late_network(model))


def _constructed(
    cls: type,
    arguments: dict[str, Any],
    section: str,
    make: Callable[[_S], _T],
    spec: _S,
    owned: Collection[str] = (),
) -> _T:
    """``make(spec)`` after checking that ``cls`` takes every key of ``arguments`` (listing the valid ones, less
    the ``owned`` ones the pipeline sets itself)."""
    check_init_args(cls, arguments, section=section, owned=owned)
    return make(spec)


#: The callbacks whose ``on_fit_start`` only resolves the names they were given in the network.
_NAMING_CALLBACKS = (StructuredPruning, QuantizationAwareTraining)


def _build_late_network(model: pl.LightningModule) -> bool:
    """Run the hooks in which ``model`` builds its network after the callbacks' ``setup``, as a fit would.

    Lightning calls the module's own ``setup`` and ``configure_model`` after every callback's ``setup``,
    so the layer names of such a network are there only then. The hooks run on the meta device (for
    real where a hook cannot run there). Returns whether they ran: ``False`` for a module without such
    hooks, and for hooks that need what a fit has (a Trainer, the data), whose network the phase checks
    when it starts, reporting then what fails.
    """
    hooks = late_build_hooks(model)
    if not hooks:
        return False
    for device in ("meta", None):
        try:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                for hook in hooks:
                    getattr(model, hook)(*(["fit"] if hook == "setup" else []))
        except Exception:
            continue
        return True
    return False


def _set_up(callback: Callback, trainer: pl.Trainer, model: pl.LightningModule, built_late: bool) -> None:
    callback.setup(trainer, model, "fit")
    if built_late and isinstance(callback, _NAMING_CALLBACKS):
        # The network is there now: its names are checked as these callbacks' `on_fit_start` does in a fit.
        callback.on_fit_start(trainer, model)


@contextlib.contextmanager
def _quiet_trainers() -> Iterator[None]:
    """Keep the Trainers built here from printing their device lines: only the phases' own Trainers do."""
    chatter = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        yield
    finally:
        chatter.setLevel(level)


def check_pipeline(pipeline: Pipeline) -> None:
    """Build every phase's components as the phase would and check them, without data or training.

    The datamodule and the model are constructed (the model on the meta device), every expert's callbacks
    are constructed and set up on its model and Trainer (so schedules are checked against ``max_epochs``
    and layer names against the model), every MoE is constructed without its experts, whose number is
    known, and every Trainer is built. Nothing is written.

    Raises:
        PipelineConfigError: listing every refusal, each with its YAML path.
    """
    with _quiet_trainers():
        problems = _check(pipeline)
    if problems.found:
        raise PipelineConfigError(problems.found, errors=problems.errors)


def _check(pipeline: Pipeline) -> _Problems:
    config = pipeline.config
    problems = _Problems()
    data_paths = {n: f"data.init_args.{n}" for n in config.data.init_args}
    problems.attempt(
        partial(config.data.instantiate, pl.LightningDataModule, section="data"), "data", data_paths
    )
    model_paths = {n: f"baseline.model.init_args.{n}" for n in config.baseline.model.init_args}
    model = problems.attempt(partial(_on_meta, pipeline, None), "baseline.model", model_paths)
    if config.baseline.checkpoint and not Path(config.baseline.checkpoint).is_file():
        problems.found.append(
            (
                "baseline.checkpoint",
                f"Expected an existing file, got {config.baseline.checkpoint!r} (not found).",
            )
        )
    trainer_paths = {n: f"trainer.{n}" for n in config.trainer}
    folder = pipeline.run_dir / "baseline"

    def make_trainer(*args: Any, user_callbacks: bool = False) -> pl.Trainer:
        # `trainer.callbacks` are checked with the baseline's Trainer alone: an entry refused there does
        # not keep the experts' Trainers, and so their callbacks' checks, from being built.
        return _constructed(
            pl.Trainer,
            config.trainer,
            "trainer",
            lambda a: pipeline.phase_trainer(*a, user_callbacks=user_callbacks),
            args,
            owned=PHASE_TRAINER_ARGUMENTS,
        )

    baseline_trainer = partial(
        make_trainer, folder, "baseline", config.baseline.max_epochs, [], user_callbacks=True
    )
    problems.attempt(baseline_trainer, "trainer", trainer_paths)

    # The baseline's artifact does not exist yet: a stand-in teacher, the arguments are what is checked.
    distillation = partial(pipeline.distillation_callback, teacher=nn.Identity())
    for i, expert in enumerate(config.experts):
        section = f"experts[{i}]"
        expert_model = model
        if model is not None and expert.lr is not None:
            lr_path = {"lr": f"{section}.lr"}
            with_lr = problems.attempt(partial(_on_meta, pipeline, expert.lr), f"{section}.lr", lr_path)
            expert_model = (
                with_lr if with_lr is not None else model
            )  # the same structure: check the callbacks on it
        built: list[tuple[Callback, str, dict[str, str]]] = []
        for kind, arguments, cls, make in (
            ("pruning", expert.pruning, StructuredPruning, pipeline.pruning_callback),
            ("quantization", expert.quantization, QuantizationAwareTraining, pipeline.quantization_callback),
            ("distillation", expert.distillation, KnowledgeDistillation, distillation),
        ):
            if arguments is None:
                continue
            where = f"{section}.{kind}"
            paths = {n: f"{where}.{n}" for n in arguments}
            made = problems.attempt(partial(_constructed, cls, arguments, where, make, expert), where, paths)
            if made is not None:
                built.append((made, where, paths))
        if expert.emphasis is not None:
            where = f"{section}.emphasis"
            paths = {n: f"{where}.{n}" for n in expert.emphasis}
            # No data is loaded here: a stand-in datamodule, the arguments are what is checked.
            with_data = partial(pipeline.expert_datamodule, datamodule=pl.LightningDataModule())
            problems.attempt(
                partial(_constructed, ClassEmphasis, expert.emphasis, where, with_data, expert), where, paths
            )
        callbacks = [made for made, _, _ in built]
        trainer = problems.attempt(
            partial(make_trainer, folder, section, expert.max_epochs, callbacks), "trainer", trainer_paths
        )
        if trainer is None or expert_model is None:
            continue
        for callback, where, paths in built:  # schedules against `max_epochs`, layer names against the model
            own = {"max_epochs": f"{section}.max_epochs", **paths}
            setup = partial(_set_up, callback, trainer, expert_model.module, expert_model.built_late)
            problems.attempt(setup, where, own)

    moe = config.moe
    count = len(config.experts)
    option_paths = {n: f"moe.options.{n}" for n in moe.options} | {"top_k": "moe.top_k"}
    unbuilt_moe = partial(pipeline.moe_module, experts=None)
    for run in moe.runs():
        moe_module = partial(
            _constructed,
            MoELightningModule,
            moe.options,
            "moe.options",
            unbuilt_moe,
            run,
            PIPELINE_MOE_OPTIONS,
        )
        problems.attempt(moe_module, "moe.options", option_paths)
    eval_top_k: Any = moe.options.get("eval_top_k")
    if is_int(eval_top_k) and eval_top_k > count >= 2:
        problems.found.append(
            (
                "moe.options.eval_top_k",
                f"Expected `eval_top_k` to be at most the number of experts ({count}), got {eval_top_k}.",
            )
        )
    if moe.options.get("assignment_target") == "classes" and "expert_classes" in moe.options:
        # Without experts, the module cannot count the lists.
        expert_classes = partial(check_expert_classes, moe.options["expert_classes"], "classes", count)
        problems.attempt(expert_classes, "moe.options.expert_classes", option_paths)
    if isinstance(moe.distillation, dict):
        where = "moe.distillation"
        paths = {n: f"{where}.{n}" for n in moe.distillation}
        problems.attempt(
            partial(_constructed, KnowledgeDistillation, moe.distillation, where, distillation, moe),
            where,
            paths,
        )
    gate = moe.options.get("gate", "cnn")
    problems.attempt(partial(feature_expert_index, gate, count), "moe.options.gate", option_paths)
    problems.attempt(partial(make_trainer, folder, "moe", moe.max_epochs, []), "trainer", trainer_paths)
    return problems
