"""Two-process DDP run for ``test_quantization.py``: QAT with rank-dependent data, then conversion.

Run as ``python tests/callbacks/_ddp_qat.py OUT_DIR``; Lightning's "ddp" strategy starts the second
process by running this script again. Each rank writes ``OUT_DIR/rank{r}.json`` with a hash of its int8
model, so the test can check that every rank converted to the same model.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp._lightning import optimizer_parameters
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.models import build_backbone


class DDPClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", 10, 1, width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
        return DataLoader(data, batch_size=8)  # DistributedSampler gives each rank different samples


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
            "state_hash": _digest(net),
            "int8_elements": sum(t.numel() for t in net.state_dict().values() if t.dtype == torch.int8),
            "logits": [round(v, 6) for v in logits.flatten().tolist()],
            "optimizer_covers_network": self.optimizer_covers_network,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[QuantizationAwareTraining(start_epoch=1, verbose=False), Report(out_dir)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DDPClassifier())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
