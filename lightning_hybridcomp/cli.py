"""The ``hybridcomp`` command: a LightningCLI over any LightningModule and datamodule, the pipeline, the export.

``hybridcomp fit|validate|test|predict`` take ``--model``/``--data`` class paths (the package's
``ImageClassifier`` on the embedded digits by default) and callbacks under ``trainer.callbacks``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_hybridcomp._executorch import ExecuTorchMissingError
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._lightning import close_process_group, declared_example_input, inputs_from_batch
from lightning_hybridcomp.callbacks.pruned_checkpoints import find_pruning_state
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.pipeline_config import PipelineError
from lightning_hybridcomp.profiling import count_params, format_table, profile_model

__all__ = [
    "HybridCompCLI",
    "check_callbacks_for_checkpoint",
    "checkpoint_callbacks",
    "error_message",
    "main",
    "print_summary",
]

_DEFAULT_MODEL = "lightning_hybridcomp.models.ImageClassifier"
_DEFAULT_DATA = "lightning_hybridcomp.data.DigitsDataModule"


#: What ``hybridcomp --help`` says the tool is.
DESCRIPTION = (
    "Hybrid compression of Lightning models: LightningCLI's subcommands with the package's callbacks, the"
    " resumable compression pipeline, and ExecuTorch export."
)

#: The subcommands of ``hybridcomp`` besides LightningCLI's, with their one-line descriptions.
OWN_SUBCOMMANDS = {
    "pipeline": "Baseline -> compressed experts -> Mixture of Experts -> report, resumable from disk.",
    "export": "Lower a compressed model to an ExecuTorch .pte program on XNNPACK (needs the edge extra).",
}


class HybridCompCLI(LightningCLI):
    """LightningCLI with the package's defaults and a compression summary after ``fit``.

    After ``fit`` (and unless ``--summary false``), the fitted model is tested when it has a
    ``test_step`` and one table is printed: test accuracy, parameters, MACs per sample and saved bytes.
    """

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `main` runs `pipeline` and `export` before LightningCLI parses anything; listed here, they appear in
        # `hybridcomp --help` and in the choices of a mistyped subcommand.
        subcommands = parser._subcommands_action
        if subcommands is not None:
            for name, description in OWN_SUBCOMMANDS.items():
                subcommands.add_subcommand(
                    name, LightningArgumentParser(description=description), help=description
                )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--summary", type=bool, default=True, help="Test and print a summary after fit.")
        parser.set_defaults({"model": {"class_path": _DEFAULT_MODEL}, "data": {"class_path": _DEFAULT_DATA}})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads ``--ckpt_path`` for its hyper-parameters right after parsing, and the Trainer
        # again deep inside the run: check the file first, where the error can name it.
        subcommand = self.config.get("subcommand")
        options = (self.config.get(subcommand) or {}) if subcommand else {}
        self._ckpt_path = options.get("ckpt_path")
        self._ckpt_callbacks = checkpoint_callbacks(self._ckpt_path)

    def before_fit(self) -> None:
        self._check_ckpt_callbacks("fit")

    def before_validate(self) -> None:
        self._check_ckpt_callbacks("validate")

    def before_test(self) -> None:
        self._check_ckpt_callbacks("test")

    def before_predict(self) -> None:
        self._check_ckpt_callbacks("predict")

    def _check_ckpt_callbacks(self, subcommand: str) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        check_callbacks_for_checkpoint(
            self._ckpt_callbacks, callbacks, str(self._ckpt_path), subcommand=subcommand
        )

    def after_fit(self) -> None:
        if not self.config.get(self.subcommand or "fit", {}).get("summary", True):
            return
        if self.trainer.interrupted:
            return
        print_summary(self.trainer, self.model, self.datamodule)


def _test_accuracy(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> float | None:
    if not pl.utilities.model_helpers.is_overridden("test_step", model):
        return None
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = results[0] if results else {}
    for key in ("test/acc", "test_acc", "test/accuracy", "acc"):
        if key in metrics:
            return float(metrics[key])
    return None


def print_summary(trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any) -> None:
    """Test ``model`` (when it can be tested) and print accuracy, params, MACs and bytes on rank zero.

    MACs are :func:`~lightning_hybridcomp.profiling.count_macs` per sample, of whatever the model now runs
    (pruned, fake-quant or int8). Params are the stored weight elements: the parameters, except that a
    network :class:`QuantizationAwareTraining` converted to int8 counts as its program's weights (its
    ``summary.params``; an int8 weight is a buffer, not a parameter). Bytes are those of the model's
    ``state_dict`` as ``torch.save`` writes it.
    """
    accuracy = _test_accuracy(trainer, model, datamodule)
    example: Tensor | None
    try:
        example = declared_example_input(model)
        if example is None:
            example = inputs_from_batch(next(iter(datamodule.test_dataloader())))
    except (TypeError, RuntimeError):
        example = (
            None  # a forward of several inputs, or a batch layout the summary cannot read: accuracy alone
        )
    row: dict[str, Any] = {"model": type(model).__name__, "test accuracy": accuracy}
    if example is not None:
        profile = profile_model(model, example.to(model.device))
        row.update(params=_stored_params(trainer, model), MACs=profile.macs, bytes=profile.size_bytes)
    rank_zero_info("\n" + format_table([row], title="hybridcomp summary"))


def _stored_params(trainer: pl.Trainer, model: pl.LightningModule) -> int | None:
    """Parameters of ``model``, with each converted int8 network counted by its program's weights."""
    params = count_params(model)
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(callback, QuantizationAwareTraining) or callback.stage != "converted":
            continue
        network, summary = callback.quantized_network, callback.summary
        if network is None or summary is None:
            return None  # the callback could not measure its program (it warned): a missing figure beats a wrong one
        params += summary.params - count_params(network)
    return params


# --- checkpoints ---------------------------------------------------------------------------------------

_LIGHTNING_CKPT_NAMES = ("best", "last", "hpc")
#: The callbacks that change a network's structure, so that a checkpoint's weights load only into a model
#: they rebuilt; the key is the name Lightning stores their state under.
_RESTRUCTURING_CALLBACKS: dict[str, type[Callback]] = {
    "StructuredPruning": StructuredPruning,
    "QuantizationAwareTraining": QuantizationAwareTraining,
}


def checkpoint_callbacks(ckpt_path: Any) -> dict[str, str]:
    """Read ``--ckpt_path`` as the Trainer will, refusing an unreadable file; what it needs attached.

    Returns the callbacks that restructured the checkpoint's network, by name, each with why: a
    :class:`StructuredPruning` that removed channels, a :class:`QuantizationAwareTraining` past its float
    stage. The file is read with ``torch.load(weights_only=True)``, as LightningCLI reads it for its
    hyper-parameters whatever ``--weights_only`` says. Lightning's own names (``"best"``, ``"last"``,
    ``"hpc"``, ``"registry..."``) and URLs are left to Lightning (``{}``).

    Raises:
        ValueError: if the file does not exist.
        UnreadableCheckpointError: if it is truncated, corrupt or not a checkpoint.
    """
    if ckpt_path is None or not isinstance(ckpt_path, (str, os.PathLike)):
        return {}
    text = str(ckpt_path)
    lightnings = text in _LIGHTNING_CKPT_NAMES or text.startswith("registry") or "://" in text
    if lightnings and not Path(text).is_file():
        return {}
    checkpoint = read_checkpoint(ckpt_path, what="`--ckpt_path`")
    needed: dict[str, str] = {}
    pruning = find_pruning_state(checkpoint)
    if isinstance(pruning, Mapping) and pruning.get("history"):
        needed["StructuredPruning"] = f"{len(pruning['history'])} pruning records: channels were removed"
    states = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    for key, state in (states or {}).items():
        if str(key).split("{", 1)[0] == "QuantizationAwareTraining" and isinstance(state, Mapping):
            stage = state.get("stage", "float")
            if stage != "float":
                needed["QuantizationAwareTraining"] = f"stage {stage!r}: the network was traced and quantized"
    return needed


def check_callbacks_for_checkpoint(
    needed: Mapping[str, str], callbacks: Sequence[Callback], ckpt_path: str, *, subcommand: str
) -> None:
    """Refuse to run when a callback :func:`checkpoint_callbacks` found necessary is not attached.

    Without it Lightning fails with a wall of ``state_dict`` size mismatches.

    Raises:
        ValueError: naming the checkpoint, the callbacks it needs and how to attach them.
    """
    missing = {
        name: why
        for name, why in needed.items()
        if not any(isinstance(cb, _RESTRUCTURING_CALLBACKS[name]) for cb in callbacks)
    }
    if not missing:
        return
    written_with = " and ".join(f"`{name}` ({why})" for name, why in missing.items())
    flags = " ".join(f"--trainer.callbacks+=lightning_hybridcomp.{name}" for name in missing)
    fix = (
        f"Run `hybridcomp {subcommand}` with the same callbacks as the run that wrote it: the `config.yaml` that"
        f" run saved in its log folder has them (`--config <that config.yaml>`), or add them with `{flags}` and"
        " their arguments"
    )
    if list(missing) == ["StructuredPruning"]:
        fix += (
            "; or rebuild the pruned model in Python with `lightning_hybridcomp.load_pruned_model(path, cls)`"
        )
    raise ValueError(
        f"The checkpoint {ckpt_path!r} was written with {written_with}, so its weights fit only a model those"
        f" callbacks rebuild, and this run does not attach them. {fix}."
    )


# --- errors --------------------------------------------------------------------------------------------

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Libraries the CLI drives: an error raised among their frames and the package's alone is not a bug in
#: the user's code. With the standard library (``sys.stdlib_module_names``) this is the rule docs/cli.md states.
_LIBRARIES = frozenset(
    {
        "executorch",
        "jsonargparse",
        "lightning",
        "lightning_fabric",
        "lightning_utilities",
        "numpy",
        "pytorch_lightning",
        "torch",
        "torch_pruning",
        "torchao",
        "torchmetrics",
        "torchvision",
        "typing_extensions",
        "yaml",
    }
)


def _frame_origin(frame: FrameType) -> str:
    """``"package"``, ``"library"`` or ``"user"``: who owns the code a traceback frame runs."""
    filename = frame.f_code.co_filename
    if not filename.startswith("<"):
        try:
            if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
                return "package"
        except OSError:
            pass
    top = str(frame.f_globals.get("__name__", "")).split(".", 1)[0]
    if top == "lightning_hybridcomp":
        return "package"
    if top in _LIBRARIES or top in sys.stdlib_module_names:
        return "library"
    return "user"


def _exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from or while handling (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _frames(err: BaseException) -> list[FrameType]:
    return [frame for frame, _ in traceback.walk_tb(err.__traceback__)]


def error_message(err: BaseException) -> str | None:
    """What ``hybridcomp`` prints for ``err`` instead of a traceback, or ``None`` to show the traceback.

    ``None`` when user code took part: a frame, in the traceback of ``err`` or of any exception in its
    chain, of code outside this package, the libraries it drives and the standard library (the frame that
    caught each exception does not count); an error that collects others in its ``errors`` (a
    :class:`~lightning_hybridcomp.pipeline_config.PipelineConfigError`) counts theirs too. Otherwise the message of the outermost exception of the chain
    raised in this package (the caught one if none was), followed by ``caused by <Type>: <message>`` of the
    innermost exception when that adds something.
    """
    chain = _exception_chain(err)
    # An error that collects others (every problem of a pipeline config) involves their code too.
    involved = chain + [e for collected in getattr(err, "errors", ()) for e in _exception_chain(collected)]
    if any(_frame_origin(frame) == "user" for e in involved for frame in _frames(e)[1:]):
        return None
    chosen = next((e for e in chain if _frames(e) and _frame_origin(_frames(e)[-1]) == "package"), err)
    message = str(chosen)
    innermost = chain[-1]
    cause = " ".join(str(innermost).split())
    if innermost is not chosen and cause and cause[:60] not in " ".join(message.split()):
        message += f"\n  caused by {type(innermost).__name__}: {cause[:300]}"
    return message


def _pipeline_main(args: list[str]) -> None:
    import argparse

    import yaml

    parser = argparse.ArgumentParser(
        prog="hybridcomp pipeline",
        description=OWN_SUBCOMMANDS["pipeline"],
    )
    parser.add_argument("--config", help="pipeline YAML; without it the embedded default runs")
    parser.add_argument("--run_dir", help="where everything is written (overrides the config's run_dir)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo every phase (with --only: just those), deleting their results",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PHASE",
        help="run just this phase, e.g. experts/<name> (repeatable); the phases it reads must be finished."
        " Separate processes may run different phases of one run directory at the same time",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what a run would do with each phase, and why, then exit"
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    options = parser.parse_args(args)
    from lightning_hybridcomp.pipeline import Pipeline
    from lightning_hybridcomp.pipeline_config import load_pipeline_config
    from lightning_hybridcomp.pipeline_plan import format_plan

    config = load_pipeline_config(options.config, {"run_dir": options.run_dir})
    if options.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return
    # Building the pipeline checks every phase's components: a bad value fails here, before anything trains.
    pipeline = Pipeline(config, force=options.force, only=options.only)
    if options.dry_run:
        print(f"Plan for {config.run_dir} (dry run, nothing was changed):\n{format_plan(pipeline.plan())}")
        return
    pipeline.run()


def _export_main(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="hybridcomp export",
        description=OWN_SUBCOMMANDS["export"],
    )
    parser.add_argument("source", help="a '.pt2' artifact, an ImageClassifier checkpoint or a MoE checkpoint")
    parser.add_argument("path", help="the '.pte' to write; its side-car goes to '<path>.json'")
    parser.add_argument("--max_batch", type=int, default=32, help="largest batch the program runs")
    parser.add_argument(
        "--allow_undelegated",
        action="store_true",
        help="write the program even if some operators stay outside the XNNPACK delegate",
    )
    options = parser.parse_args(args)
    from lightning_hybridcomp.edge import export_executorch

    meta = export_executorch(
        options.source, options.path, max_batch=options.max_batch, allow_undelegated=options.allow_undelegated
    )
    row = {
        "program": options.path,
        "kind": meta.kind,
        "dtype": meta.dtype,
        "input": f"(batch<={meta.max_batch}, {', '.join(map(str, meta.input_shape))})",
        "classes": meta.num_classes,
        "MACs": meta.macs,
        "params": meta.params,
        "bytes": meta.size_bytes,
        "methods": ", ".join(meta.methods),
    }
    print(format_table([row], title="hybridcomp export"))


def _refuse_options_before_own_subcommand(argv: list[str]) -> None:
    """Refuse ``hybridcomp -c FILE pipeline ...``: options before ``pipeline``/``export`` are LightningCLI's.

    The subcommand is the first argument after LightningCLI's own top-level options (``-c``/``--config``
    with its value, ``--print_config[=flags]``, ``-h``).
    """
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("-c", "--config") else 1
    if 0 < i < len(argv) and argv[i] in OWN_SUBCOMMANDS:
        raise ValueError(
            f"Expected `{argv[i]}` first, got {argv[:i]} before it: those options are LightningCLI's, for"
            f" fit/validate/test/predict. Put `{argv[i]}`'s options after it, e.g."
            f" `hybridcomp {argv[i]} --help`."
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hybridcomp`` console script.

    ``hybridcomp pipeline`` runs the main job, ``hybridcomp export SOURCE PATH`` writes an ExecuTorch
    program (:func:`~lightning_hybridcomp.edge.export_executorch`); every other subcommand is LightningCLI's.
    A ``ValueError``/``TypeError``/``PipelineError`` (or a missing ExecuTorch install) in which no user code took part (an argument, config,
    checkpoint or run-directory error) is printed as the package's one-line message (see
    :func:`error_message`) and exits with status 2; any other error, including one raised in or through
    the user's own modules, propagates with its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        _refuse_options_before_own_subcommand(argv)
        if argv[:1] == ["pipeline"]:
            _pipeline_main(argv[1:])
        elif argv[:1] == ["export"]:
            _export_main(argv[1:])
        else:
            HybridCompCLI(
                model_class=None,
                datamodule_class=None,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                trainer_defaults={"default_root_dir": "runs"},
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"description": DESCRIPTION},
            )
    except (ValueError, TypeError, PipelineError, ExecuTorchMissingError) as err:
        message = error_message(err)
        if message is None:
            raise
        print(f"hybridcomp: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
    close_process_group()  # a DDP run (strategy=ddp) ends cleanly instead of aborting in gloo's threads


if __name__ == "__main__":
    main()
