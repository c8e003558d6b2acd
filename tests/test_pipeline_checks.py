"""Every problem of a pipeline configuration is found before the first epoch, each with its YAML path."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import yaml

from lightning_hybridcomp.cli import main
from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import PipelineConfigError, parse_pipeline_config
from tests._helpers import MINI_PIPELINE


def _raw(run_dir: Path) -> dict[str, Any]:
    raw = copy.deepcopy(MINI_PIPELINE)
    raw["run_dir"] = str(run_dir)
    return raw


def _refusals(raw: dict[str, Any]) -> dict[str, str]:
    """What the checks before training refuse in ``raw``, by YAML path (a refusal is expected)."""
    with pytest.raises(PipelineConfigError) as found:
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    return dict(found.value.problems)


def _cli(raw: dict[str, Any], tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--config", str(config), *extra])
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_error_in_the_last_expert_fails_before_any_training(tmp_path, capsys) -> None:
    raw = _raw(tmp_path / "run")
    raw["experts"][-1]["pruning"] = {"importance": "taylor", "start_epoch": 0, "iterative_steps": 1}
    code, err = _cli(raw, tmp_path, capsys)
    assert code == 2
    assert err.startswith("hybridcomp: error: experts[1].pruning.start_epoch: Expected `start_epoch` >= 1")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # no run directory, so no checkpoint of any phase
    assert not list(tmp_path.rglob("*.ckpt"))


def test_every_problem_is_reported_together(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    raw["data"]["init_args"]["batch_size"] = 0
    raw["experts"][0]["pruning"]["iterative_steps"] = 5  # ends after max_epochs = 2
    raw["experts"][0]["quantization"]["start_epoch"] = 3
    raw["experts"][1]["pruning"]["ignored_layers"] = ["net.no_such_layer"]
    raw["experts"][1]["lr"] = -1.0
    raw["moe"]["options"] = {"gate": "expert:4", "balance_coefficient": -1}
    with pytest.raises(PipelineConfigError) as found:
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    paths = [path for path, _ in found.value.problems]
    assert paths == [
        "data.init_args.batch_size",
        "experts[0].max_epochs",
        "experts[0].quantization.start_epoch",
        "experts[1].lr",
        "experts[1].pruning.ignored_layers",
        "moe.options.balance_coefficient",
        "moe.options.gate",
    ]
    assert str(found.value).startswith(f"{len(paths)} problems in the pipeline configuration")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("distillation", "match"),
    [
        ({"alpha": 2}, r"^{at}\.distillation\.alpha: Expected `alpha` to be a float in \(0, 1\]"),
        ({"temprature": 2.0}, r"^{at}\.distillation: .*temprature.*temperature"),
        (
            {"teacher": "other.pt2"},
            r"^{at}\.distillation\S*: Expected no `teacher`.*distills from its baseline",
        ),
        (0.5, r"^{at}\.distillation: Expected `distillation` to be a mapping of arguments, got 0\.5"),
    ],
    ids=["alpha", "typo", "teacher", "not-a-mapping"],
)
@pytest.mark.parametrize("section", ["expert", "moe"])
def test_distillation_arguments_are_checked_before_training(tmp_path, section, distillation, match) -> None:
    raw = _raw(tmp_path / "run")
    (raw["experts"][1] if section == "expert" else raw["moe"])["distillation"] = distillation
    at = r"experts\[1\]" if section == "expert" else "moe"
    with pytest.raises(ValueError, match=match.replace("{at}", at)):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_layer_names_are_checked_against_the_model(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    raw["experts"][1]["pruning"]["ignored_layers"] = ["net.no_such_layer"]
    with pytest.raises(PipelineConfigError, match=r"^experts\[1\]\.pruning\.ignored_layers: .*no_such_layer"):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"experts": [MINI_PIPELINE["experts"][0]]}, r"^experts: Expected at least two experts, got 1"),
        (
            {"moe": {"options": {"eval_top_k": 3}}},
            r"^moe\.options\.eval_top_k: .*at most the number of experts",
        ),
        (
            {"trainer": {"max_epoch": 3}},
            r"^trainer: Unknown key\(s\) \['max_epoch'\] in `trainer`\. Valid keys: \['accelerator', .*'max_steps'",
        ),
        (
            {"moe": {"options": {"balance_coeficient": 0.1}}},
            r"^moe\.options: Unknown key\(s\) \['balance_coeficient'\] .* Valid keys: .*'balance_coefficient'",
        ),
    ],
    ids=["one-expert", "eval-top-k", "trainer-typo", "moe-option-typo"],
)
def test_moe_and_trainer_arguments_are_checked_without_experts(tmp_path, change, match) -> None:
    raw = {**_raw(tmp_path / "run"), **change}
    with pytest.raises(ValueError, match=match):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"assignment_target": "classes"},
            r"^moe\.options\.assignment_target: Expected `emphasis.classes` in every expert.*experts \[1\]",
        ),
        (
            {"assignment_target": "classes", "expert_classes": [[0, 1]]},
            r"^moe\.options\.expert_classes: Expected `expert_classes` to hold one list per expert \(2\), got 1",
        ),
        (
            {"expert_classes": [[0], [1]]},
            r"^moe\.options\.expert_classes: Expected `expert_classes` only with assignment_target='classes'",
        ),
    ],
    ids=["no-emphasis", "count", "without-target"],
)
def test_class_routing_is_checked_before_training(tmp_path, options, match) -> None:
    raw = _raw(tmp_path / "run")
    raw["experts"][0]["emphasis"] = {"classes": [0, 1, 2]}
    raw["moe"]["options"] = options
    with pytest.raises(PipelineConfigError, match=match):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_class_routing_defaults_to_the_experts_emphasis(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    raw["experts"][0]["emphasis"] = {"classes": [0, 1, 2]}
    raw["experts"][1]["emphasis"] = {"classes": [3, 4], "weight": 2.0}
    raw["moe"]["options"] = {"assignment_target": "classes"}
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    for run in pipeline.config.moe.runs():
        assert pipeline.moe_module(run, None).hparams["expert_classes"] == [[0, 1, 2], [3, 4]]
    raw["moe"]["options"]["expert_classes"] = [[5], [6]]  # given: used as it is
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert pipeline.moe_module(pipeline.config.moe.runs()[0], None).hparams["expert_classes"] == [[5], [6]]


def test_only_names_a_phase_of_the_configuration(tmp_path) -> None:
    config = parse_pipeline_config(_raw(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"got \['experts/nope'\]. Phases: \['baseline', 'experts/half'"):
        Pipeline(config, only=["experts/nope"], say=lambda _: None)


def test_run_dir_under_a_file_is_one_clear_line(tmp_path, capsys) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    code, err = _cli(_raw(tmp_path / "a_file" / "run"), tmp_path, capsys)
    assert code == 2
    assert err.startswith("hybridcomp: error: The run directory ") and "a file, not a folder" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_one_clear_line(tmp_path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(_raw(locked / "run"), tmp_path, capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "is not writable" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_run_dir_that_cannot_be_created_is_one_clear_line(tmp_path, capsys) -> None:
    """A folder the system refuses to create (here inside /proc, whatever the user) gives one clear line."""
    code, err = _cli(_raw(Path("/proc/hybridcomp-no-such-process/run")), tmp_path, capsys)
    assert code == 2
    assert err.startswith(
        "hybridcomp: error: The run directory '/proc/hybridcomp-no-such-process/run' cannot"
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


class RefusingDataModule(pl.LightningDataModule):
    """A user's datamodule whose constructor refuses its argument."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")


def test_a_refusal_raised_in_user_code_keeps_its_traceback(tmp_path, capsys) -> None:
    raw = _raw(tmp_path / "run")
    raw["data"] = {"class_path": f"{__name__}.RefusingDataModule", "init_args": {"size": 0}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineConfigError, match=r"^data: size must be positive, got 0$") as found:
        main(["pipeline", "--config", str(config)])  # not a SystemExit: the CLI shows the traceback
    assert isinstance(found.value.errors[0], ValueError)
    assert "hybridcomp: error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"trainer": {"max_epochs": 3}},
            r"^trainer\.max_epochs: Expected no `max_epochs` in `trainer`: each phase trains for its own `max_epochs`",
        ),
        ({"trainer": {"default_root_dir": "elsewhere"}}, r"^trainer\.default_root_dir: .*under `run_dir`"),
        (
            {"trainer": {"enable_checkpointing": False}},
            r"^trainer\.enable_checkpointing: .*interrupted run resumes",
        ),
        ({"trainer": {"logger": "csv"}}, r"^trainer\.logger: Expected `trainer\.logger` to be true or false"),
        (
            {"trainer": {"callbacks": "EarlyStopping"}},
            r"^trainer\.callbacks: Expected `trainer\.callbacks` to be a list",
        ),
        (
            {"trainer": {"callbacks": [{"init_args": {"monitor": "val/acc"}}]}},
            r"^trainer\.callbacks\[0\]: Expected `trainer\.callbacks\[0\]\.class_path`",
        ),
        (
            {"trainer": {"callbacks": ["lightning.pytorch.callbacks.EarlyStop"]}},
            r"^trainer\.callbacks\[0\]: Unknown component 'EarlyStop'.*'EarlyStopping'",
        ),
        (
            {"trainer": {"callbacks": ["lightning_hybridcomp.models.ImageClassifier"]}},
            r"^trainer\.callbacks\[0\]: .*to name a subclass of Callback",
        ),
        (
            {
                "trainer": {
                    "callbacks": [
                        "lightning.pytorch.callbacks.LearningRateMonitor",
                        {
                            "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                            "init_args": {"monitr": "x"},
                        },
                    ]
                }
            },
            r"^trainer\.callbacks\[1\]: Unknown key\(s\) \['monitr'\] in `trainer\.callbacks\[1\]\.init_args`",
        ),
        ({"trainer": 3}, r"^trainer: Expected `trainer` to be a mapping of arguments, got 3"),
        (
            {"moe": {"options": {"experts": ["a.pt2", "b.pt2"]}}},
            r"^moe\.options\.experts: Expected no `experts` in `options`: the MoE routes the run's own `experts`",
        ),
        (
            {"moe": {"options": {"freeze_experts": False}}},
            r"^moe\.options\.freeze_experts: .*`moe\.variants` decides it",
        ),
        ({"moe": {"options": ["gate"]}}, r"^moe\.options: Expected `moe\.options` to be a mapping"),
    ],
    ids=[
        "max-epochs",
        "root-dir",
        "checkpointing",
        "logger",
        "callbacks-not-a-list",
        "callback-without-class",
        "callback-unknown",
        "callback-not-a-callback",
        "callback-arguments",
        "trainer-not-a-mapping",
        "moe-experts",
        "moe-freeze",
        "moe-options-not-a-mapping",
    ],
)
def test_what_each_phase_sets_itself_is_refused_with_the_reason(tmp_path, change, match) -> None:
    raw = {**_raw(tmp_path / "run"), **change}
    with pytest.raises(PipelineConfigError, match=match):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_valid_keys_leave_out_what_the_pipeline_sets(tmp_path) -> None:
    raw = {**_raw(tmp_path / "run"), "trainer": {"max_epoch": 3}, "moe": {"options": {"gat": "cnn"}}}
    messages = _refusals(raw)
    assert "'limit_train_batches'" in messages["trainer"] and "'max_epochs'" not in messages["trainer"]
    assert "'gate'" in messages["moe.options"]
    assert "'experts'" not in messages["moe.options"] and "'freeze_experts'" not in messages["moe.options"]


def test_trainer_callbacks_are_built_anew_for_every_phase(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    monitor = {
        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "epoch"},
    }
    raw["trainer"] = {**raw["trainer"], "callbacks": [monitor]}
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    own = pl.callbacks.EarlyStopping(monitor="val/acc")
    first = pipeline.phase_trainer(tmp_path / "a", "a", 2, [own])
    second = pipeline.phase_trainer(tmp_path / "b", "b", 3, [])
    (made,) = [c for c in first.callbacks if isinstance(c, pl.callbacks.LearningRateMonitor)]
    (again,) = [c for c in second.callbacks if isinstance(c, pl.callbacks.LearningRateMonitor)]
    assert made is not again and made.logging_interval == "epoch"
    assert first.callbacks.index(own) < first.callbacks.index(made)  # the phase's own callbacks run first
    assert first.max_epochs == 2 and second.max_epochs == 3
    assert any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in first.callbacks)  # still resumable
    assert next(type(lg).__name__ for lg in first.loggers) == "CSVLogger"


def test_trainer_logger_false_turns_the_phase_logs_off(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    raw["trainer"] = {**raw["trainer"], "logger": False}
    trainer = Pipeline(parse_pipeline_config(raw), say=lambda _: None).phase_trainer(
        tmp_path / "a", "a", 1, []
    )
    assert trainer.loggers == []


@pytest.mark.parametrize("hook", ["configure_model", "setup"])
def test_layer_names_of_a_network_the_module_builds_itself_are_checked_before_training(
    tmp_path, hook
) -> None:
    raw = _raw(tmp_path / "run")
    raw["baseline"]["model"]["class_path"] = "tests._helpers.LateBuiltClassifier"
    raw["baseline"]["model"]["init_args"]["hook"] = hook
    Pipeline(parse_pipeline_config(copy.deepcopy(raw)), say=lambda _: None)  # right names: no refusal
    raw["experts"][1]["pruning"]["ignored_layers"] = ["net.no_such_layer"]
    raw["experts"][0]["quantization"]["module"] = "nett"
    problems = _refusals(raw)
    assert sorted(problems) == ["experts[0].quantization.module", "experts[1].pruning.ignored_layers"]
    assert "'net.no_such_layer' matches nothing" in problems["experts[1].pruning.ignored_layers"]
    assert "Did you mean one of ['net']" in problems["experts[0].quantization.module"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "class_path", ["tests._helpers.LateBuiltClassifier", "tests._helpers.ManualClassifier"]
)
def test_distillation_into_manual_optimization_is_refused_with_the_other_problems(
    tmp_path, class_path
) -> None:
    raw = _raw(tmp_path / "run")
    raw["baseline"]["model"]["class_path"] = class_path
    raw["baseline"]["model"]["init_args"]["automatic_optimization"] = False
    raw["experts"][1]["pruning"]["ignored_layers"] = ["net.no_such_layer"]
    problems = _refusals(raw)
    assert sorted(problems) == ["experts[0].distillation", "experts[1].pruning.ignored_layers"]
    assert "manual optimization does not use" in problems["experts[0].distillation"]


def test_a_callback_refused_by_its_constructor_hides_no_other_problem(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    stop = {
        "class_path": "lightning.pytorch.callbacks.EarlyStopping",
        "init_args": {"monitor": "x", "mode": "maximum"},
    }
    raw["trainer"] = {**raw["trainer"], "callbacks": [stop]}
    raw["experts"][1]["pruning"]["ignored_layers"] = ["net.no_such_layer"]
    problems = _refusals(raw)
    assert sorted(problems) == ["experts[1].pruning.ignored_layers", "trainer.callbacks[0]"]
    assert "`mode` can be min, max, got maximum" in problems["trainer.callbacks[0]"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (
            "lightning_hybridcomp.callbacks.StructuredPruning",
            r"Expected no StructuredPruning in `trainer\.callbacks`.*`experts\[i\]\.pruning`",
        ),
        (
            {
                "class_path": "lightning_hybridcomp.callbacks.KnowledgeDistillation",
                "init_args": {"teacher": "t.pt2"},
            },
            r"Expected no KnowledgeDistillation .*`moe\.distillation`",
        ),
        (
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": [1]},
            r"Expected `trainer\.callbacks\[0\]\.init_args` to be a mapping of arguments, got \[1\]",
        ),
    ],
    ids=["pruning", "distillation", "init-args-not-a-mapping"],
)
def test_trainer_callbacks_refusals(tmp_path, entry, match) -> None:
    raw = _raw(tmp_path / "run")
    raw["trainer"] = {**raw["trainer"], "callbacks": [entry]}
    with pytest.raises(PipelineConfigError, match=r"^trainer\.callbacks\[0\]: " + match):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)


def test_null_means_not_given_as_in_lightning_printed_configs(tmp_path) -> None:
    raw = _raw(tmp_path / "run")
    nulls = dict.fromkeys(["max_epochs", "default_root_dir", "enable_checkpointing", "logger", "callbacks"])
    plain = parse_pipeline_config(raw)
    with_nulls = parse_pipeline_config({**raw, "trainer": {**raw["trainer"], **nulls}})
    assert with_nulls.trainer == plain.trainer
    defaults = parse_pipeline_config({**raw, "trainer": None, "moe": {**raw["moe"], "options": None}})
    assert defaults.trainer == {} and defaults.moe.options == parse_pipeline_config({}).moe.options


def test_callbacks_fingerprint_alike_whichever_way_they_are_written(tmp_path) -> None:
    from lightning_hybridcomp.pipeline_plan import phase_specs

    monitor = "lightning.pytorch.callbacks.LearningRateMonitor"

    def fingerprints(callbacks: Any) -> dict[str, str]:
        raw = _raw(tmp_path / "run")
        raw["trainer"] = {**raw["trainer"], "callbacks": callbacks}
        return {spec.key: spec.fingerprint for spec in phase_specs(parse_pipeline_config(raw))}

    assert fingerprints([monitor]) == fingerprints([{"class_path": monitor}])
    assert fingerprints([monitor]) == fingerprints([{"class_path": monitor, "init_args": {}}])
    assert fingerprints([]) == fingerprints(None)
    assert fingerprints([monitor])["baseline"] != fingerprints([])["baseline"]  # callbacks can change results
