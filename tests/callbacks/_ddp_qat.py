"""Two-process DDP run for ``test_quantization.py``: QAT with rank-dependent data, then conversion.

Run by ``test_quantization.py`` through ``tests._helpers.run_ddp_script`` (``python tests/callbacks/_ddp_qat.py
OUT_DIR`` with the repository on ``PYTHONPATH``); Lightning's "ddp" strategy starts the second process by
running this script again; ``HYBRIDCOMP_QAT_BACKEND`` picks the backend. Each rank writes
``OUT_DIR/rank{r}.json`` with a hash of its int8 model, so the test can check that every rank converted to
the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_hybridcomp._lightning import optimizer_parameters
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from tests._ddp_helpers import DDPClassifier, ddp_trainer, digest, run_rank, write_rank_result


class Report(pl.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.optimizer_covers_network: list[bool] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held = {id(p) for p in optimizer_parameters(trainer)}
        self.optimizer_covers_network.append(held == {id(p) for p in pl_module.parameters()})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qat = next(cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining))  # type: ignore[attr-defined]
        net = pl_module.net
        with torch.no_grad():
            logits = net.eval()(torch.ones(2, 1, 8, 8))
        result = {
            "rank": trainer.global_rank,
            "stage": qat.stage,
            "state_hash": digest(net.state_dict().items()),
            "int8_elements": sum(t.numel() for t in net.state_dict().values() if t.dtype == torch.int8),
            "logits": [round(v, 6) for v in logits.flatten().tolist()],
            "optimizer_covers_network": self.optimizer_covers_network,
        }
        write_rank_result(self.out_dir, trainer, result)


def main(out_dir: Path) -> None:
    backend = os.environ.get("HYBRIDCOMP_QAT_BACKEND", "x86_pt2e")
    torch.set_num_threads(1)
    pl.seed_everything(0)
    trainer = ddp_trainer(
        out_dir,
        max_epochs=2,
        callbacks=[QuantizationAwareTraining(backend=backend, start_epoch=1, verbose=False), Report(out_dir)],
    )
    trainer.fit(DDPClassifier(image_size=8, samples=64, with_example=False))


if __name__ == "__main__":
    run_rank(main)
