"""Two-process DDP run for ``test_pruning.py``: prune with rank-dependent scores, write each rank's result.

Run by ``test_pruning.py`` through ``tests._helpers.run_ddp_script`` (``python tests/callbacks/_ddp_pruning.py
OUT_DIR`` with the repository on ``PYTHONPATH``); Lightning's "ddp" strategy starts the second process by
running this script again. Each rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_hybridcomp._lightning import optimizer_parameters
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from tests._ddp_helpers import DDPClassifier, ddp_trainer, digest, run_rank, write_rank_result


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
        self.after_last_step = digest(pl_module.named_parameters())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, StructuredPruning))  # type: ignore[attr-defined]
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "shapes": {k: list(v.shape) for k, v in pl_module.state_dict().items()},
            "digest": digest(pl_module.named_parameters()),
            "buffer_digest": digest(pl_module.named_buffers()),
            "digest_after_last_step": self.after_last_step,
            "steps_done": pruning.steps_done,
            "history": pruning.pruning_history(),
            "optimizer_matches": self.optimizer_matches,
            "global_step": trainer.global_step,
        }
        write_rank_result(self.out_dir, trainer, result)


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
    trainer = ddp_trainer(out_dir, max_epochs=4, callbacks=[RankDependentSeed(), pruning, Report(out_dir)])
    trainer.fit(DDPClassifier(image_size=16, samples=32, with_example=True))


if __name__ == "__main__":
    run_rank(main)
