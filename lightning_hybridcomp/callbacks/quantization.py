"""Quantization-aware training as a Lightning callback that ends in a real int8 model.

Fake quantization goes into any LightningModule's network at a chosen epoch; at the end of ``fit`` the
network becomes an int8 program (PT2E for conv nets, torchao for Linear/Embedding nets) that can be saved.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.fx import GraphModule
from typing_extensions import override

from lightning_hybridcomp._lightning import (
    CheckpointLoadInterceptor,
    TrainingStateSnapshot,
    copy_network,
    device_of,
    example_from_batch,
    forward_network,
    make_example,
    peek_training_inputs,
    refuse_spawning_strategy,
    replace_module_,
    resolve_module,
    training_mode,
)
from lightning_hybridcomp._validation import expect_bool, expect_choice, expect_int, expect_shape
from lightning_hybridcomp.artifacts import ArtifactMetadata, build_artifact, save_artifact
from lightning_hybridcomp.callbacks._pruning_utils import APPLIED_HISTORY_ATTR
from lightning_hybridcomp.callbacks._subclass_state import (
    flatten_tensor_subclasses_,
    unflatten_tensor_subclasses_,
)
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.qat_backends import BACKENDS, QuantizationBackend, make_backend
from lightning_hybridcomp.profiling import count_macs
from lightning_hybridcomp.programs import (
    ExportError,
)

__all__ = ["QuantizationAwareTraining"]

_STATE_VERSION = 1
_STAGES = ("float", "fake_quant", "converted")
_LEGACY_BACKENDS = ("fbgemm", "qnnpack", "x86", "onednn", "eager", "fx")
_HOST_NAME = "qat_network"


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
        hint = ""
        if isinstance(backend, str) and backend.lower() in _LEGACY_BACKENDS:
            hint = (
                "The eager/FX engines of `torch.ao.quantization` are deprecated; 'x86_pt2e' is their PT2E"
                " successor and produces the same int8 x86 kernels."
            )
        key = expect_choice(backend, "backend", BACKENDS, hint=hint)
        if module is not None and (not isinstance(module, str) or not module):
            raise TypeError(
                f"Expected `module` to be None or the fully qualified name of a submodule, got {module!r}."
            )
        expect_int(start_epoch, "start_epoch")
        expect_int(start_step, "start_step", optional=True)
        if start_step is not None and start_epoch != 0:
            raise ValueError(
                f"Expected only one of `start_epoch` and `start_step`, got start_epoch={start_epoch} and"
                f" start_step={start_step}. Keep start_epoch=0 when starting at a step."
            )
        expect_int(freeze_observers_epoch, "freeze_observers_epoch", optional=True)
        expect_int(freeze_bn_epoch, "freeze_bn_epoch", optional=True)
        if freeze_observers_epoch is not None:
            if key == "linear_int8":
                raise ValueError(
                    "Expected `freeze_observers_epoch` to be None for backend 'linear_int8': its activations are"
                    " quantized dynamically per token, there are no observers to freeze."
                )
            if start_step is None and freeze_observers_epoch <= start_epoch:
                raise ValueError(
                    f"Expected `freeze_observers_epoch` to be after `start_epoch`={start_epoch}, got"
                    f" {freeze_observers_epoch}: frozen before they observed anything, the activation ranges would"
                    " stay empty."
                )
        shape = expect_shape(example_input_shape, "example_input_shape")
        expect_bool(convert_on_fit_end, "convert_on_fit_end")
        expect_bool(log_fake_quant_error, "log_fake_quant_error")
        expect_bool(verbose, "verbose")

        self.backend = key
        self.module = module
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.convert_on_fit_end = convert_on_fit_end
        self.example_input_shape = shape
        self.log_fake_quant_error = log_fake_quant_error
        self.verbose = verbose

        self._impl: QuantizationBackend = make_backend(key)
        self._stage = "float"
        self._network_name: str | None = None
        self._example_shape: list[int] | None = None
        self._example_dtype = "torch.float32"
        self._started_at: int | None = None
        self._observers_frozen = False
        self._bn_frozen = False
        self._qparams: dict[str, dict[str, float | int]] = {}
        self._float_network: nn.Module | None = None
        self._hosted: nn.Module | None = None
        self._pl_module: pl.LightningModule | None = None
        self._costs: dict[str, int] = {}
        self._summary: ArtifactMetadata | None = None
        self._wait_reported = False
        self._interceptor = CheckpointLoadInterceptor()
        self._error_hook: Any = None
        self._captured: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------ public read-only state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    @property
    def stage(self) -> str:
        """``"float"``, ``"fake_quant"`` or ``"converted"``."""
        return self._stage

    @property
    def quantized_network(self) -> nn.Module | None:
        """The fake-quant or int8 network now in the LightningModule (``None`` in the float stage)."""
        return self._hosted if self._stage != "float" else None

    @property
    def summary(self) -> ArtifactMetadata | None:
        """Metadata of the converted model's artifact (bytes, MACs, params), known after conversion."""
        return self._summary

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
        network = self._require_converted()
        example = example_inputs if example_inputs is not None else self._random_example(network)
        return save_artifact(
            network,
            path,
            example,
            steps=self._steps(),
            extra=extra,
            architecture=architecture or self._architecture(),
        )

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_spawning_strategy(trainer, stage, "float model, which cannot hold the quantized structure")
        self._pl_module = pl_module
        if self._network_name is None:
            self._network_name = self._resolve_name(pl_module)
        network = self._current_network(pl_module)
        if stage == TrainerFn.FITTING:
            self._check_example_source(pl_module, network)
            self._check_schedule(trainer)
        # Lightning reads a checkpoint only after every setup and loads its weights right after the
        # LightningModule's `on_load_checkpoint`; the structure the weights need is built there.
        self._interceptor.install(
            pl_module, lambda checkpoint: self._restore_from_(trainer, pl_module, checkpoint)
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stage == "converted":
            raise RuntimeError(
                "The network was already converted to int8 by this QuantizationAwareTraining callback and cannot be"
                " trained further. Fit a fresh model, or resume an earlier checkpoint with"
                " `trainer.fit(model, ckpt_path=...)`."
            )
        start = self._effective_start_epoch(trainer)
        if (
            self.start_step is None
            and start != self.start_epoch
            and not self._wait_reported
            and self._stage == "float"
        ):
            self._wait_reported = True
            rank_zero_warn(
                f"QuantizationAwareTraining: `start_epoch`={self.start_epoch} comes before the last pruning step"
                f" (epoch {start}); fake quantization waits and starts at epoch {start}, after pruning."
            )
        max_epochs = trainer.max_epochs
        if self._stage == "float" and max_epochs is not None and max_epochs >= 0 and start >= max_epochs:
            raise ValueError(
                f"Expected fake quantization to start before `max_epochs`={max_epochs}, but it would start at epoch"
                f" {start} (after the last pruning step). Raise max_epochs to at least {start + 1}."
            )
        if self._stage == "float":
            self._trial_prepare(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stage == "float" and self._is_due(trainer):
            self._start_fake_quant(trainer, pl_module, batch)
        if self._stage == "fake_quant":
            self._apply_freezing(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("qat/stage", float(_STAGES.index(self._stage)), on_epoch=True, sync_dist=True)
        if self._costs:
            pl_module.log("qat/macs", float(self._costs["macs"]), on_epoch=True, sync_dist=True)
            pl_module.log("qat/params", float(self._costs["params"]), on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stage == "float":
            rank_zero_warn(
                "QuantizationAwareTraining: training ended before fake quantization started"
                f" (start_epoch={self.start_epoch}, start_step={self.start_step}); the model is still fp32."
            )
            return
        if self._stage == "fake_quant" and self.convert_on_fit_end:
            self._convert(trainer, pl_module)
            if self._summary is not None:
                metrics = {
                    "qat/size_bytes": float(self._summary.size_bytes),
                    "qat/macs": float(self._summary.macs),
                    "qat/params": float(self._summary.params),
                }
                trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
                if trainer.is_global_zero:
                    for logger in trainer.loggers:
                        logger.log_metrics(metrics, step=trainer.global_step)

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
        if trainer.sanity_checking or not self.log_fake_quant_error or self._stage != "fake_quant":
            return
        if self._hosted is not None and self._error_hook is None:
            self._error_hook = self._hosted.register_forward_hook(self._capture_output)

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
        if trainer.sanity_checking or not self._captured:
            return
        captured, self._captured = self._captured, []
        errors = [self._fake_quant_error(pl_module, inputs, output) for inputs, output in captured]
        error = sum(errors) / len(errors)
        pl_module.log("qat/fake_quant_error", error, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_error_hook()
        self._log_final(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_final(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_error_hook()
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
        return {
            "version": _STATE_VERSION,
            "backend": self.backend,
            "stage": self._stage,
            "network_name": self._network_name,
            "example_input_shape": list(self._example_shape) if self._example_shape else None,
            "example_input_dtype": self._example_dtype,
            "started_at": self._started_at,
            "observers_frozen": self._observers_frozen,
            "bn_frozen": self._bn_frozen,
            "qparams": {k: dict(v) for k, v in self._qparams.items()},
            "costs": dict(self._costs),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The structure itself was rebuilt from the same state before the weights loaded; these are the counters.
        self._started_at = state_dict.get("started_at")
        self._observers_frozen = bool(state_dict.get("observers_frozen", False))
        self._bn_frozen = bool(state_dict.get("bn_frozen", False))
        self._costs = {k: int(v) for k, v in state_dict.get("costs", {}).items()}
        shape = state_dict.get("example_input_shape")
        self._example_shape = list(shape) if shape else self._example_shape
        self._example_dtype = str(state_dict.get("example_input_dtype") or self._example_dtype)
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
        hosted = self._hosted
        if hosted is None:
            return
        epoch = trainer.current_epoch
        if (
            not self._observers_frozen
            and self.freeze_observers_epoch is not None
            and epoch >= self.freeze_observers_epoch
        ):
            self._observers_frozen = True
            self._info(f"froze the activation observers at epoch {epoch}.")
        if not self._bn_frozen and self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            self._bn_frozen = True
            self._info(f"froze the BatchNorm statistics at epoch {epoch}.")
        self._impl.set_frozen(hosted, observers=self._observers_frozen, bn=self._bn_frozen)

    # ------------------------------------------------------------------ stage changes

    def _start_fake_quant(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        network = self._current_network(pl_module)
        example = self._example_inputs(pl_module, network, batch)
        snapshot = TrainingStateSnapshot.capture(trainer, pl_module)
        self._prepare_(pl_module, network, example)
        snapshot.restore_(trainer, pl_module)
        self._started_at = trainer.current_epoch
        self._apply_freezing(trainer)
        self._info(
            f"inserted fake quantization ({self.backend}) into {self._describe_network()} at epoch"
            f" {trainer.current_epoch}, step {trainer.global_step}."
        )

    def _trial_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Insert fake quantization into a copy of the network pruning will leave, before any training.

        A network the backend cannot trace or annotate is refused now, with the upstream reason in one
        line, instead of after the pruning epochs were paid for.
        """
        # The trial draws no random numbers from the run's generators and repeats no warning.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = self._network_after_pruning(trainer, pl_module)
            example = self._trial_example(trainer, pl_module, network)
            if example is not None:
                self._try_prepare(network, example)

    def _try_prepare(self, network: nn.Module, example: Tensor) -> None:
        self._impl.check(network)
        try:
            self._impl.prepare(network, example)
        except ExportError:
            raise  # already the package's message, with torch.export's reason and a hint
        except Exception as err:  # export and torchao raise anything from UserError to AssertionError
            reason = " ".join(str(err).split())[:400] or "no message"
            raise ValueError(
                f"QuantizationAwareTraining cannot quantize {self._describe_network()} with backend"
                f" {self.backend!r}: a trial preparation failed ({type(err).__name__}: {reason}). {self._impl.hint}"
                " Nothing was trained or changed."
            ) from None

    def _network_after_pruning(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """A copy of the network to quantize with the structure an attached StructuredPruning will leave."""
        name = self._network_name or ""
        for cb in self._pruning_callbacks(trainer):
            pruned_name = cb.network
            preview = cb.preview_network(trainer, pl_module)
            if preview is None:
                continue
            if pruned_name == name:
                return preview
            if not pruned_name or name.startswith(pruned_name + "."):
                return preview.get_submodule(name[len(pruned_name) :].lstrip("."))
        return copy_network(self._current_network(pl_module))

    def _trial_example(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module
    ) -> Tensor | None:
        with contextlib.suppress(RuntimeError):
            return self._example_inputs(pl_module, network, None)
        peeked = peek_training_inputs(trainer)
        return None if peeked is None else peeked.to(device_of(network, pl_module))

    def _prepare_(self, pl_module: pl.LightningModule, network: nn.Module, example: Tensor) -> None:
        """Trace ``network`` and host its fake-quant version; the LightningModule is untouched on failure."""
        example = example.detach()
        self._costs = {}
        prepared = self._impl.prepare(network, example)
        self._example_shape = list(example.shape)
        self._example_dtype = str(example.dtype)
        self._float_network = network
        self._host(pl_module, prepared)
        self._stage = "fake_quant"
        with contextlib.suppress(Exception):  # a cost figure is not worth failing the run for
            self._costs = _costs(prepared, example[:1])

    def _convert(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        prepared = self._hosted
        if prepared is None:
            raise RuntimeError("QuantizationAwareTraining has no fake-quant network to convert.")
        if trainer is not None and trainer.world_size > 1:
            # Each rank's observers and BN statistics saw its own last batches; convert rank 0's everywhere.
            _broadcast_tensors_(trainer, prepared)
        converted = self._impl.convert(prepared)
        self._qparams = self._impl.qparams(converted)
        self._host(pl_module, converted)
        self._stage = "converted"
        self._measure()
        if self._summary is not None:
            self._info(
                f"converted {self._describe_network()} to int8: {self._summary.size_bytes} artifact bytes,"
                f" {self._summary.macs} MACs, {self._summary.params} params."
            )

    def _measure(self) -> None:
        """Artifact bytes, MACs and params of the converted network (``summary``)."""
        self._summary = None
        if self._stage != "converted" or self._hosted is None:
            return
        try:
            example = self._random_example(self._hosted)
            _, self._summary = build_artifact(
                self._hosted, example, steps=self._steps(), architecture=self._architecture()
            )
        except Exception as err:  # a converted model that cannot be re-exported still evaluates
            rank_zero_warn(f"QuantizationAwareTraining: could not measure the int8 artifact ({err}).")
            return
        self._costs = {"macs": self._summary.macs, "params": self._summary.params}

    def _convert_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fake-quant checkpoint evaluated outside `fit` runs as the int8 model `fit` would have produced.
        if trainer.state.fn != TrainerFn.FITTING and self._stage == "fake_quant" and self.convert_on_fit_end:
            self._convert(trainer, pl_module)
            if self._hosted is not None:
                self._hosted.eval()

    def _revert_to_float(self, pl_module: pl.LightningModule) -> None:
        if self._stage == "float" or self._hosted is None:
            return
        restored = self._impl.revert(self._hosted, self._float_network)
        self._unhost(pl_module, restored)
        self._stage = "float"
        self._qparams = {}

    # ------------------------------------------------------------------ checkpoints

    def _restore_from_(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Give ``pl_module`` the structure of ``checkpoint`` (pruned first, then QAT) before its weights load."""
        self._revert_to_float(pl_module)
        for cb in self._pruning_callbacks(trainer):
            cb.restore_structure_(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        target = state.get("stage", "float") if isinstance(state, Mapping) else "float"
        if target not in _STAGES:
            raise RuntimeError(f"The checkpoint records an unknown QAT stage {target!r}.")
        if target == "float" or state is None:
            return
        if trainer.state.fn == TrainerFn.FITTING and target == "converted":
            raise RuntimeError(
                "The checkpoint holds the converted int8 model, which cannot be trained further. Evaluate it with"
                " `trainer.test(model, ckpt_path=...)`, or resume from a checkpoint written before conversion."
            )
        saved_backend = state.get("backend", self.backend)
        if saved_backend != self.backend:
            raise RuntimeError(
                f"The checkpoint was quantized with backend {saved_backend!r}, this callback uses {self.backend!r}."
                f" Set `backend={saved_backend!r}`."
            )
        saved_name = state.get("network_name")
        if saved_name is not None and saved_name != self._network_name:
            raise RuntimeError(
                f"The checkpoint quantized network {saved_name!r}, but this callback selects {self._network_name!r}."
                " Set `module` to the same submodule."
            )
        shape = state.get("example_input_shape")
        if not shape:
            raise RuntimeError("The checkpoint's QAT state has no example input shape; it cannot be rebuilt.")
        network = self._current_network(pl_module)
        dtype = state.get("example_input_dtype") or "torch.float32"
        example = make_example(shape, dtype, device_of(network, pl_module))
        self._prepare_(pl_module, network, example)
        self.load_state_dict(dict(state))
        if target == "converted":
            hosted = self._hosted
            assert hosted is not None
            self._impl.calibrate(hosted, example)
            converted = self._impl.convert(hosted)
            self._impl.apply_qparams(converted, state.get("qparams", {}))
            self._qparams = self._impl.qparams(converted)
            self._host(pl_module, converted)
            self._stage = "converted"
            weights = checkpoint.get("state_dict")
            if isinstance(weights, dict):
                unflatten_tensor_subclasses_(weights, pl_module)
        elif self._hosted is not None:
            self._impl.set_frozen(self._hosted, observers=self._observers_frozen, bn=self._bn_frozen)
        self._info(f"rebuilt the {target} structure of {self._describe_network()} from the checkpoint.")

    # ------------------------------------------------------------------ hosting

    def _resolve_name(self, pl_module: pl.LightningModule) -> str:
        if self.module is not None:
            resolve_module(pl_module, self.module, arg_name="module")
            return self.module
        forward = forward_network(pl_module)
        if forward is not None:
            return next(name for name, child in pl_module.named_children() if child is forward)
        return ""

    def _current_network(self, pl_module: pl.LightningModule) -> nn.Module:
        name = self._network_name
        if not name:
            return pl_module
        return resolve_module(pl_module, name, arg_name="module")

    def _host(self, pl_module: pl.LightningModule, new: nn.Module) -> None:
        history = getattr(self._float_network, APPLIED_HISTORY_ATTR, None)
        if history is not None and new is not self._float_network:
            # StructuredPruning recognises its network by this record; the traced copy must carry it too.
            object.__setattr__(new, APPLIED_HISTORY_ATTR, history)
        if not self._network_name:
            if new is not pl_module:
                pl_module.add_module(_HOST_NAME, new)
                object.__setattr__(pl_module, "forward", types.MethodType(_hosted_forward, pl_module))
        elif pl_module.get_submodule(self._network_name) is not new:
            replace_module_(pl_module, self._network_name, new)
        self._hosted = new

    def _unhost(self, pl_module: pl.LightningModule, restored: nn.Module) -> None:
        if not self._network_name:
            if _HOST_NAME in pl_module._modules:
                delattr(pl_module, _HOST_NAME)
            pl_module.__dict__.pop("forward", None)
        elif pl_module.get_submodule(self._network_name) is not restored:
            replace_module_(pl_module, self._network_name, restored)
        self._hosted = None
        self._float_network = None

    def _describe_network(self) -> str:
        return f"module {self._network_name!r}" if self._network_name else "the LightningModule's forward"

    def _architecture(self) -> str:
        network = self._float_network
        if network is None or isinstance(network, GraphModule):
            return "network"
        return type(network).__name__

    def _steps(self) -> tuple[str, ...]:
        trainer = self._pl_module._trainer if self._pl_module is not None else None
        steps = [cb.step_label for cb in self._pruning_callbacks(trainer)] if trainer is not None else []
        return (*steps, f"qat:{self.backend}")

    # ------------------------------------------------------------------ inputs and checks

    def _example_inputs(self, pl_module: pl.LightningModule, network: nn.Module, batch: Any) -> Tensor:
        device = device_of(network, pl_module)
        if self.example_input_shape is not None:
            return make_example(self.example_input_shape, device=device)
        if self._example_shape is not None:
            return make_example(self._example_shape, self._example_dtype, device)
        example = pl_module.example_input_array
        if isinstance(example, Tensor):
            return example.to(device)
        if batch is not None:
            return example_from_batch(batch).to(device)
        raise RuntimeError(
            "QuantizationAwareTraining could not find example inputs; pass `example_input_shape` to the callback."
        )

    def _random_example(self, network: nn.Module) -> Tensor:
        if not self._example_shape:
            raise RuntimeError("QuantizationAwareTraining does not know the network's input shape yet.")
        return make_example(self._example_shape, self._example_dtype, device_of(network, self._pl_module))

    def _check_example_source(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        whole = not self._network_name or network is forward_network(pl_module) or self._stage != "float"
        if self.example_input_shape is None and not whole:
            raise ValueError(
                f"Expected `example_input_shape` for module {self._network_name!r}: it is a submodule, so neither"
                " `example_input_array` nor a training batch can be fed to it. Pass e.g."
                " example_input_shape=[2, 64, 8, 8]."
            )

    def _check_schedule(self, trainer: pl.Trainer) -> None:
        max_epochs = trainer.max_epochs
        if (
            self.start_step is None
            and max_epochs is not None
            and max_epochs >= 0
            and self.start_epoch >= max_epochs
        ):
            raise ValueError(
                f"Expected `start_epoch` to be below `max_epochs`={max_epochs}, got {self.start_epoch}: fake"
                " quantization would never start."
            )
        max_steps = trainer.max_steps
        if (
            self.start_step is not None
            and max_steps is not None
            and max_steps >= 0
            and self.start_step >= max_steps
        ):
            raise ValueError(
                f"Expected `start_step` to be below `max_steps`={max_steps}, got {self.start_step}: fake"
                " quantization would never start."
            )

    def _require_converted(self) -> nn.Module:
        if self._stage != "converted" or self._hosted is None:
            raise RuntimeError(
                f"Expected the network to be converted to int8 before saving an artifact, but it is in the"
                f" {self._stage!r} stage. Call this after `trainer.fit` with `convert_on_fit_end=True` (or after"
                " `trainer.test(model, ckpt_path=...)` on a QAT checkpoint)."
            )
        return self._hosted

    # ------------------------------------------------------------------ logging

    def _capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            self._captured.append((args[0].detach(), output.detach()))

    def _fake_quant_error(self, pl_module: pl.LightningModule, inputs: Tensor, output: Tensor) -> float:
        hook, self._error_hook = self._error_hook, None
        if hook is not None:
            hook.remove()  # the reference forward below must not be captured
        try:
            with torch.no_grad():
                reference = self._impl.float_forward(self._hosted, self._float_network, pl_module, inputs)
        finally:
            if self._hosted is not None:
                self._error_hook = self._hosted.register_forward_hook(self._capture_output)
        return float(
            torch.linalg.vector_norm(output - reference)
            / torch.linalg.vector_norm(reference).clamp_min(1e-12)
        )

    def _remove_error_hook(self) -> None:
        if self._error_hook is not None:
            self._error_hook.remove()
            self._error_hook = None
        self._captured = []

    def _log_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn == TrainerFn.FITTING or self._stage != "converted":
            return
        if self._summary is None:
            self._measure()
        pl_module.log("qat/stage", float(_STAGES.index(self._stage)), sync_dist=True)
        if self._summary is not None:
            pl_module.log("qat/size_bytes", float(self._summary.size_bytes), sync_dist=True)
            pl_module.log("qat/macs", float(self._summary.macs), sync_dist=True)
            pl_module.log("qat/params", float(self._summary.params), sync_dist=True)

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: {message}")


def _hosted_forward(self: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, _HOST_NAME)(*args, **kwargs)


def _costs(network: nn.Module, sample: Tensor) -> dict[str, int]:
    with training_mode(network, False):
        macs = count_macs(network, sample)
    params = sum(p.numel() for p in network.parameters())
    return {"macs": macs, "params": params}


def _broadcast_tensors_(trainer: pl.Trainer, module: nn.Module) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
