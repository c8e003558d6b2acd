"""``StructuredPruning``: a Lightning callback that removes whole channels from any LightningModule during fit.

Also :func:`load_pruned_model`, which rebuilds the pruned network from any checkpoint the callback wrote.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_hybridcomp._lightning import (
    CheckpointLoadInterceptor,
    TrainingStateSnapshot,
    device_of,
    example_inputs,
    forward_network,
    match_names,
    network_built_later,
    peek_training_inputs,
    reset_monitors,
    resolve_module,
)
from lightning_hybridcomp.callbacks._pruner import PrunerSettings, TrialFailure
from lightning_hybridcomp.callbacks._pruning_checks import (
    check_arguments,
    check_history,
    check_ranks_agree,
    check_schedule,
    check_trainer,
)
from lightning_hybridcomp.callbacks._pruning_state import PruningProgress
from lightning_hybridcomp.callbacks._pruning_utils import (
    APPLIED_HISTORY_ATTR,
    REGULARIZING_PRUNERS,
    AgreedImportance,
    ParameterSlicing,
    PruningRecord,
    eager_mode,
    plain_records,
    preserved_modes,
    preserved_requires_grad,
    prunable_groups,
    unwrap_compiled,
)
from lightning_hybridcomp.callbacks.pruned_checkpoints import (
    apply_state_structure_,
    find_pruning_state,
    load_pruned_model,
)
from lightning_hybridcomp.profiling import count_macs_and_params

__all__ = ["StructuredPruning", "load_pruned_model"]


class StructuredPruning(Callback):
    """Iterative structured pruning with torch-pruning's dependency graph: channels really go away.

    Whole filters/channels are removed from the network together with everything coupled to them
    (BatchNorm, the next layer's inputs, residual additions, concatenations, depthwise convolutions), so
    parameters, MACs, checkpoint bytes and latency all go down. The pruning runs in ``iterative_steps``
    steps, each applied at the start of a training epoch (before its first optimizer step) and followed by
    ``epochs_between_steps`` epochs of fine-tuning. After each step the optimizers and LR schedulers are
    rebuilt on the new parameters (learning rates and scheduler positions kept, optimizer moments sliced
    to the surviving channels) and a DDP wrapper is rebuilt.

    The pruned structure travels with every checkpoint: resuming with ``trainer.fit(ckpt_path=...)``
    continues the schedule without pruning twice, ``trainer.validate/test/predict(ckpt_path=...)`` work
    with this callback in the Trainer, and :func:`load_pruned_model` rebuilds the model for inference.

    Args:
        pruning_ratio: the fraction of ``target`` to remove, in ``[0, 1)``.
        target: what ``pruning_ratio`` is a fraction of: ``"channels"`` (of every prunable layer, or over
            the whole network with ``global_pruning``), ``"macs"`` or ``"params"`` (of the original
            network's MACs or parameter count: ``pruning_ratio=0.7, target="macs"`` keeps at most 30% of
            the MACs; step ``k`` of ``n`` prunes until ``1 - pruning_ratio * k / n`` of them are left).
        iterative_steps: number of pruning steps (at least 1).
        start_epoch: epoch at whose start the first step is applied.
        epochs_between_steps: fine-tuning epochs after each step before the next one.
        importance: ``"l1"``, ``"l2"`` (group weight magnitude), ``"taylor"`` (first-order Taylor on the
            gradients of the training batches since the previous step), ``"bn_scale"``, ``"lamp"``,
            ``"fpgm"``, ``"random"`` (a control), or a ``torch_pruning.importance.Importance`` instance.
        pruner: ``"base"`` (no regularisation) or a sparsity-regularising pruner: ``"group_norm"``,
            ``"bn_scale"`` or ``"growing_reg"``. The regulariser is applied to the gradients after
            backward and before every optimizer step (after AMP unscaling) until the last step.
        regularization: coefficient of the sparsity regulariser (torch-pruning's default when ``None``);
            only for regularising pruners.
        global_pruning: rank channels over the whole network instead of per layer.
        network: fully qualified name of the submodule to prune; ``""`` prunes the LightningModule itself.
        ignored_layers: fully qualified names or glob patterns (as ``pl_module.named_modules()`` prints
            them) of layers whose output channels are kept.
        keep_output_layers: keep the layers that produce the network's output (the classifier head),
            detected from the dependency graph.
        round_to: keep every pruned layer's channel count a multiple of this number.
        max_layer_ratio: at most this fraction of any single layer's original channels is removed, in
            ``(0, 1]``.
        example_input_shape: shape (with batch dimension) of a random input used to trace the network.
            Needed when ``network`` is a submodule that is not the LightningModule's whole forward
            network; otherwise ``example_input_array`` or the first training batch is used.
        verbose: print a one-line summary on rank zero after each step.

    Raises:
        ValueError: for an argument outside its range or an unknown name (eagerly, here) and, in
            ``setup``, for a network or ignored layer that does not exist, no way to get example inputs, a
            schedule that prunes after ``max_epochs``, Lightning's ``ModelPruning`` in the same Trainer, or
            a process-spawning strategy.
        TypeError: for arguments of the wrong type.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> pruning = StructuredPruning(pruning_ratio=0.7, target="macs", iterative_steps=3, start_epoch=1)
        >>> pruning.last_step_epoch is None  # known once the Trainer has set the callback up
        True
        >>> trainer = Trainer(max_epochs=8, callbacks=[pruning])
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> pruned = load_pruned_model(trainer.checkpoint_callback.last_model_path, type(model))  # doctest: +SKIP
    """

    #: Seconds the trial run before training may spend building torch-pruning's dependency graph.
    graph_time_limit: float | None = 20.0

    def __init__(
        self,
        pruning_ratio: float = 0.5,
        target: str = "channels",
        iterative_steps: int = 3,
        start_epoch: int = 0,
        epochs_between_steps: int = 1,
        importance: str | tp.importance.Importance = "l1",
        pruner: str = "base",
        regularization: float | None = None,
        global_pruning: bool = False,
        network: str = "",
        ignored_layers: list[str] | None = None,
        keep_output_layers: bool = True,
        round_to: int | None = None,
        max_layer_ratio: float = 1.0,
        example_input_shape: list[int] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        checked = check_arguments(
            pruning_ratio=pruning_ratio,
            target=target,
            iterative_steps=iterative_steps,
            start_epoch=start_epoch,
            epochs_between_steps=epochs_between_steps,
            importance=importance,
            pruner=pruner,
            regularization=regularization,
            global_pruning=global_pruning,
            network=network,
            ignored_layers=ignored_layers,
            keep_output_layers=keep_output_layers,
            round_to=round_to,
            max_layer_ratio=max_layer_ratio,
            example_input_shape=example_input_shape,
            verbose=verbose,
        )
        self._taylor = checked.taylor
        self.pruning_ratio = float(pruning_ratio)
        self.target = checked.target
        self.iterative_steps = iterative_steps
        self.start_epoch = start_epoch
        self.epochs_between_steps = epochs_between_steps
        self.importance = checked.importance
        self.pruner = checked.pruner
        self.regularization = regularization
        self.global_pruning = global_pruning
        self.network = network
        self.ignored_layers = checked.ignored_layers
        self.keep_output_layers = keep_output_layers
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.example_input_shape = checked.example_input_shape
        self.verbose = verbose

        # Checkpointed state (plain values).
        self._progress = PruningProgress()

        # Runtime objects, rebuilt every run.
        self._schedule: list[int] | None = None
        self._example: Tensor | None = None
        self._ignored_names: list[str] = []
        self._pruner: tp.pruner.BasePruner | None = None
        self._agreement: AgreedImportance | None = None
        self._interceptor = CheckpointLoadInterceptor()
        self._logged_epoch = -1
        self._preview: nn.Module | None = None

    # ------------------------------------------------------------------ public read-only state

    @property
    def last_step_epoch(self) -> int | None:
        """Epoch at whose start the last pruning step is applied (known after ``setup``, ``None`` before)."""
        return self._schedule[-1] if self._schedule is not None else None

    @property
    def finished(self) -> bool:
        """Whether every pruning step is done (or a cost target proved unreachable and pruning stopped)."""
        return self._progress.steps_done >= self.iterative_steps or self._progress.exhausted

    @property
    def steps_done(self) -> int:
        """Number of pruning steps applied so far."""
        return self._progress.steps_done

    @property
    def step_label(self) -> str:
        """How an artifact records this pruning, e.g. ``"prune:l2:0.5"`` or ``"prune:lamp:macs=0.8"`` (``pruning_ratio`` and, unless channels, ``target``)."""
        importance = self.importance if isinstance(self.importance, str) else type(self.importance).__name__
        kind = "" if self.target == "channels" else f"{self.target}="
        return f"prune:{importance}:{kind}{self.pruning_ratio:g}"

    @property
    def step_summaries(self) -> list[dict[str, Any]]:
        """One plain dict per applied step: ``step``, ``epoch``, ``params``, ``macs``, ``macs_ratio``, ``seconds``."""
        return [dict(s) for s in self._progress.summaries]

    def pruning_history(self) -> list[PruningRecord]:
        """torch-pruning's records of every channel removal so far (plain lists, replayable on a fresh model)."""
        return [list(r) for r in self._progress.history]

    @property
    def _cost_target(self) -> tuple[str, float] | None:
        """``(kind, fraction kept)`` for a MACs or parameter target, ``None`` for a channel ratio."""
        return None if self.target == "channels" else (self.target, 1.0 - self.pruning_ratio)

    @property
    def _settings(self) -> PrunerSettings:
        return PrunerSettings(
            importance=self.importance,
            pruner=self.pruner,
            iterative_steps=self.iterative_steps,
            channel_ratio=self.pruning_ratio if self.target == "channels" else None,
            cost_target=self._cost_target,
            global_pruning=self.global_pruning,
            round_to=self.round_to,
            max_layer_ratio=self.max_layer_ratio,
            regularization=self.regularization,
            keep_output_layers=self.keep_output_layers,
        )

    def preview_network(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
        """A copy of the network as the whole pruning schedule will leave it, made by a trial run.

        Built once per ``fit`` at ``on_train_start`` (before the first epoch), so that a network that
        torch-pruning cannot handle is refused before any training is paid for, and so that
        :class:`QuantizationAwareTraining` can try its own preparation on the structure it will receive.
        The copy is pruned to the final ratio or cost target in one go, with the configured importance
        (Taylor importance scores the gradients of one batch), and its forward is run once. Building the
        dependency graph is limited to :attr:`graph_time_limit` seconds. ``None`` once pruning has started
        or when no example input is known.

        Raises:
            ValueError: if the trial fails: the message names the stage (building the dependency graph,
                removing channels, running the pruned forward), torch-pruning's reason in one line, and what
                to change.
        """
        if self._preview is not None:
            return self._preview
        if self.finished or self._progress.history:
            return None
        network = self._resolve_network(pl_module)
        # The trial draws no random numbers from the run's generators and repeats no warning.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = self._example_inputs(pl_module, network, None)
            if example is None:
                peeked = peek_training_inputs(trainer)
                if peeked is None:
                    return None
                example = self._match_dtype(network, peeked.to(device_of(network)))
            self._preview = self._trial_prune(trainer, pl_module, network, example)
        return self._preview

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_trainer(trainer, stage)
        self._schedule = [
            self.start_epoch + i * self.epochs_between_steps for i in range(self.iterative_steps)
        ]
        self._logged_epoch = -1
        if stage == "fit":
            check_schedule(
                trainer,
                self._schedule,
                start_epoch=self.start_epoch,
                epochs_between_steps=self.epochs_between_steps,
            )
        if not network_built_later(pl_module):
            self._check_network(pl_module, fitting=stage == "fit")
        self.restore_structure_(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_network(pl_module, fitting=True)  # again: a network `configure_model` built is there now

    def _check_network(self, pl_module: pl.LightningModule, *, fitting: bool) -> None:
        """Resolve ``network`` and ``ignored_layers`` in the module as it is now."""
        network = self._resolve_network(pl_module)
        candidates = self._names_inside(pl_module, network)
        self._ignored_names = match_names(
            candidates, self.ignored_layers, arg_name="ignored_layers", what="a layer of the pruned network"
        )
        if fitting:
            self._check_example_source(pl_module, network)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = self._resolve_network(pl_module)
        check_history(network, self._progress.history)
        if not self.finished:
            self._ensure_pruner(trainer, pl_module)
            if not self._progress.history:
                self.preview_network(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._preview = None
        if not self.finished and self._ensure_pruner(trainer, pl_module):
            self._run_due_steps(trainer, pl_module)
        self._log(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only while the example inputs are still unknown: they come from this first batch.
        if self.finished or self._pruner is not None:
            return
        if self._ensure_pruner(trainer, pl_module, batch=batch):
            self._run_due_steps(trainer, pl_module)
            self._log(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.finished or self._pruner is None:
            return
        network = self._resolve_network(pl_module)
        if self._taylor:
            self._progress.taylor_gradients.accumulate(network)
        if self.pruner in REGULARIZING_PRUNERS:
            # Grads are unscaled here (AMP) and the optimizer has not consumed them yet.
            self._pruner.regularize(network)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._pruner is not None
            and not self.finished
            and isinstance(self._pruner, tp.pruner.GrowingRegPruner)
        ):
            self._pruner.update_reg()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finished:
            rank_zero_warn(
                f"StructuredPruning: training ended after {self._progress.steps_done} of {self.iterative_steps} pruning steps"
                f" (schedule: epochs {self._schedule}); the model is only partly pruned. Raise `max_epochs` or the"
                " EarlyStopping patience."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._interceptor.remove()
        self._release_pruner()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._progress.state_dict(network=self.network, iterative_steps=self.iterative_steps)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._progress = PruningProgress.from_state_dict(state_dict)
        saved_steps = state_dict.get("iterative_steps", self.iterative_steps)
        if saved_steps != self.iterative_steps:
            rank_zero_warn(
                f"StructuredPruning: the checkpoint was written with iterative_steps={saved_steps}, this callback has"
                f" {self.iterative_steps}; the remaining steps follow the new schedule."
            )

    # ------------------------------------------------------------------ structure restore (contract with QAT)

    def restore_structure_(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Give ``pl_module`` the pruned structure of the checkpoint Lightning is restoring; idempotent.

        Lightning loads a checkpoint's weights before any callback sees its state, and it reads the file
        only after every ``setup`` ran, so the structure has to be in place right before the weights
        load. Without ``checkpoint`` this installs that interception (a wrapper around the module's
        ``on_load_checkpoint`` for the duration of the run, removed in ``teardown``); with ``checkpoint``
        (a loaded checkpoint dict) it applies the structure now. Records already applied to the network
        are never applied again, so any number of calls, from any callback, is safe.

        Raises:
            RuntimeError: if the network already carries a different pruned structure, or the checkpoint
                was pruned on another submodule than ``network``.
        """
        if checkpoint is None:
            self._interceptor.install(
                pl_module, lambda loaded: self.restore_structure_(trainer, pl_module, loaded)
            )
            return
        state = find_pruning_state(checkpoint)
        if state is None or not state.get("history"):
            return
        saved_name = state.get("network", "")
        if saved_name != self.network:
            raise RuntimeError(
                f"The checkpoint was pruned on network {saved_name!r}, but this callback prunes {self.network!r}."
                f" Set `network={saved_name!r}`."
            )
        applied = apply_state_structure_(pl_module, state)
        if applied:
            rank_zero_info(
                f"StructuredPruning: restored the pruned structure ({applied} records, step"
                f" {state.get('steps_done', '?')}) before loading the checkpoint weights."
            )

    # ------------------------------------------------------------------ setup checks

    def _resolve_network(self, pl_module: pl.LightningModule) -> nn.Module:
        return unwrap_compiled(resolve_module(pl_module, self.network, arg_name="network"))

    def _describe(self, pl_module: pl.LightningModule) -> str:
        return f"network {self.network!r}" if self.network else type(pl_module).__name__

    def _is_whole_network(self, pl_module: pl.LightningModule, network: nn.Module) -> bool:
        """Whether ``network`` takes the LightningModule's own inputs (itself, or its one wrapped network)."""
        forward = forward_network(pl_module)
        return network is pl_module or (forward is not None and network is unwrap_compiled(forward))

    def _names_inside(self, pl_module: pl.LightningModule, network: nn.Module) -> list[str]:
        inside = {id(m) for m in network.modules()}
        return [n for n, m in pl_module.named_modules() if n and id(m) in inside and m is not network]

    def _check_example_source(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        if self.example_input_shape is not None or self._is_whole_network(pl_module, network):
            return
        raise ValueError(
            f"Expected `example_input_shape` for network {self.network!r}: it is a submodule, so neither"
            " `example_input_array` nor a training batch can be fed to it. Pass e.g. example_input_shape=[1, 64, 8, 8]."
        )

    # ------------------------------------------------------------------ pruner construction

    def _ensure_pruner(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any = None) -> bool:
        if self._pruner is not None:
            return True
        network = self._resolve_network(pl_module)
        example = self._example_inputs(pl_module, network, batch)
        if example is None:
            return False
        self._build_pruner(trainer, pl_module, network, example)
        return True

    def _example_inputs(self, pl_module: pl.LightningModule, network: nn.Module, batch: Any) -> Tensor | None:
        """See :func:`~lightning_hybridcomp._lightning.example_inputs`; in the network's floating dtype."""
        example = example_inputs(
            pl_module,
            device=device_of(network),
            shape=self.example_input_shape,
            recorded=self._progress.example_spec,
            whole_network=self._is_whole_network(pl_module, network),
            batch=batch,
        )
        return None if example is None else self._match_dtype(network, example)

    @staticmethod
    def _match_dtype(network: nn.Module, example: Tensor) -> Tensor:
        dtype = next((p.dtype for p in network.parameters() if p.is_floating_point()), None)
        if example.is_floating_point() and dtype is not None:
            example = example.to(dtype)
        return example.detach()

    def _build_pruner(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, example: Tensor
    ) -> None:
        modules = dict(pl_module.named_modules())
        ignored = [modules[name] for name in self._ignored_names]
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # type: ignore[arg-type]  # noqa: E731
        pruner, self._agreement = self._settings.build(network, example, ignored, reduce=reduce)
        self._check_prunable(pruner, pl_module)
        self._progress.sync_initial_channels_(pruner, network)
        pruner.current_step = self._progress.pruner_step
        self._pruner = pruner
        self._progress.example_spec = (list(example.shape), str(example.dtype))
        self._example = example
        if self._progress.initial_cost is None:
            self._progress.initial_cost = self._count(network, example)
        if self._progress.cost is None:
            self._progress.cost = self._count(network, example)

    def _check_prunable(self, pruner: tp.pruner.BasePruner, pl_module: pl.LightningModule) -> None:
        if not prunable_groups(pruner):
            raise ValueError(
                f"Expected `network` ({self._describe(pl_module)}) to contain prunable layers (Conv, Linear, LSTM) outside"
                f" `ignored_layers` and the output layers, found none. Ignored: {self._ignored_names}"
                f"{' + detected output layers' if self.keep_output_layers else ''}."
            )

    def _trial_prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module, example: Tensor
    ) -> nn.Module:
        """Prune a copy of ``network`` through the whole schedule at once; see :meth:`preview_network`."""
        modules = dict(pl_module.named_modules())
        try:
            return self._settings.trial(
                network,
                example,
                [modules[name] for name in self._ignored_names],
                taylor=self._taylor,
                graph_seconds=self.graph_time_limit,
                check=lambda pruner: self._check_prunable(pruner, pl_module),
            )
        except TrialFailure as failure:
            raise failure.as_value_error(
                f"StructuredPruning cannot prune {self._describe(pl_module)}"
            ) from None

    def _release_pruner(self) -> None:
        self._pruner = None
        self._agreement = None

    def _count(self, network: nn.Module, example: Tensor) -> tuple[int, int]:
        with preserved_modes(network), eager_mode():
            return count_macs_and_params(network, example[:1])

    # ------------------------------------------------------------------ pruning steps

    def _run_due_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._schedule is not None
        epoch = trainer.current_epoch
        due = [
            k for k in range(self._progress.steps_done, self.iterative_steps) if self._schedule[k] <= epoch
        ]
        if len(due) > 1:
            rank_zero_warn(
                f"StructuredPruning: {len(due)} pruning steps are overdue at epoch {epoch} (schedule {self._schedule});"
                " applying them back to back."
            )
        for _ in due:
            if self.finished:
                break
            self._prune_step(trainer, pl_module)

    def _prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self._pruner
        assert pruner is not None and self._progress.initial_cost is not None and self._example is not None
        network = self._resolve_network(pl_module)
        start = time.perf_counter()
        step = self._progress.steps_done + 1
        snapshot = TrainingStateSnapshot.capture(trainer, pl_module)
        originals = dict(pl_module.named_parameters())
        before = len(pruner.pruning_history())
        with (
            preserved_modes(network),
            preserved_requires_grad(network),
            eager_mode(),
            ParameterSlicing() as slicing,
        ):
            if self._taylor:
                self._progress.taylor_gradients.install(network)
            if self._agreement is not None:
                self._agreement.active = True
            try:
                stopped_at = self._settings.advance(
                    pruner, network, self._example, step, self._progress.initial_cost
                )
            finally:
                if self._agreement is not None:
                    self._agreement.active = False
            for p in network.parameters():
                p.grad = None
        records = plain_records(pruner.pruning_history()[before:])
        check_ranks_agree(trainer, records)
        for by_name in snapshot.state_by_name:
            slicing.carry_optimizer_state_(by_name, originals)
        snapshot.restore_(trainer, pl_module)
        if self.pruner in REGULARIZING_PRUNERS:
            pruner.update_regularizer()

        if stopped_at is not None:
            self._progress.exhausted = True
            rank_zero_warn(
                f"StructuredPruning: cannot reach `pruning_ratio`={self.pruning_ratio:g} of the {self.target} (keep"
                f" {1.0 - self.pruning_ratio:g}x): stopped at {stopped_at:.3f}x after step {step}; layers are limited"
                f" by `max_layer_ratio`={self.max_layer_ratio}, `round_to`, ignored and output layers. Pruning stops"
                " here."
            )
        macs, params = self._count(network, self._example)
        summary = self._progress.complete_step(
            records,
            epoch=trainer.current_epoch,
            pruner=pruner,
            cost=(macs, params),
            seconds=time.perf_counter() - start,
        )
        setattr(network, APPLIED_HISTORY_ATTR, [list(r) for r in self._progress.history])
        if not records and self._cost_target is None and self.pruning_ratio > 0:
            rank_zero_warn(
                f"StructuredPruning: step {step} removed no channels (importance {self.importance!r} gave no scores,"
                " or every layer is ignored or at `max_layer_ratio`/`round_to` limits)."
            )
        if self.verbose:
            rank_zero_info(
                f"StructuredPruning step {step}/{self.iterative_steps} at epoch {trainer.current_epoch}: params"
                f" {self._progress.initial_cost[1]:,} -> {params:,} ({summary['params_ratio']:.3f}x), MACs"
                f" {self._progress.initial_cost[0]:,} -> {macs:,} ({summary['macs_ratio']:.3f}x),"
                f" {summary['seconds']:.2f}s"
            )
        reset_monitors(trainer)
        if self.finished:
            self._release_pruner()

    # ------------------------------------------------------------------ after a step

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._progress.cost is None
            or self._progress.initial_cost is None
            or self._logged_epoch == trainer.current_epoch
        ):
            return
        self._logged_epoch = trainer.current_epoch
        macs, params = self._progress.cost
        sync = trainer.world_size > 1
        for key, value in (
            ("pruning/params", float(params)),
            ("pruning/macs", float(macs)),
            ("pruning/macs_ratio", macs / max(self._progress.initial_cost[0], 1)),
            ("pruning/step", float(self._progress.steps_done)),
        ):
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=sync)
