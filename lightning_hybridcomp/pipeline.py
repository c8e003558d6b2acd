"""The main job: baseline -> compressed experts -> Mixture of Experts -> report, resumable from disk.

Each phase writes into its own folder and marks itself finished with ``done.json`` only after all its
files are in place, so an interrupted run (a kill, a full disk) never loses a finished phase, and a
re-run skips what is done and resumes an interrupted phase from its last checkpoint. Under DDP every rank
runs every phase's Trainer; global rank zero alone writes the files and measures the models, while the
other ranks wait for it (:func:`~lightning_hybridcomp._distributed.on_rank_zero`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor, nn

from lightning_hybridcomp._distributed import broadcast_from_rank_zero, is_global_zero, on_rank_zero
from lightning_hybridcomp._graph_passes import signed_int8_activations
from lightning_hybridcomp._io import UnreadableCheckpointError, atomic_path, read_checkpoint
from lightning_hybridcomp._lightning import (
    PhaseProgress,
    completed_epochs,
    declared_example_input,
    inputs_from_batch,
    labels_from_batch,
)
from lightning_hybridcomp.artifacts import compile_artifact, load_artifact, save_artifact
from lightning_hybridcomp.callbacks.distillation import KnowledgeDistillation
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.qat_backends import PT2E_BACKENDS
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import ClassEmphasis
from lightning_hybridcomp.pipeline_checks import check_pipeline
from lightning_hybridcomp.pipeline_config import (
    ExpertConfig,
    MoEConfig,
    MoERun,
    PipelineConfig,
    PipelineError,
    load_pipeline_config,
    trainer_callbacks,
    tuned_backend,
)
from lightning_hybridcomp.pipeline_plan import (
    DONE_FILE,
    PHASE_FILE,
    PhaseSpec,
    PlannedPhase,
    format_plan,
    phase_lock,
    phase_specs,
    plan_run,
    prepare_run_dir,
    read_json,
    write_json,
)
from lightning_hybridcomp.profiling import interleaved_latencies
from lightning_hybridcomp.report import ResultRow, report_table, write_report

__all__ = ["FLOAT_ARTIFACT", "Pipeline", "PipelineError", "run_pipeline"]

#: Next to each PT2E-quantized expert's ``expert.pt2``: its fp32 twin, which a ``"tuned"`` MoE fine-tunes.
FLOAT_ARTIFACT = "expert-float.pt2"
# What each MoE row records of :meth:`MoELightningModule.routing_headroom` on the test split.
# (the last two only with ``assignment_target: classes``).
HEADROOM_KEYS = (
    "ensemble_accuracy",
    "oracle_accuracy",
    "agreement",
    "gate_hit_rate",
    "class_routing_accuracy",
    "specialist_accuracy",
)


def _tensorboard_available() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Phase:
    spec: PhaseSpec
    run: Callable[[], dict[str, Any]]

    @property
    def name(self) -> str:
        return self.spec.label


#: The package's callbacks that the phases add where the configuration asks for them: refused in
#: ``trainer.callbacks``.
_PHASE_CALLBACKS: dict[type, str] = {
    StructuredPruning: "`experts[i].pruning`",
    QuantizationAwareTraining: "`experts[i].quantization`",
    KnowledgeDistillation: "`experts[i].distillation`, `moe.distillation`",
}


class Pipeline:
    """One run of the two-phase method, resumable from its run directory.

    Args:
        config: the run's configuration (see :mod:`lightning_hybridcomp.pipeline_config`).
        force: redo every phase: without ``only``, delete what an earlier run left in ``config.run_dir``
            first (the pipeline's own files only); with ``only``, redo just those phases.
        only: run just these phases (keys as the plan prints them, e.g. ``"experts/lamp-60"``), each of
            which needs the phases it reads finished already; separate processes may run different
            phases of one run directory at the same time.
        say: where progress lines go (``print`` by default); only global rank zero prints under DDP.

    Raises:
        PipelineConfigError: listing every problem :func:`~lightning_hybridcomp.pipeline_checks.check_pipeline`
            finds by building each phase's components, each with its YAML path.
        ValueError: if ``only`` names a phase the configuration does not have (the message lists them).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        force: bool = False,
        only: Sequence[str] = (),
        say: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.force = force
        self.only = [name.strip("/") for name in only]
        self.say = say
        self.run_dir = Path(config.run_dir)
        self.specs = phase_specs(config)
        unknown = sorted(set(self.only) - {spec.key for spec in self.specs})
        if unknown:
            valid = [spec.key for spec in self.specs]
            raise ValueError(
                f"Expected `--only` to name phases of this configuration, got {unknown}. Phases: {valid}."
            )
        self._datamodule: pl.LightningDataModule | None = None
        self._phase_times: dict[str, float] = {}
        # Lightning's DDP launcher lowers each rank's thread count; rank zero measures alone, with these.
        self._threads = torch.get_num_threads()
        check_pipeline(self)

    def _say(self, message: str) -> None:
        if is_global_zero():
            self.say(message)

    # ------------------------------------------------------------------ run directory

    def _prepare_run_dir(self) -> None:
        prepare_run_dir(self.run_dir, self.config, force=self.force and not self.only)

    def plan(self) -> list[PlannedPhase]:
        """What a run would do with each phase (``only``'s alone when set), and why; reads the run directory only."""
        return plan_run(self.run_dir, self.specs, force=self.force, only=self.only)

    # ------------------------------------------------------------------ shared pieces

    @property
    def datamodule(self) -> pl.LightningDataModule:
        if self._datamodule is None:
            self._datamodule = self.config.data.instantiate(pl.LightningDataModule, section="data")
            self._datamodule.prepare_data()
            self._datamodule.setup("fit")
        return self._datamodule

    def _example_inputs(self, model: nn.Module | None = None) -> Tensor:
        example = declared_example_input(model) if model is not None else None
        if example is not None:
            return example[:1].detach().cpu()
        batch = next(iter(self.datamodule.val_dataloader()))
        return inputs_from_batch(batch)[:1].detach().cpu()

    def _loggers(self, name: str) -> list[Logger]:
        # One version folder per attempt, so a resumed phase never overwrites the interrupted one's logs.
        loggers: list[Logger] = [CSVLogger(str(self.run_dir / "logs"), name=name)]
        if _tensorboard_available():
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(self.run_dir / "logs" / "tensorboard"), name=name))
        return loggers

    def phase_trainer(
        self,
        folder: Path,
        label: str,
        max_epochs: int,
        callbacks: list[Callback],
        *,
        user_callbacks: bool = True,
    ) -> pl.Trainer:
        """The Trainer of one phase: its checkpoints in ``folder``, its logs under ``logs/<label>``.

        ``callbacks`` are the phase's own; ``trainer.callbacks`` are built anew and follow them unless
        ``user_callbacks`` is ``False``.
        """
        # The latest epoch's checkpoint, kept under the name `last.ckpt`. (`save_last=True` with
        # `save_top_k=0` writes `last.ckpt` only at the end of fit: Lightning 2.6 saves "last" only at steps
        # where a top-k checkpoint was saved, so a phase killed mid-training would start again.)
        checkpoint = ModelCheckpoint(
            dirpath=str(folder / "checkpoints"), filename="last", save_top_k=1, enable_version_counter=False
        )
        extra = dict(self.config.trainer)
        entries = extra.pop("callbacks", [])
        user = trainer_callbacks(entries, Callback, _PHASE_CALLBACKS) if user_callbacks else []
        kwargs: dict[str, Any] = {
            "max_epochs": max_epochs,
            "logger": self._loggers(label) if extra.pop("logger", True) else False,
            "callbacks": [*callbacks, *user, PhaseProgress(label, self._say), checkpoint],
            "default_root_dir": str(folder),
            "log_every_n_steps": 10,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
        }
        kwargs.update(extra)  # the configuration refuses `max_epochs` and `default_root_dir` there
        return pl.Trainer(**kwargs)

    def _fit(
        self,
        trainer: pl.Trainer,
        model: pl.LightningModule,
        folder: Path,
        datamodule: pl.LightningDataModule | None = None,
    ) -> None:
        """Fit, resuming from the phase's last checkpoint when an earlier run was interrupted.

        A last checkpoint of a finished fit (the run stopped before the phase's files were written) is
        restored with ``validate`` instead: it rebuilds the final (pruned, int8) structure and weights
        without training. A last checkpoint that cannot be read (Lightning writes it atomically, so only a
        file damaged on disk or copied in part) is deleted and the phase starts again from its first epoch.
        Under DDP, rank zero's reading of the checkpoint decides for every rank. ``datamodule`` defaults to
        the configured one.
        """
        datamodule = self.datamodule if datamodule is None else datamodule
        last = folder / "checkpoints" / "last.ckpt"
        completed: int | None = None
        unreadable: str | None = None
        if last.is_file():
            try:
                completed = completed_epochs(last)
            except UnreadableCheckpointError as err:
                unreadable = str(err)
        completed, unreadable = broadcast_from_rank_zero((completed, unreadable))
        if unreadable is not None:
            self._say(f"{unreadable} Deleting it; this phase starts again from its first epoch.")
            on_rank_zero(lambda: last.unlink(missing_ok=True), what=f"deleting {last}")
        if completed is None:
            trainer.fit(model, datamodule=datamodule)
            return
        self._say(f"resuming from {last}")
        if completed >= (trainer.max_epochs or 0):
            trainer.validate(model, datamodule=datamodule, ckpt_path=str(last), verbose=False)
        else:
            with warnings.catch_warnings():  # the folder holds the very checkpoint this fit resumes from
                warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(last))

    def baseline_model(self, lr: float | None = None, *, device: str | None = None) -> pl.LightningModule:
        """The configured LightningModule (with ``lr`` overriding its ``lr``), built on ``device`` if given.

        The checks before training build it on the ``"meta"`` device: its constructor runs, no memory is used.
        """
        spec = copy.deepcopy(self.config.baseline.model)
        if lr is not None:
            spec.init_args["lr"] = lr
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return spec.instantiate(pl.LightningModule, section="baseline.model")

    def expert_datamodule(
        self, spec: ExpertConfig, datamodule: pl.LightningDataModule | None = None
    ) -> pl.LightningDataModule:
        """The data the expert trains on: the configured datamodule (or ``datamodule``), with its ``emphasis``."""
        datamodule = self.datamodule if datamodule is None else datamodule
        if spec.emphasis is None:
            return datamodule
        return ClassEmphasis(datamodule, seed=spec.seed, **spec.emphasis)

    def pruning_callback(self, spec: ExpertConfig) -> StructuredPruning | None:
        """The expert's ``StructuredPruning`` (``None`` when its config prunes nothing)."""
        return StructuredPruning(**spec.pruning) if spec.pruning is not None else None

    def quantization_callback(self, spec: ExpertConfig) -> QuantizationAwareTraining | None:
        """The expert's ``QuantizationAwareTraining`` (``None`` when it stays fp32)."""
        return QuantizationAwareTraining(**spec.quantization) if spec.quantization is not None else None

    def distillation_callback(
        self, spec: ExpertConfig | MoEConfig, teacher: nn.Module | None = None
    ) -> KnowledgeDistillation | None:
        """An expert's or the MoE's ``KnowledgeDistillation`` from the baseline's artifact (``None`` without
        ``distillation``).

        ``teacher`` stands in for the baseline's artifact where it does not exist yet (the checks before
        training).
        """
        if spec.distillation is None:
            return None
        if "teacher" in spec.distillation:
            raise ValueError(
                "Expected no `teacher` in `distillation`: the pipeline distills from its baseline."
            )
        source = self.run_dir / "baseline" / "model.pt2" if teacher is None else teacher
        return KnowledgeDistillation(source, **spec.distillation)

    def moe_module(self, run: MoERun, experts: list[str] | None) -> pl.LightningModule:
        """The MoE phase's module (``experts=None`` builds it unbuilt: its arguments are checked alone)."""
        from lightning_hybridcomp.moe import MoELightningModule

        moe = self.config.moe
        # Options come last: a wrong `top_k` or `eval_top_k` there reaches the module, which refuses it.
        options = {"top_k": moe.training_top_k(run.k), "eval_top_k": moe.eval_top_k(run.k), **moe.options}
        if run.variant == "tuned":
            # Each expert's fp32 network learns, in fake-quant form, on the samples routed to it.
            options.update(quantize_experts=tuned_backend(self.config), freeze_experts=False)
        if options.get("assignment_target") == "classes" and "expert_classes" not in options:
            options["expert_classes"] = self._emphasized_classes()
        return MoELightningModule(experts=experts, **options)

    def _emphasized_classes(self) -> list[list[int]]:
        """Each expert's ``emphasis.classes``: what ``assignment_target: classes`` routes by by default."""
        missing = [i for i, e in enumerate(self.config.experts) if not (e.emphasis or {}).get("classes")]
        if missing:
            raise ValueError(
                "Expected `emphasis.classes` in every expert with `assignment_target` 'classes' (the gate learns"
                " to send each image to the expert of its class), or `moe.options.expert_classes`; experts"
                f" {missing} have none."
            )
        return [list(e.emphasis["classes"]) for e in self.config.experts if e.emphasis]

    # ------------------------------------------------------------------ phases

    def _run_baseline(self) -> dict[str, Any]:
        folder = self.run_dir / "baseline"
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.baseline
        pl.seed_everything(self.config.seed, workers=True)
        model = self.baseline_model()
        if cfg.checkpoint:
            self._load_starting_checkpoint(model, cfg.checkpoint)
        if cfg.max_epochs > 0:
            trainer = self.phase_trainer(folder, "baseline", cfg.max_epochs, [])
            self._fit(trainer, model, folder)
        weights = folder / "weights.pt"

        def write() -> dict[str, Any]:
            with atomic_path(weights) as tmp:
                torch.save(model.state_dict(), tmp)
            example = self._example_inputs(model)
            meta = save_artifact(model.cpu().eval(), folder / "model.pt2", example, steps=())
            return {"weights": str(weights), "artifact": str(folder / "model.pt2"), "macs": meta.macs}

        return on_rank_zero(write, what="writing the baseline's weights and artifact")

    def _load_starting_checkpoint(self, model: pl.LightningModule, path: str) -> None:
        checkpoint = read_checkpoint(path, what="`baseline.checkpoint`")
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"Expected `baseline.checkpoint` {path!r} to hold a state_dict.")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:800]
            raise ValueError(
                f"The starting checkpoint {path!r} does not match the configured model"
                f" {self.config.baseline.model.class_path}: {detail}"
            ) from err

    def _run_expert(self, spec: ExpertConfig) -> dict[str, Any]:
        folder = self.run_dir / "experts" / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        pl.seed_everything(spec.seed, workers=True)
        model = self.baseline_model(spec.lr)
        model.load_state_dict(
            read_checkpoint(self.run_dir / "baseline" / "weights.pt", what="the baseline weights")
        )
        pruning, quantization = self.pruning_callback(spec), self.quantization_callback(spec)
        distillation = self.distillation_callback(spec)
        callbacks: list[Callback] = [cb for cb in (pruning, quantization, distillation) if cb is not None]
        trainer = self.phase_trainer(folder, f"expert-{spec.name}", spec.max_epochs, callbacks)
        self._fit(trainer, model, folder, self.expert_datamodule(spec))
        artifact = folder / "expert.pt2"

        def write() -> dict[str, Any]:
            steps = [pruning.step_label] if pruning is not None else []
            if quantization is not None:
                meta = quantization.save_artifact(artifact)
                if quantization.float_network is not None and quantization.backend in PT2E_BACKENDS:
                    # The fp32 twin of the int8 expert (the weights QAT trained), for a "tuned" MoE.
                    network = quantization.float_network.cpu().eval()
                    save_artifact(network, folder / FLOAT_ARTIFACT, self._example_inputs(model), steps=steps)
            else:
                meta = save_artifact(model.cpu().eval(), artifact, self._example_inputs(model), steps=steps)
            return {"artifact": str(artifact), "macs": meta.macs, "steps": list(meta.steps)}

        return on_rank_zero(write, what=f"writing the artifact of expert {spec.name!r}")

    def _run_moe(self, run: MoERun) -> dict[str, Any]:
        folder = self.run_dir / run.key
        folder.mkdir(parents=True, exist_ok=True)
        source = self.config.moe.trained_by(run)
        if source != run:
            return self._reroute_moe(run, source)
        pl.seed_everything(self.config.seed, workers=True)
        file = FLOAT_ARTIFACT if run.variant == "tuned" else "expert.pt2"
        experts = [self.run_dir / "experts" / e.name / file for e in self.config.experts]
        missing = [str(path) for path in experts if not path.is_file()]
        if missing:
            raise PipelineError(
                f"The {run.name} MoE needs {missing[0]}, which the expert phase writes; this run directory was"
                " made by an older version: run again with `--force`."
            )
        moe = self.moe_module(run, [str(path) for path in experts])
        distillation = self.distillation_callback(self.config.moe)
        callbacks: list[Callback] = [distillation] if distillation is not None else []
        trainer = self.phase_trainer(folder, run.name, self.config.moe.max_epochs, callbacks)
        self._fit(trainer, moe, folder)
        target = folder / "moe.ckpt"
        # `save_checkpoint` is a collective that rank zero alone writes; the rename makes it appear whole.
        written = folder / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(str(written), weights_only=False)
        on_rank_zero(lambda: os.replace(written, target), what=f"writing {target}")
        return {"checkpoint": str(target)}

    def _reroute_moe(self, run: MoERun, source: MoERun) -> dict[str, Any]:
        """``run``'s MoE from ``source``'s phase, which trained the identical one: its checkpoint, routed at k.

        Only the ``eval_top_k`` hyper-parameter changes; the gate, the experts and the training state are
        ``source``'s, so ``load_moe`` and ``load_from_checkpoint`` rebuild a MoE that routes at ``run``'s k.
        """
        trained = self.run_dir / source.key / "moe.ckpt"
        target = self.run_dir / run.key / "moe.ckpt"

        def write() -> dict[str, Any]:
            checkpoint = read_checkpoint(trained, what=f"the {source.name} MoE checkpoint")
            checkpoint["hyper_parameters"]["eval_top_k"] = self.config.moe.eval_top_k(run.k)
            with atomic_path(target) as tmp:
                torch.save(checkpoint, tmp)
            return {"checkpoint": str(target), "trained_by": source.key}

        return on_rank_zero(write, what=f"writing {target}")

    def _run_evaluation(self) -> dict[str, Any]:
        return on_rank_zero(self._evaluate_and_report, what="measuring the models and writing the report")

    def _evaluate_and_report(self) -> dict[str, Any]:
        with warnings.catch_warnings(), _torch_threads(self._threads):
            # Inductor's int8 lowering repeats this warning for every compiled convolution.
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            rows = self.evaluate()
            edge_note = (
                self._edge_figures(rows)
                if self.config.evaluation.edge
                else "Edge figures not measured (`evaluation.edge: false`)."
            )
        machine = self._machine()
        eager = [
            r.name for r in rows if self.config.evaluation.compile and r.extra.get("runtime") != "inductor"
        ]
        if eager:
            # XNNPACK's int8 scheme (signed activations) has no inductor kernels; ExecuTorch is where it runs.
            edge_note += (
                f" The ms columns of {', '.join(eager)} are eager PyTorch: XNNPACK int8 programs do not compile"
                " with inductor (its x86 int8 kernels take uint8 activations); their deployed speed is the edge"
                " column."
            )
        header = (
            f"Measured on {machine['date']} on {machine['machine']} ({machine['threads']} torch threads);"
            f" configuration fingerprint `{self.config.fingerprint()}`, {len(self.config.experts)} experts,"
            f" MoE at k = {self.config.moe.top_k}, test split of {sum(len(y) for _, y in self._test_batches)} images."
            f" {edge_note}"
        )
        machine["edge"] = edge_note
        write_report(self.run_dir, rows, header=header, metadata=machine)
        return {"models": [r.name for r in rows]}

    # ------------------------------------------------------------------ evaluation

    @functools.cached_property
    def _test_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The test split's batches, read once and shared by every model's measurement."""
        dm = self.datamodule
        dm.setup("test")
        return [(inputs_from_batch(batch), labels_from_batch(batch)) for batch in dm.test_dataloader()]

    @functools.cached_property
    def _test_images(self) -> Tensor:
        """The test split's images in one tensor (routing statistics, latency batches)."""
        return torch.cat([x for x, _ in self._test_batches])

    @functools.cached_property
    def _test_labels(self) -> Tensor:
        """The test split's labels in one tensor, aligned with :attr:`_test_images`."""
        return torch.cat([y for _, y in self._test_batches])

    def _accuracy(self, forward: Callable[[Tensor], Tensor]) -> float:
        correct = total = 0
        with torch.no_grad():
            for x, y in self._test_batches:
                correct += int((forward(x).argmax(dim=-1) == y).sum())
                total += int(y.numel())
        return correct / max(total, 1)

    def _latency_batch(self, size: int) -> Tensor:
        """The first ``size`` test images (the split repeated if it is smaller).

        Distinct images, so that a MoE is timed on the routing real data gives: a batch of copies of one
        image would send every row to the same experts, none of them padded.
        """
        images = self._test_images
        repeats = -(-size // images.shape[0])
        return images.repeat(repeats, *[1] * (images.dim() - 1))[:size].contiguous()

    def _add_latencies(self, rows: list[ResultRow], forwards: list[Callable[[Tensor], Tensor]]) -> None:
        """Every row's median latency at each batch size, all models timed side by side in rounds."""
        ev = self.config.evaluation
        for size in ev.latency_batch_sizes:
            batch = self._latency_batch(size)
            timings = interleaved_latencies(
                {row.name: (forward, batch) for row, forward in zip(rows, forwards)},
                rounds=ev.repeats,
                warmup=ev.warmup,
            )
            if size not in (1, 64):
                continue  # timed as configured; the rows record batch 1 and 64 only
            for row in rows:
                setattr(row, f"latency_b{size}_ms", statistics.median(timings[row.name]))

    def _program_row(self, name: str, kind: str, path: Path) -> tuple[ResultRow, Callable[[Tensor], Tensor]]:
        loaded = load_artifact(path)
        forward: Callable[[Tensor], Tensor] = loaded.module
        runtime = "eager"
        if self.config.evaluation.compile and not signed_int8_activations(loaded.module):
            forward, runtime = compile_artifact(loaded.module), "inductor"
        row = ResultRow(
            name=name,
            kind=kind,
            accuracy=self._accuracy(forward),
            params=loaded.metadata.params,
            macs=float(loaded.metadata.macs),
            bytes=path.stat().st_size,
            extra={"steps": list(loaded.metadata.steps), "dtype": loaded.metadata.dtype, "runtime": runtime},
        )
        return row, forward

    def evaluate(self) -> list[ResultRow]:
        """Measure the baseline, every expert and the MoE at each ``top_k`` on the test split.

        Latency is measured last, every model in every round (interleaved), so that a shared machine's load
        swings fall on all of them alike.
        """
        from lightning_hybridcomp.moe import load_moe

        measured = [self._program_row("baseline", "baseline", self.run_dir / "baseline" / "model.pt2")]
        for expert in self.config.experts:
            measured.append(
                self._program_row(
                    expert.name, "expert", self.run_dir / "experts" / expert.name / "expert.pt2"
                )
            )
        rows = [row for row, _ in measured]
        forwards = [forward for _, forward in measured]
        for run in self.config.moe.runs():
            moe = load_moe(self.run_dir / run.key / "moe.ckpt").eval()
            if self.config.evaluation.compile:
                moe.compile_experts_()
            compiled = [r.compiled is not None for r in moe.expert_records]
            runtime = "inductor" if all(compiled) else "eager" if not any(compiled) else "inductor and eager"
            accuracy = self._accuracy(moe)
            stats = moe.routing_statistics(self._test_images)
            headroom = moe.routing_headroom(self._test_images, self._test_labels)
            forwards.append(moe)
            rows.append(
                ResultRow(
                    name=run.name,
                    kind="moe",
                    accuracy=accuracy,
                    params=moe.total_params(),
                    macs=float(stats["expected_macs"]),
                    bytes=moe.total_bytes(),
                    extra={
                        "expert_load": stats["expert_load"],
                        "top_k": run.k,
                        "variant": run.variant,
                        "runtime": runtime,
                        **{k: headroom[k] for k in HEADROOM_KEYS if k in headroom},
                    },
                )
            )
        self._add_latencies(rows, forwards)
        return rows

    def _edge_figures(self, rows: list[ResultRow]) -> str:
        """ExecuTorch ``.pte`` latency and bytes for every row (:mod:`~lightning_hybridcomp.pipeline_edge`)."""
        from lightning_hybridcomp.pipeline_edge import add_edge_figures

        sources = {"baseline": self.run_dir / "baseline" / "model.pt2"}
        sources.update(
            {e.name: self.run_dir / "experts" / e.name / "expert.pt2" for e in self.config.experts}
        )
        sources.update({run.name: self.run_dir / run.key / "moe.ckpt" for run in self.config.moe.runs()})
        ev = self.config.evaluation
        return add_edge_figures(
            rows,
            sources,
            self.run_dir / "evaluation" / "edge",
            test_batches=self._test_batches,
            threads=torch.get_num_threads(),
            rounds=ev.repeats,
            warmup=ev.warmup,
            say=self._say,
        )

    @staticmethod
    def _machine() -> dict[str, Any]:
        import platform

        cpu = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            names = [
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if "model name" in line
            ]
            cpu = names[0] if names else cpu
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------------ driver

    def phases(self) -> list[_Phase]:
        experts = {f"experts/{e.name}": e for e in self.config.experts}
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "baseline": self._run_baseline,
            "evaluation": self._run_evaluation,
            **{key: functools.partial(self._run_expert, e) for key, e in experts.items()},
            **{run.key: functools.partial(self._run_moe, run) for run in self.config.moe.runs()},
        }
        return [_Phase(spec, runs[spec.key]) for spec in self.specs]

    def _begin(self, planned: PlannedPhase, ran: set[str], held: contextlib.ExitStack) -> str:
        """Take the phase's lock and make its folder ready (rank zero); the action it then takes.

        Another process may have finished the phase while this one waited for its lock: then it is skipped.
        A phase redone starts from an empty folder, so no file of another configuration is ever mixed in.
        """
        spec = planned.spec
        folder = self.run_dir / spec.key
        held.enter_context(phase_lock(self.run_dir, spec.key))
        done = read_json(folder / DONE_FILE)
        if (
            done is not None
            and done != planned.seen_done
            and done.get("fingerprint") == spec.fingerprint
            and not ran.intersection(spec.upstream)
        ):
            return "skip"
        if planned.action == "redo" and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / PHASE_FILE, {"fingerprint": spec.fingerprint, "inputs": spec.inputs})
        return planned.action

    def run(self) -> list[dict[str, Any]]:
        """Print the plan, then run every phase it does not skip, then print the report table.

        Under DDP every rank calls this; rank zero prepares the run directory, plans, takes the phase locks
        and decides (Lightning's launcher starts the other ranks inside the first phase's ``fit``).

        Returns:
            The ``results.json`` model entries (``[]`` for an ``only`` run without the evaluation).
        """
        on_rank_zero(self._prepare_run_dir, what="preparing the run directory")
        # Lightning's launcher starts the other ranks inside the first phase's fit: until then each reads the
        # run directory rank zero prepared; once their process group is up, rank zero's plan holds for all.
        plan = broadcast_from_rank_zero(self.plan())
        self._say(f"Plan for {self.run_dir}:\n{format_plan(plan)}")
        phases = {phase.spec.key: phase for phase in self.phases()}
        ran: set[str] = set()
        seconds = epochs = 0.0
        for number, planned in enumerate(plan, start=1):
            phase = phases[planned.spec.key]
            title = f"=== Phase {number}/{len(plan)}: {phase.name}"
            if planned.action == "skip":
                self._say(f"{title} — finished earlier, skipped ===")
                continue
            with contextlib.ExitStack() as held:
                action = on_rank_zero(
                    functools.partial(self._begin, planned, ran, held), what=f"starting {phase.name}"
                )
                if action == "skip":
                    self._say(f"{title} — finished by another process meanwhile, skipped ===")
                    continue
                eta = ""
                if epochs:
                    # Seconds per training epoch so far, times the training epochs still ahead.
                    left = sum(p.spec.epochs for p in plan[number - 1 :] if p.action != "skip")
                    eta = f", about {seconds / epochs * left:.0f}s of training left"
                self._say(f"{title} ({action}: {planned.reason}){eta} ===")
                start = time.monotonic()
                result = phase.run()
                elapsed = time.monotonic() - start
                if phase.spec.epochs:
                    seconds, epochs = seconds + elapsed, epochs + phase.spec.epochs
                done = {
                    "phase": phase.name,
                    "seconds": round(elapsed, 1),
                    **result,
                    "fingerprint": phase.spec.fingerprint,
                    "inputs": phase.spec.inputs,
                }
                on_rank_zero(
                    functools.partial(write_json, self.run_dir / phase.spec.key / DONE_FILE, done),
                    what=f"finishing {phase.name}",
                )
            ran.add(planned.spec.key)
        if "evaluation" not in {p.spec.key for p in plan}:
            self._say(
                f"\nFinished {', '.join(p.spec.key for p in plan)}; the report comes from a run without --only."
            )
            return []
        results = json.loads((self.run_dir / "results.json").read_text())
        rows = [ResultRow(**{k: v for k, v in m.items() if k != "ratios"}) for m in results["models"]]
        self._say("\n" + report_table(rows))
        self._say(f"\nReport: {self.run_dir / 'report.md'}")
        return list(results["models"])


def run_pipeline(
    config: str | os.PathLike[str] | PipelineConfig | None = None,
    *,
    run_dir: str | None = None,
    force: bool = False,
    only: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run the pipeline from a YAML path, a :class:`PipelineConfig`, or the embedded default (``None``).

    Example::

        >>> run_pipeline(None, run_dir="runs/pipeline")  # doctest: +SKIP
    """
    if isinstance(config, PipelineConfig):
        if run_dir is not None:
            config = copy.deepcopy(config)
            config.run_dir = run_dir
        resolved = config
    else:
        resolved = load_pipeline_config(Path(config) if config is not None else None, {"run_dir": run_dir})
    return Pipeline(resolved, force=force, only=only).run()
