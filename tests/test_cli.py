from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_hybridcomp.models import build_backbone
from tests._reference import reference_macs, reference_params

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _hybridcomp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_hybridcomp.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_fit_digits_example_runs_and_prints_the_summary(tmp_path) -> None:
    result = _hybridcomp(
        "fit",
        "--config",
        str(ROOT / "examples" / "digits.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "hybridcomp summary" in out
    row = next(line for line in out.splitlines() if line.startswith("| ImageClassifier"))
    accuracy = float(row.split("|")[2])
    assert accuracy > 0.2  # one epoch; chance is 0.1
    assert list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_fit_under_ddp_prunes_and_exits_cleanly(tmp_path) -> None:
    """Two gloo processes started by the CLI prune together, print one summary, and both exit with 0."""
    result = _hybridcomp(
        "fit",
        "--config",
        str(ROOT / "examples" / "digits.yaml"),
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.callbacks+=lightning_hybridcomp.StructuredPruning",
        "--trainer.callbacks.pruning_ratio=0.5",
        "--trainer.callbacks.iterative_steps=1",
        "--trainer.callbacks.start_epoch=1",
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "terminate called" not in out  # neither rank aborted in gloo's threads at exit
    assert out.count("hybridcomp summary") == 1  # rank zero only
    row = next(line for line in out.splitlines() if line.startswith("| ImageClassifier"))
    params = int(row.split("|")[3].replace(",", ""))
    assert params < 0.3 * 65_834  # the unpruned small CNN has 65,834 parameters


def _summary_row(out: str) -> dict[str, str]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    row = next(line for line in lines if line.startswith("| ImageClassifier"))
    return dict(zip(header, (cell.strip() for cell in row.strip("|").split("|"))))


def _figure(cell: str) -> int:
    return int(cell.replace(",", ""))


@pytest.mark.parametrize("convert", [True, False], ids=["int8", "fake-quant"])
def test_fit_with_qat_prints_the_models_real_params_and_macs(tmp_path, convert: bool) -> None:
    """The summary of a QAT run counts the int8 program's weights (buffers, not parameters) and MACs."""
    result = _hybridcomp(
        "fit",
        "--config",
        str(ROOT / "examples" / "digits.yaml"),
        "--model.width=8",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.callbacks+=lightning_hybridcomp.QuantizationAwareTraining",
        "--trainer.callbacks.start_epoch=1",
        f"--trainer.callbacks.convert_on_fit_end={str(convert).lower()}",
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    row = _summary_row(out)
    net = build_backbone("small_cnn", 10, 1, width=8)
    # Fake quantization keeps the float weights; int8 conversion folds each BatchNorm weight into its conv.
    bn_weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    expected_params = reference_params(net) - (bn_weights if convert else 0)
    assert _figure(row["params"]) == expected_params
    assert _figure(row["MACs"]) == reference_macs(net, torch.randn(1, 1, 16, 16))


def test_unknown_backbone_is_one_clear_line(tmp_path) -> None:
    result = _hybridcomp("fit", "--model.backbone", "resnet99", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "hybridcomp: error: Expected `backbone`" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_parses(config: Path, tmp_path, monkeypatch, capsys) -> None:
    # --print_config parses and validates the whole file (class paths, argument names) without running;
    # in this process (the console script's own entry point), since a fresh interpreter per file costs
    # seconds of imports each.
    from lightning_hybridcomp.cli import main

    monkeypatch.chdir(tmp_path)
    subcommand = "pipeline" if config.name.startswith("pipeline") else "fit"
    try:
        main([subcommand, "--config", str(config), "--print_config"])
    except SystemExit as stop:
        assert stop.code in (0, None), capsys.readouterr().err[-3000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"]
    model = printed["baseline"]["model"] if subcommand == "pipeline" else printed["model"]
    assert model["class_path"] == "lightning_hybridcomp.models.ImageClassifier"


def test_pipeline_unknown_key_is_one_clear_line(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("experts:\n  - name: a\n    prune: {pruning_ratio: 0.5}\n")
    result = _hybridcomp(
        "pipeline", "--config", str(config), "--run_dir", str(tmp_path / "run"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert (
        "hybridcomp: error: Unknown key(s) ['prune'] in `experts[0]`. Valid keys: ['name'," in result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_help_and_a_mistyped_subcommand_list_every_subcommand(tmp_path, monkeypatch, capsys) -> None:
    from lightning_hybridcomp.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "{fit,validate,test,predict,pipeline,export}" in printed
    assert "resumable from disk" in printed and "ExecuTorch .pte program" in printed
    with pytest.raises(SystemExit) as stop:
        main(["pipelin"])
    assert stop.value.code == 2
    assert "'pipelin' (choose from 'fit', 'validate', 'test', 'predict', 'pipeline', 'export')" in (
        capsys.readouterr().err
    )
    # LightningCLI's top-level options before `pipeline`/`export` would hand them to LightningCLI.
    (tmp_path / "empty.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as stop:
        main(["-c", str(tmp_path / "empty.yaml"), "pipeline"])
    assert stop.value.code == 2
    assert "Expected `pipeline` first, got ['-c', " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]  # nothing ran
