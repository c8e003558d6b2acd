"""Pieces several test modules share: fast Trainers, the tests' own LightningModule steps, random data.

Imported as ``tests._helpers`` (pytest's importlib mode names test modules from the repository root); the
DDP scripts, run as plain files, find it through the ``PYTHONPATH`` that :func:`run_ddp_script` sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.models import ImageClassifier, build_backbone

REPO = Path(__file__).resolve().parents[1]

# No logger, progress bar, summary or checkpoint files: quiet runs that write nothing unasked.
FAST_TRAINER_FLAGS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


# A miniature pipeline run: tiny model on 8x8 digits, few batches, every phase.
MINI_PIPELINE: dict[str, Any] = {
    "seed": 0,
    "data": {
        "class_path": "lightning_hybridcomp.data.DigitsDataModule",
        "init_args": {"batch_size": 64, "image_size": 8},
    },
    "baseline": {
        "model": {
            "class_path": "lightning_hybridcomp.models.ImageClassifier",
            "init_args": {"backbone": "small_cnn", "width": 8, "image_size": 8, "lr": 0.01},
        },
        "max_epochs": 2,
    },
    "experts": [
        {
            "name": "half",
            "pruning": {"pruning_ratio": 0.5, "iterative_steps": 1},
            "quantization": {"backend": "x86_pt2e"},
            "distillation": {"alpha": 0.5, "temperature": 2.0},
            "max_epochs": 2,
        },
        {
            "name": "third",
            "pruning": {"pruning_ratio": 0.3, "iterative_steps": 1},
            "max_epochs": 2,
            "seed": 1,
        },
    ],
    "moe": {"top_k": [1, 2], "max_epochs": 1},
    # ExecuTorch lowering costs seconds per program: only the tests of the edge column switch it on.
    "evaluation": {
        "latency_batch_sizes": [1, 64],
        "repeats": 2,
        "warmup": 1,
        "compile": False,
        "edge": False,
    },
    "trainer": {"limit_train_batches": 4, "limit_val_batches": 2, "enable_progress_bar": False},
}


def ready_digits(image_size: int) -> DigitsDataModule:
    """The embedded digits at ``image_size``, batch 64, split and set up for fit and test."""
    dm = DigitsDataModule(batch_size=64, image_size=image_size, seed=0)
    dm.setup("fit")
    dm.setup("test")
    return dm


def fast_trainer(root: Path | None = None, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer with :data:`FAST_TRAINER_FLAGS`, writing under ``root`` when given; ``overrides`` win."""
    location = {"default_root_dir": str(root)} if root is not None else {}
    return pl.Trainer(**{**FAST_TRAINER_FLAGS, **location, **overrides})


class ClassifierSteps(pl.LightningModule):
    """Steps of the tests' user LightningModules: ``self.net`` maps inputs to logits, cross-entropy trains.

    Deliberately not the package's ``ImageClassifier``: the callbacks must work on any LightningModule.
    """

    net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])


def random_classification_data(
    samples: int, input_shape: Sequence[int], *, num_classes: int = 10, seed: int = 0
) -> TensorDataset:
    """``samples`` standard-normal inputs and uniform labels, the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(samples, *input_shape, generator=generator),
        torch.randint(0, num_classes, (samples,), generator=generator),
    )


def relative_distance(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||``: how far outputs ``a`` are from the reference outputs ``b``."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def run_ddp_script(
    script: Path, out_dir: Path, *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a two-process DDP test script as ``python SCRIPT OUT_DIR``; its output comes back as text.

    Lightning's ``ddp`` strategy starts the second rank by running the script again with the same
    environment, so the ``PYTHONPATH`` set here lets both ranks import ``tests._ddp_helpers``.
    """
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(script), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": python_path, **(env or {})},
    )


def pipeline_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    """The ``hybridcomp pipeline`` command line for ``config`` writing into ``run_dir``."""
    module = [sys.executable, "-m", "lightning_hybridcomp.cli", "pipeline"]
    return [*module, "--config", str(config), "--run_dir", str(run_dir), *extra]


def done_marker_times(run_dir: Path) -> dict[str, float]:
    """Modification time of every phase's ``done.json`` in a pipeline run directory, by relative path."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.rglob("done.json")}


class LateBuiltClassifier(ImageClassifier):
    """An ``ImageClassifier`` whose network its own ``hook`` builds (``"configure_model"`` or ``"setup"``),
    which Lightning calls after every callback's ``setup``: how large models are often built."""

    def __init__(
        self, hook: str = "configure_model", automatic_optimization: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.net = None  # type: ignore[assignment]
        self.hook = hook
        self.automatic_optimization = automatic_optimization

    def _build(self) -> None:
        if self.net is None:
            h = self.hparams
            self.net = build_backbone(
                h.backbone, h.num_classes, h.in_channels, width=h.width, weights=h.weights
            )

    def configure_model(self) -> None:
        if self.hook == "configure_model":
            self._build()

    def setup(self, stage: str) -> None:
        if self.hook == "setup":
            self._build()


class ManualClassifier(ImageClassifier):
    """An ``ImageClassifier`` with ``automatic_optimization`` as given (its own steps are not run here)."""

    def __init__(self, automatic_optimization: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = automatic_optimization
