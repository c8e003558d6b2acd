"""The ``hybridcomp`` command: a LightningCLI over any LightningModule and datamodule.

``hybridcomp fit|validate|test|predict`` take ``--model``/``--data`` class paths (the package's
``ImageClassifier`` on the embedded digits by default) and callbacks under ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_hybridcomp._lightning import close_process_group, inputs_from_batch
from lightning_hybridcomp.pipeline_config import PipelineError
from lightning_hybridcomp.profiling import format_table, profile_model

_DEFAULT_MODEL = "lightning_hybridcomp.models.ImageClassifier"
_DEFAULT_DATA = "lightning_hybridcomp.data.DigitsDataModule"


class HybridCompCLI(LightningCLI):
    """LightningCLI with the package's defaults and a compression summary after ``fit``.

    After ``fit`` (and unless ``--summary false``), the fitted model is tested when it has a
    ``test_step`` and one table is printed: test accuracy, parameters, MACs per sample and saved bytes.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--summary", type=bool, default=True, help="Test and print a summary after fit.")
        parser.set_defaults({"model": {"class_path": _DEFAULT_MODEL}, "data": {"class_path": _DEFAULT_DATA}})

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
    """Test ``model`` (when it can be tested) and print accuracy, params, MACs and bytes on rank zero."""
    accuracy = _test_accuracy(trainer, model, datamodule)
    example: Any = model.example_input_array
    if not isinstance(example, Tensor):
        try:
            example = inputs_from_batch(next(iter(datamodule.test_dataloader())))
        except RuntimeError:
            example = None  # a batch layout the summary cannot read: report accuracy alone
    row: dict[str, Any] = {"model": type(model).__name__, "test accuracy": accuracy}
    if example is not None:
        profile = profile_model(model, example.to(model.device))
        row.update(params=profile.params, MACs=profile.macs, bytes=profile.size_bytes)
    rank_zero_info("\n" + format_table([row], title="hybridcomp summary"))


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _pipeline_main(args: list[str]) -> None:
    import argparse

    import yaml

    parser = argparse.ArgumentParser(
        prog="hybridcomp pipeline",
        description="Baseline -> compressed experts -> Mixture of Experts -> report, resumable from disk.",
    )
    parser.add_argument("--config", help="pipeline YAML; without it the embedded default runs")
    parser.add_argument("--run_dir", help="where everything is written (overrides the config's run_dir)")
    parser.add_argument("--force", action="store_true", help="delete an earlier run's results and redo all")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    options = parser.parse_args(args)
    from lightning_hybridcomp.pipeline import Pipeline
    from lightning_hybridcomp.pipeline_config import load_pipeline_config

    config = load_pipeline_config(options.config, {"run_dir": options.run_dir})
    pipeline = Pipeline(config, force=options.force)  # checks the callbacks' arguments too
    if options.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return
    pipeline.run()


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hybridcomp`` console script.

    ``hybridcomp pipeline`` runs the main job; every other subcommand is LightningCLI's. Argument errors
    raised by the package (``ValueError``/``TypeError`` naming the offending argument) and a refused run
    directory are printed as one line and exit with status 2 instead of a traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["pipeline"]:
            _pipeline_main(argv[1:])
        else:
            HybridCompCLI(
                model_class=None,
                datamodule_class=None,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=args,
                trainer_defaults={"default_root_dir": "runs"},
                save_config_kwargs={"overwrite": True},
            )
    except (ValueError, TypeError, PipelineError) as err:
        cause = _root_cause(err)
        print(f"hybridcomp: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from err
    close_process_group()  # a DDP run (strategy=ddp) ends cleanly instead of aborting in gloo's threads


if __name__ == "__main__":
    main()
