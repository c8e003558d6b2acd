"""What the two-process DDP scripts (``tests/*/_ddp_*.py``) share: a tiny classifier, the Trainer, hashes.

The scripts are started by :func:`tests._helpers.run_ddp_script`, which puts the repository on
``PYTHONPATH`` so that both ranks import this module.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_hybridcomp._lightning import close_process_group
from lightning_hybridcomp.models import build_backbone
from tests._helpers import FAST_TRAINER_FLAGS, ClassifierSteps, random_classification_data


class DDPClassifier(ClassifierSteps):
    """SmallCNN (width 8) on random ``1 x image_size x image_size`` images, SGD with momentum."""

    def __init__(self, *, image_size: int, samples: int, with_example: bool) -> None:
        super().__init__()
        self.image_size = image_size
        self.samples = samples
        self.net = build_backbone("small_cnn", 10, 1, width=8)
        if with_example:
            self.example_input_array = torch.zeros(1, 1, image_size, image_size)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = random_classification_data(self.samples, (1, self.image_size, self.image_size))
        return DataLoader(data, batch_size=8)  # DistributedSampler gives each rank different samples


def ddp_trainer(out_dir: Path, **overrides: Any) -> pl.Trainer:
    """Two CPU processes under the ``ddp`` strategy (gloo), otherwise the tests' fast flags."""
    flags = {**FAST_TRAINER_FLAGS, "devices": 2, "strategy": "ddp", "default_root_dir": str(out_dir)}
    return pl.Trainer(**{**flags, **overrides})


def digest(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of tensors by name and raw bytes (any dtype), so ranks can compare models exactly."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_rank_result(out_dir: Path, trainer: pl.Trainer, result: dict[str, Any]) -> None:
    """Write ``OUT_DIR/rank{r}.json``, which the launching test reads back."""
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def run_rank(main: Callable[[Path], None]) -> None:
    """Run ``main(OUT_DIR)`` with ``OUT_DIR`` from the command line, then close the process group.

    Without the close, gloo's threads can abort a finished rank at interpreter exit (SIGABRT). It runs
    only after ``main`` returned: a failed rank exits with its error, as the negative controls expect.
    """
    main(Path(sys.argv[1]))
    close_process_group()
