"""How ``hybridcomp`` reports errors: the package's one-line message, or the traceback of the user's bug."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lightning_hybridcomp
from lightning_hybridcomp import QuantizationAwareTraining, StructuredPruning
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp.cli import (
    check_callbacks_for_checkpoint,
    checkpoint_callbacks,
    error_message,
    main,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(lightning_hybridcomp.__file__).resolve().parent
FAST = [
    "--model.width=4",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when `args` is given while sys.argv holds other arguments (pytest's).
    monkeypatch.setattr(sys, "argv", ["hybridcomp"])


def _truncated_checkpoint(path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, buffer)
    path.write_bytes(buffer.getvalue()[:3000])
    return path


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0), capsys.readouterr().err


# --------------------------------------------------------------------------- the rule, on real tracebacks


def _users_training_step(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction=3)  # type: ignore[arg-type]  # the user's bug


def _function_of(module: str, source: str) -> Callable[[], None]:
    """``run`` defined in ``source`` as if in ``module`` (a package module's file is in the package's folder).

    Called straight from a test, whose own frame (the one that catches) does not count, its frames are
    the only ones the rule sees; a helper of this file in between would be user code.
    """
    package = module.startswith("lightning_hybridcomp.")
    filename = str(PACKAGE_DIR / "_simulated.py") if package else f"<{module}>"
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(textwrap.dedent(source), filename, "exec"), namespace)
    return namespace["run"]


def test_the_packages_message_wins_over_its_low_level_cause(tmp_path: Path) -> None:
    path = _truncated_checkpoint(tmp_path / "expert.ckpt")
    with pytest.raises(ValueError) as info:
        read_checkpoint(path, what="`experts[0]`")
    message = error_message(info.value)
    assert message is not None and message.startswith("Could not read `experts[0]` ")
    assert "expert.ckpt" in message and "caused by" not in message  # the cause is already in the message


def test_an_innermost_cause_the_message_leaves_out_follows_on_one_line() -> None:
    run = _function_of(
        "lightning_hybridcomp._simulated",
        """
        def run():
            try:
                open("/nonexistent/run.yaml")
            except OSError as err:
                raise ValueError("Expected `config` to be a readable file, got '/nonexistent/run.yaml'.") from err
        """,
    )
    with pytest.raises(ValueError) as info:
        run()
    assert error_message(info.value) == (
        "Expected `config` to be a readable file, got '/nonexistent/run.yaml'.\n"
        "  caused by FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/run.yaml'"
    )


def test_the_packages_error_is_found_under_a_librarys_wrapper() -> None:
    """jsonargparse wraps a constructor's ValueError in its own; the package's message is printed."""
    run = _function_of(
        "jsonargparse._simulated",
        """
        from lightning_hybridcomp.models import ImageClassifier

        def run():
            try:
                ImageClassifier(backbone="resnet99")
            except ValueError as err:
                raise ValueError("Does not validate against any of the Union subtypes") from err
        """,
    )
    with pytest.raises(ValueError, match="Union subtypes") as info:
        run()
    message = error_message(info.value)
    assert message is not None and message.startswith("Expected `backbone` to be 'small_cnn'")
    assert "Union subtypes" not in message


def test_an_error_in_user_code_keeps_its_traceback() -> None:
    with pytest.raises(ValueError, match="3 is not a valid value for reduction") as info:
        _users_training_step(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert error_message(info.value) is None  # torch raised it, but from the user's frame


def test_a_library_error_outside_user_code_is_one_line() -> None:
    # Called straight from the frame that catches it: only torch's frames took part.
    with pytest.raises(ValueError) as info:
        F.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), reduction=3)  # type: ignore[arg-type]
    assert error_message(info.value) == "3 is not a valid value for reduction"


# --------------------------------------------------------------------------- through the command


def test_truncated_expert_checkpoint_prints_the_packages_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _truncated_checkpoint(tmp_path / "expert.ckpt")
    code, err = _run_main(
        [
            "fit",
            "--model=lightning_hybridcomp.moe.MoELightningModule",
            "--model.experts=[expert.ckpt, expert.ckpt]",
        ],
        capsys,
    )
    assert code == 2
    assert (
        "hybridcomp: error: Could not read experts[0] ('expert.ckpt') 'expert.ckpt': it is truncated" in err
    )
    assert "Traceback" not in err


def test_a_bug_in_the_users_training_step_shows_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "user_model.py").write_text(
        textwrap.dedent(
            """
            import torch.nn.functional as F
            from lightning_hybridcomp.models import ImageClassifier

            class BuggyClassifier(ImageClassifier):
                def training_step(self, batch, batch_idx):
                    x, y = batch
                    return F.cross_entropy(self(x), y, reduction=3)
            """
        )
    )
    command = [
        sys.executable,
        "-m",
        "lightning_hybridcomp.cli",
        "fit",
        "--model=user_model.BuggyClassifier",
        *FAST,
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert 'user_model.py", line 8, in training_step' in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: 3 is not a valid value for reduction")
    assert "hybridcomp: error" not in result.stderr


# --------------------------------------------------------------------------- --ckpt_path


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (_truncated_checkpoint, "Could not read `--ckpt_path` '{path}': it is truncated or corrupt"),
        (
            lambda path: path.write_bytes(bytes(range(256)) * 20) and path,
            "Could not read `--ckpt_path` '{path}' with `torch.load(weights_only=True)`: it is corrupt",
        ),
        (lambda path: path, "Expected `--ckpt_path` to be an existing file, got '{path}' (not found)."),
    ],
    ids=["truncated", "garbage", "missing"],
)
@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_an_unreadable_ckpt_path_is_one_clear_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    subcommand: str,
    write: object,
    match: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.ckpt"
    write(path)  # type: ignore[operator]
    code, err = _run_main([subcommand, f"--ckpt_path={path}", *FAST], capsys)
    assert code == 2
    assert f"hybridcomp: error: {match.format(path=path)}" in err
    assert "Traceback" not in err and "weights_only=False" not in err


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a fit in which StructuredPruning removed half of the channels."""
    root = tmp_path_factory.mktemp("pruned")
    args = [
        "fit",
        *FAST,
        f"--trainer.default_root_dir={root}",
        "--summary=false",
        "--trainer.callbacks+=lightning_hybridcomp.StructuredPruning",
        "--trainer.callbacks.pruning_ratio=0.5",
        "--trainer.callbacks.iterative_steps=1",
    ]
    main(args)
    (checkpoint,) = root.rglob("*.ckpt")
    return checkpoint


def test_a_pruned_checkpoint_without_its_callback_says_which_is_needed(
    pruned_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _run_main(["test", f"--ckpt_path={pruned_checkpoint}", *FAST], capsys)
    assert code == 2
    assert (
        f"hybridcomp: error: The checkpoint '{pruned_checkpoint}' was written with `StructuredPruning` ("
        in err
    )
    assert "--trainer.callbacks+=lightning_hybridcomp.StructuredPruning" in err
    assert "`lightning_hybridcomp.load_pruned_model(path, cls)`" in err
    assert "size mismatch" not in err and "Traceback" not in err


def test_a_pruned_checkpoint_tests_with_its_callback(
    pruned_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "test",
            f"--ckpt_path={pruned_checkpoint}",
            *FAST,
            "--trainer.callbacks+=lightning_hybridcomp.StructuredPruning",
        ]
    )
    assert "hybridcomp: error" not in capsys.readouterr().err


def test_a_quantized_checkpoint_needs_the_qat_callback(tmp_path: Path) -> None:
    path = tmp_path / "qat.ckpt"
    torch.save(
        {
            "state_dict": {},
            "callbacks": {
                "StructuredPruning": {"history": []},  # pruning had not started: no structure to rebuild
                "QuantizationAwareTraining{'module': None}": {"stage": "converted"},
            },
        },
        path,
    )
    needed = checkpoint_callbacks(path)
    assert list(needed) == ["QuantizationAwareTraining"]
    with pytest.raises(
        ValueError, match=r"written with `QuantizationAwareTraining` \(stage 'converted'"
    ) as info:
        check_callbacks_for_checkpoint(needed, [StructuredPruning()], str(path), subcommand="test")
    assert "load_pruned_model" not in str(info.value)  # that rebuilds pruning only
    check_callbacks_for_checkpoint(needed, [QuantizationAwareTraining()], str(path), subcommand="test")


@pytest.mark.parametrize("name", ["best", "last", "hpc", "registry:my-model", "s3://bucket/model.ckpt", None])
def test_lightnings_own_checkpoint_names_are_left_to_lightning(name: str | None) -> None:
    assert checkpoint_callbacks(name) == {}
