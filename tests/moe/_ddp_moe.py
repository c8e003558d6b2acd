"""DDP gate training on 2 CPU processes (gloo), launched by test_module.py; each rank writes its figures.

Run by ``test_module.py`` through ``tests._helpers.run_ddp_script`` (``python tests/moe/_ddp_moe.py OUT_DIR``
with the repository on ``PYTHONPATH``); Lightning's ``ddp`` strategy starts rank 1 by running this script
again.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.moe.module import MoELightningModule
from tests._ddp_helpers import ddp_trainer, run_rank, write_rank_result


def _expert(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    experts = [_expert(w) for w in (2, 4, 6)]
    moe = MoELightningModule(
        experts, top_k=2, input_shape=[1, 8, 8], learning_rate=1e-2, balance_coefficient=0.1
    )
    trainer = ddp_trainer(out_dir, max_epochs=1, limit_train_batches=4)
    trainer.fit(moe, DigitsDataModule(batch_size=32, image_size=8))
    local = sum(len(batch[1]) for batch in trainer.val_dataloaders)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "local_val_samples": local,
        "stats": moe.routing_stats,
        "logged_load_0": float(trainer.callback_metrics["moe/expert_load/0"]),
        "gate": [float(p.detach().double().sum()) for p in moe.gate.parameters()],
        "experts_unchanged": all(not p.requires_grad for p in moe.experts.parameters()),
    }
    write_rank_result(out_dir, trainer, record)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_rank(main)
