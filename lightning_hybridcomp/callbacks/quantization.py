"""Quantization-aware training as a Lightning callback that ends in a real int8 model.

Fake quantization goes into any LightningModule's network at a chosen epoch; at the end of ``fit`` the
network becomes an int8 program (PT2E for conv nets, torchao for Linear/Embedding nets) that can be saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_hybridcomp._lightning import (
    CheckpointLoadInterceptor,
    TrainingStateSnapshot,
    broadcast_tensors_,
    device_of,
    make_example,
    network_built_later,
    refuse_spawning_strategy,
    training_mode,
)
from lightning_hybridcomp.artifacts import ArtifactMetadata, save_artifact
from lightning_hybridcomp.callbacks._qat_checks import (
    check_arguments,
    check_checkpoint_state,
    check_converted,
    check_example_source,
    check_schedule,
    check_start,
    check_start_before_end,
)
from lightning_hybridcomp.callbacks._qat_error_monitor import FakeQuantErrorMonitor
from lightning_hybridcomp.callbacks._qat_figures import measure_artifact, publish_to_loggers, summary_metrics
from lightning_hybridcomp.callbacks._qat_hosting import HostedNetwork
from lightning_hybridcomp.callbacks._qat_inputs import find_example_inputs, recorded_example
from lightning_hybridcomp.callbacks._qat_state import STAGES, QATProgress
from lightning_hybridcomp.callbacks._qat_trial import trial_prepare
from lightning_hybridcomp.callbacks._subclass_state import (
    flatten_tensor_subclasses_,
    unflatten_tensor_subclasses_,
)
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.qat_backends import QuantizationBackend, make_backend
from lightning_hybridcomp.profiling import count_macs_and_params

__all__ = ["QuantizationAwareTraining"]


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training that ends in a real int8 model, alone or after :class:`StructuredPruning`.

    At the first training batch of ``start_epoch`` (or at ``start_step``) the network is traced and fake
    quantization is inserted; training then continues with it, so the weights adapt to int8 rounding. At the
    end of ``fit`` the network is converted to int8 (``convert_on_fit_end``), so that ``trainer.validate``,
    ``test`` and ``predict`` afterwards run the int8 model, and :meth:`save_artifact` writes it as a
    self-contained file (see :mod:`lightning_hybridcomp.artifacts`).

    Backends:

    * ``"x86_pt2e"`` (conv nets): ``torch.export`` with a dynamic batch dimension, torchao's
      ``X86InductorQuantizer`` in QAT mode, ``prepare_qat_pt2e``, training, ``convert_pt2e``. Conv2d and
      Linear become int8 with per-channel weights and BatchNorm folded into the convolutions; the speed-up
      on CPU needs :func:`~lightning_hybridcomp.artifacts.compile_artifact`.
    * ``"xnnpack"`` (conv nets for edge devices): the same PT2E flow with ExecuTorch's ``XNNPACKQuantizer``
      (symmetric int8 activations, per-channel int8 weights), the scheme of ExecuTorch's XNNPACK delegate;
      :func:`~lightning_hybridcomp.edge.export_executorch` lowers the result to a ``.pte`` program. Needs
      the ``edge`` extra (``pip install "lightning-hybridcomp[edge]"``).
    * ``"linear_int8"`` (Linear/Embedding-heavy nets): torchao ``QATConfig`` fake quantization (int8
      per-token activations, int8 per-channel weights), converted to torchao's int8 dynamic-activation
      Linear (fast on CPU) and int8 weight-only Embedding. Other layers stay fp32.

    The network is the LightningModule's forward network by default: its one child with trainable
    parameters, or, if there are several, the LightningModule's own ``forward``, whose traced graph is then
    registered as the child ``qat_network`` and ``forward`` routed to it (``training_step`` and friends
    keep working as long as they call ``self(...)``). ``module`` names a submodule instead.

    With :class:`~lightning_hybridcomp.callbacks.pruning.StructuredPruning` attached, fake quantization
    starts only after the last pruning step. Checkpoints written at any stage load with
    ``trainer.fit/validate/test/predict(ckpt_path=...)``: the callback rebuilds the matching structure right
    before Lightning loads the weights. Use ``strategy="ddp"`` for multi-process training (not
    ``ddp_spawn``).

    Logged through ``pl_module.log``: ``qat/stage`` (0 float, 1 fake quant, 2 int8),
    ``qat/fake_quant_error`` (relative L2 distance of the fake-quant outputs from the fp32 network's on
    the validation set), ``qat/macs`` and ``qat/params``; after conversion ``qat/size_bytes`` (artifact
    bytes) in ``validate``/``test`` runs, and in every logger at the end of ``fit``.

    Args:
        backend: ``"x86_pt2e"``, ``"xnnpack"`` or ``"linear_int8"`` (case-insensitive).
        module: fully qualified name of the submodule to quantize; ``None`` for the forward network.
        start_epoch: epoch at whose first batch fake quantization is inserted.
        start_step: global step at which to insert instead (leave ``start_epoch`` at 0).
        freeze_observers_epoch: epoch from which the activation ranges stop updating (PT2E backends only);
            must come after ``start_epoch``.
        freeze_bn_epoch: epoch from which BatchNorm running statistics stop updating.
        convert_on_fit_end: convert to int8 when ``fit`` ends.
        example_input_shape: input shape (with batch dimension) of the network; needed when ``module``
            names a submodule, optional otherwise (``example_input_array`` or a training batch is used).
        log_fake_quant_error: log ``qat/fake_quant_error`` during validation (one extra fp32 forward per
            validation batch).
        verbose: report the stage changes with ``rank_zero_info``.

    Raises:
        ValueError: for an unknown backend, negative or inconsistent epochs, a malformed shape.
        TypeError: for arguments of the wrong type.
        ImportError: for ``backend="xnnpack"`` without ExecuTorch installed (the message names the extra).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> qat = QuantizationAwareTraining(backend="x86_pt2e", start_epoch=2, freeze_bn_epoch=4)
        >>> trainer = Trainer(max_epochs=6, callbacks=[qat], logger=False, enable_progress_bar=False)
        >>> # trainer.fit(model, datamodule); trainer.test(model, datamodule)  # test runs int8
        >>> # qat.save_artifact("model_int8.pt2")
    """

    def __init__(
        self,
        backend: str = "x86_pt2e",
        module: str | None = None,
        start_epoch: int = 0,
        start_step: int | None = None,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        convert_on_fit_end: bool = True,
        example_input_shape: list[int] | None = None,
        log_fake_quant_error: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        checked = check_arguments(
            backend=backend,
            module=module,
            start_epoch=start_epoch,
            start_step=start_step,
            freeze_observers_epoch=freeze_observers_epoch,
            freeze_bn_epoch=freeze_bn_epoch,
            convert_on_fit_end=convert_on_fit_end,
            example_input_shape=example_input_shape,
            log_fake_quant_error=log_fake_quant_error,
            verbose=verbose,
        )
        self.backend = checked.backend
        self.module = module
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.convert_on_fit_end = convert_on_fit_end
        self.example_input_shape = checked.example_input_shape
        self.log_fake_quant_error = log_fake_quant_error
        self.verbose = verbose

        self._impl: QuantizationBackend = make_backend(checked.backend)
        self._progress = QATProgress()
        self._network = HostedNetwork()
        self._pl_module: pl.LightningModule | None = None
        self._summary: ArtifactMetadata | None = None
        self._wait_reported = False
        self._interceptor = CheckpointLoadInterceptor()
        self._error_monitor = FakeQuantErrorMonitor(self._impl)

    # ------------------------------------------------------------------ public read-only state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    @property
    def stage(self) -> str:
        """``"float"``, ``"fake_quant"`` or ``"converted"``."""
        return self._progress.stage

    @property
    def quantized_network(self) -> nn.Module | None:
        """The fake-quant or int8 network now in the LightningModule (``None`` in the float stage)."""
        return self._network.hosted if self._progress.stage != "float" else None

    @property
    def float_network(self) -> nn.Module | None:
        """The fp32 network fake quantization was inserted into (``None`` in the float stage).

        PT2E backends share its parameters and BatchNorm statistics with the fake-quant network, so after
        training it holds the weights QAT learned: the fp32 twin of the int8 model, which a Mixture of Experts
        can fine-tune further (``MoELightningModule(quantize_experts=...)``).
        """
        return self._network.float_network if self._progress.stage != "float" else None

    @property
    def summary(self) -> ArtifactMetadata | None:
        """Metadata of the converted model's artifact (bytes, MACs, params), known after conversion."""
        return self._summary

    @property
    def _started_at(self) -> int | None:
        # The epoch fake quantization was inserted at; the tests read it under this name.
        return self._progress.started_at

    def save_artifact(
        self,
        path: str | Path,
        example_inputs: Tensor | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        architecture: str | None = None,
    ) -> ArtifactMetadata:
        """Write the converted int8 network as an artifact (see :func:`~lightning_hybridcomp.artifacts.save_artifact`).

        The recorded steps are the pruning steps of an attached ``StructuredPruning`` followed by
        ``"qat:<backend>"``.

        Args:
            path: destination file (``.pt2``).
            example_inputs: a batch for the export; defaults to random inputs of the shape QAT traced.
            extra: JSON-able information to store alongside.
            architecture: name to record; defaults to the float network's class name.

        Raises:
            RuntimeError: if the network has not been converted yet.
        """
        network = check_converted(self._progress.stage, self._network.hosted)
        example = example_inputs
        if example is None:
            example = recorded_example(network, self._progress, self._pl_module)
        return save_artifact(
            network,
            path,
            example,
            steps=self._steps(),
            extra=extra,
            architecture=architecture or self._network.architecture(),
        )

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_spawning_strategy(trainer, stage, "float model, which cannot hold the quantized structure")
        self._pl_module = pl_module
        if stage == TrainerFn.FITTING:
            check_schedule(trainer, start_epoch=self.start_epoch, start_step=self.start_step)
            if self.start_step is None:
                check_start_before_end(trainer, self._effective_start_epoch(trainer))
        if not network_built_later(pl_module):
            self._resolve_network(trainer, pl_module)
        # Lightning reads a checkpoint only after every setup and loads its weights right after the
        # LightningModule's `on_load_checkpoint`; the structure the weights need is built there.
        self._interceptor.install(
            pl_module, lambda checkpoint: self._restore_from_(trainer, pl_module, checkpoint)
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_network(trainer, pl_module)  # a network `configure_model` built is there now

    def _resolve_network(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the network to quantize in the module as it is now (once), and check what fitting it needs."""
        self._network.resolve_(pl_module, self.module)
        if trainer.state.fn == TrainerFn.FITTING:
            check_example_source(
                pl_module,
                self._network.current(pl_module),
                network_name=self._network.name,
                example_input_shape=self.example_input_shape,
                stage=self._progress.stage,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if check_start(
            trainer,
            stage=self._progress.stage,
            start=self._effective_start_epoch(trainer),
            start_epoch=self.start_epoch,
            start_step=self.start_step,
            warn=not self._wait_reported,
        ):
            self._wait_reported = True
        if self._progress.stage == "float":
            self._trial_prepare(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._progress.stage == "float" and self._is_due(trainer):
            self._start_fake_quant(trainer, pl_module, batch)
        if self._progress.stage == "fake_quant":
            self._apply_freezing(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("qat/stage", float(STAGES.index(self._progress.stage)), on_epoch=True, sync_dist=True)
        costs = self._progress.costs
        if costs:
            pl_module.log("qat/macs", float(costs["macs"]), on_epoch=True, sync_dist=True)
            pl_module.log("qat/params", float(costs["params"]), on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._progress.stage == "float":
            rank_zero_warn(
                "QuantizationAwareTraining: training ended before fake quantization started"
                f" (start_epoch={self.start_epoch}, start_step={self.start_step}); the model is still fp32."
            )
            return
        if self._progress.stage == "fake_quant" and self.convert_on_fit_end:
            self._convert(trainer, pl_module)
            if self._summary is not None:
                publish_to_loggers(trainer, summary_metrics(self._summary))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.log_fake_quant_error or self._progress.stage != "fake_quant":
            return
        if self._network.hosted is not None:
            self._error_monitor.attach(self._network.hosted)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        error = self._error_monitor.measure(self._network.hosted, self._network.float_network, pl_module)
        if error is not None:
            pl_module.log("qat/fake_quant_error", error, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._error_monitor.detach()
        self._log_final(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_final(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._error_monitor.detach()
        self._interceptor.remove()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # torchao's int8 weights are tensor subclasses, which Lightning's loader cannot read back (its
        # callable `map_location` is refused for them): store their plain inner tensors instead.
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            flatten_tensor_subclasses_(state)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._progress.state_dict(backend=self.backend, network_name=self._network.name)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The structure itself was rebuilt from the same state before the weights loaded; these are the counters.
        self._progress.load_state_dict(state_dict)
        self._wait_reported = self._wait_reported or state_dict.get("stage", "float") != "float"

    # ------------------------------------------------------------------ schedule

    def _pruning_callbacks(self, trainer: pl.Trainer) -> list[StructuralCompression]:
        return [
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if cb is not self and isinstance(cb, StructuralCompression)
        ]

    def _effective_start_epoch(self, trainer: pl.Trainer) -> int:
        start = self.start_epoch
        for cb in self._pruning_callbacks(trainer):
            last = cb.last_step_epoch
            if last is not None:
                start = max(start, int(last))
        return start

    def _is_due(self, trainer: pl.Trainer) -> bool:
        if not all(cb.finished for cb in self._pruning_callbacks(trainer)):
            return False
        if self.start_step is not None:
            return trainer.global_step >= self.start_step
        return trainer.current_epoch >= self._effective_start_epoch(trainer)

    def _apply_freezing(self, trainer: pl.Trainer) -> None:
        hosted, progress = self._network.hosted, self._progress
        if hosted is None:
            return
        epoch = trainer.current_epoch
        if (
            not progress.observers_frozen
            and self.freeze_observers_epoch is not None
            and epoch >= self.freeze_observers_epoch
        ):
            progress.observers_frozen = True
            self._info(f"froze the activation observers at epoch {epoch}.")
        if not progress.bn_frozen and self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            progress.bn_frozen = True
            self._info(f"froze the BatchNorm statistics at epoch {epoch}.")
        self._impl.set_frozen(hosted, observers=progress.observers_frozen, bn=progress.bn_frozen)

    # ------------------------------------------------------------------ stage changes

    def _start_fake_quant(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        network = self._network.current(pl_module)
        example = self._example_inputs(pl_module, network, batch)
        snapshot = TrainingStateSnapshot.capture(trainer, pl_module)
        self._prepare_(pl_module, network, example)
        snapshot.restore_(trainer, pl_module)
        self._progress.started_at = trainer.current_epoch
        self._apply_freezing(trainer)
        self._info(
            f"inserted fake quantization ({self.backend}) into {self._network.describe()} at epoch"
            f" {trainer.current_epoch}, step {trainer.global_step}."
        )

    def _trial_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trial_prepare(
            trainer,
            pl_module,
            backend=self._impl,
            backend_name=self.backend,
            network=self._network,
            pruning=self._pruning_callbacks(trainer),
            example_inputs=lambda network: self._example_inputs(pl_module, network, None),
        )

    def _prepare_(self, pl_module: pl.LightningModule, network: nn.Module, example: Tensor) -> None:
        """Trace ``network`` and host its fake-quant version; the LightningModule is untouched on failure."""
        example = example.detach()
        progress = self._progress
        progress.costs = {}
        prepared = self._impl.prepare(network, example)
        progress.example_shape = list(example.shape)
        progress.example_dtype = str(example.dtype)
        self._network.float_network = network
        self._network.host_(pl_module, prepared)
        progress.stage = "fake_quant"
        with contextlib.suppress(Exception), training_mode(prepared, False):
            # A cost figure is not worth failing the run for.
            macs, params = count_macs_and_params(prepared, example[:1])
            progress.costs = {"macs": macs, "params": params}

    def _convert(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        prepared = self._network.hosted
        if prepared is None:
            raise RuntimeError("QuantizationAwareTraining has no fake-quant network to convert.")
        if trainer is not None and trainer.world_size > 1:
            # Each rank's observers and BN statistics saw its own last batches; convert rank 0's everywhere.
            broadcast_tensors_(prepared)
        converted = self._impl.convert(prepared)
        self._progress.qparams = self._impl.qparams(converted)
        self._network.host_(pl_module, converted)
        self._progress.stage = "converted"
        self._measure()
        if self._summary is not None:
            self._info(
                f"converted {self._network.describe()} to int8: {self._summary.size_bytes} artifact bytes,"
                f" {self._summary.macs} MACs, {self._summary.params} params."
            )

    def _measure(self) -> None:
        """Artifact bytes, MACs and params of the converted network (``summary``)."""
        self._summary = None
        hosted = self._network.hosted
        if self._progress.stage != "converted" or hosted is None:
            return
        self._summary = measure_artifact(
            hosted,
            lambda: recorded_example(hosted, self._progress, self._pl_module),
            steps=self._steps(),
            architecture=self._network.architecture(),
        )
        if self._summary is not None:
            self._progress.costs = {"macs": self._summary.macs, "params": self._summary.params}

    def _convert_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fake-quant checkpoint evaluated outside `fit` runs as the int8 model `fit` would have produced.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting and self._progress.stage == "fake_quant" and self.convert_on_fit_end:
            self._convert(trainer, pl_module)
            if self._network.hosted is not None:
                self._network.hosted.eval()

    def _revert_to_float(self, pl_module: pl.LightningModule) -> None:
        hosted = self._network.hosted
        if self._progress.stage == "float" or hosted is None:
            return
        restored = self._impl.revert(hosted, self._network.float_network)
        self._network.unhost_(pl_module, restored)
        self._progress.stage = "float"
        self._progress.qparams = {}

    # ------------------------------------------------------------------ checkpoints

    def _restore_from_(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Give ``pl_module`` the structure of ``checkpoint`` (pruned first, then QAT) before its weights load."""
        self._network.resolve_(pl_module, self.module)
        self._revert_to_float(pl_module)
        for cb in self._pruning_callbacks(trainer):
            cb.restore_structure_(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        target = check_checkpoint_state(
            state,
            fitting=trainer.state.fn == TrainerFn.FITTING,
            backend=self.backend,
            network_name=self._network.name,
        )
        if target == "float":
            return
        network = self._network.current(pl_module)
        dtype = state.get("example_input_dtype") or "torch.float32"
        example = make_example(state["example_input_shape"], dtype, device_of(network, pl_module))
        self._prepare_(pl_module, network, example)
        self.load_state_dict(dict(state))
        hosted, progress = self._network.hosted, self._progress
        assert hosted is not None
        if target == "converted":
            self._impl.calibrate(hosted, example)
            converted = self._impl.convert(hosted)
            self._impl.apply_qparams(converted, state.get("qparams", {}))
            progress.qparams = self._impl.qparams(converted)
            self._network.host_(pl_module, converted)
            progress.stage = "converted"
            weights = checkpoint.get("state_dict")
            if isinstance(weights, dict):
                unflatten_tensor_subclasses_(weights, pl_module)
        else:
            self._impl.set_frozen(hosted, observers=progress.observers_frozen, bn=progress.bn_frozen)
        self._info(f"rebuilt the {target} structure of {self._network.describe()} from the checkpoint.")

    # ------------------------------------------------------------------ inputs, steps, messages

    def _steps(self) -> tuple[str, ...]:
        trainer = self._pl_module._trainer if self._pl_module is not None else None
        steps = [cb.step_label for cb in self._pruning_callbacks(trainer)] if trainer is not None else []
        return (*steps, f"qat:{self.backend}")

    def _example_inputs(self, pl_module: pl.LightningModule, network: nn.Module, batch: Any) -> Tensor:
        return find_example_inputs(
            pl_module, network, batch, example_input_shape=self.example_input_shape, progress=self._progress
        )

    def _log_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._progress.stage
        if trainer.sanity_checking or trainer.state.fn == TrainerFn.FITTING or stage != "converted":
            return
        if self._summary is None:
            self._measure()
        pl_module.log("qat/stage", float(STAGES.index(stage)), sync_dist=True)
        if self._summary is not None:
            for key, value in summary_metrics(self._summary).items():
                pl_module.log(key, value, sync_dist=True)

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: {message}")
