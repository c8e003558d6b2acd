from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_unknown_backbone_is_one_clear_line(tmp_path) -> None:
    result = _hybridcomp("fit", "--model.backbone", "resnet99", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "hybridcomp: error: Expected `backbone`" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_parses(config: Path, tmp_path) -> None:
    # --print_config parses and validates the whole file (class paths, argument names) without running.
    result = _hybridcomp("fit", "--config", str(config), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]
