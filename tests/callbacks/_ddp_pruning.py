"""Two-process DDP run for ``test_pruning.py``: prune with rank-dependent scores, write each rank's result.

Run as ``python tests/callbacks/_ddp_pruning.py OUT_DIR``; Lightning's "ddp" strategy starts the second
process by running this script again. Each rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp._lightning import optimizer_parameters
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.models import build_backbone


class DDPClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", 10, 1, width=8)
        self.example_input_array = torch.zeros(1, 1, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
        )
        return DataLoader(data, batch_size=8)


def _digest(module: nn.Module, *, buffers: bool = False) -> str:
    """Hash of the parameters (or of the buffers, e.g. BatchNorm running statistics)."""
    h = hashlib.sha256()
    for name, tensor in module.named_buffers() if buffers else module.named_parameters():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankDependentSeed(pl.Callback):
    """Seeds each rank differently right before the pruning step, so random scores differ per rank."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(1000 + trainer.global_rank)


class Report(pl.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.after_last_step: str | None = None
        self.optimizer_matches: list[bool] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held = {id(p) for p in optimizer_parameters(trainer)}
        self.optimizer_matches.append(held == {id(p) for p in pl_module.parameters()})
        ddp_params = {id(p) for p in trainer.strategy.model.parameters()}  # type: ignore[union-attr]
        self.optimizer_matches.append(ddp_params == {id(p) for p in pl_module.parameters()})
        self.after_last_step = _digest(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))  # type: ignore[attr-defined]
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "shapes": {k: list(v.shape) for k, v in pl_module.state_dict().items()},
            "digest": _digest(pl_module),
            "buffer_digest": _digest(pl_module, buffers=True),
            "digest_after_last_step": self.after_last_step,
            "steps_done": pruning.steps_done,
            "history": pruning.pruning_history(),
            "optimizer_matches": self.optimizer_matches,
            "global_step": trainer.global_step,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out_dir: Path) -> None:
    if os.environ.get("HYBRIDCOMP_TEST_NO_AGREEMENT") == "1":
        # Negative control: every rank keeps its own scores, so the ranks must be caught disagreeing.
        from lightning_hybridcomp.callbacks import _pruning_utils

        _pruning_utils.AgreedImportance.__call__ = lambda self, group: self.inner(group)  # type: ignore[method-assign]
    pl.seed_everything(0)
    torch.set_num_threads(1)
    pruning = StructuredPruning(
        pruning_ratio=0.5, iterative_steps=2, start_epoch=1, importance="random", global_pruning=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=4,
        callbacks=[RankDependentSeed(), pruning, Report(out_dir)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out_dir),
    )
    trainer.fit(DDPClassifier())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
