"""Complementary experts: fp32 experts fine-tuned in fake-quant form on their routed samples, then int8."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp.moe.experts import stored_program
from lightning_hybridcomp.moe.module import MoELightningModule, load_moe
from tests._helpers import fast_trainer, ready_digits

SIDE = 8
SHAPE = [1, SIDE, SIDE]
EPOCHS = 2


class SmallCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _experts() -> list[nn.Module]:
    torch.manual_seed(0)
    experts = [SmallCNN(4), SmallCNN(6)]
    for expert in experts:  # non-trivial BatchNorm statistics: the folding must use them
        for m in expert.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return experts


def _moe(**overrides: Any) -> MoELightningModule:
    options: dict[str, Any] = {
        "top_k": 2,
        "input_shape": SHAPE,
        "quantize_experts": "x86_pt2e",
        "freeze_experts": False,
        "noisy_gating": False,  # no random noise, so a resumed fit can equal an uninterrupted one bit for bit
        **overrides,
    }
    return MoELightningModule(_experts(), **options)


class ExpertSnapshots(Callback):
    """The first expert's trainable weights when training starts and when it ends (before conversion)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = [p.detach().clone() for p in pl_module.experts[0].parameters()]
        self.stage_at_start = pl_module.expert_stage  # type: ignore[union-attr]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = [p.detach().clone() for p in pl_module.experts[0].parameters()]


@pytest.fixture(scope="module")
def data() -> SimpleNamespace:
    digits = ready_digits(SIDE)
    x, y = (torch.cat(t) for t in zip(*digits.train_dataloader()))
    x_test = torch.cat([b[0] for b in digits.test_dataloader()])
    # In a fixed order: a resumed fit then sees the very batches the uninterrupted one saw.
    return SimpleNamespace(train=DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32), x_test=x_test)


@pytest.fixture(scope="module")
def tuned(data: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tuned")
    pl.seed_everything(0)
    moe = _moe()
    snapshots = ExpertSnapshots()
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
    trainer = fast_trainer(
        root, max_epochs=EPOCHS, callbacks=[snapshots, checkpoints], enable_checkpointing=True
    )
    trainer.fit(moe, data.train)
    trainer.save_checkpoint(root / "final.ckpt")
    with torch.no_grad():
        predictions = moe.eval()(data.x_test)
    return SimpleNamespace(root=root, moe=moe, snapshots=snapshots, predictions=predictions)


def test_fit_fine_tunes_fake_quant_experts_and_ends_in_int8(tuned: SimpleNamespace) -> None:
    moe = tuned.moe
    assert tuned.snapshots.stage_at_start == "fake_quant"
    # The experts learnt on their routed samples while in fake-quant form.
    assert any(not torch.equal(a, b) for a, b in zip(tuned.snapshots.start, tuned.snapshots.end))
    assert moe.expert_stage == "converted"
    for record in moe.expert_records:
        assert record.quantized
        targets = {str(n.target) for n in record.module.graph.nodes if n.op == "call_function"}
        assert "quantized_decomposed.dequantize_per_channel.default" in targets
        assert any(t.dtype == torch.int8 for t in record.module.state_dict().values())
    assert torch.allclose(tuned.predictions.exp().sum(-1), torch.ones(len(tuned.predictions)))


def test_frozen_experts_keep_their_weights_in_fake_quant_form(data: SimpleNamespace, tmp_path: Path) -> None:
    snapshots = ExpertSnapshots()
    moe = _moe(freeze_experts=True)
    fast_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[snapshots]).fit(moe, data.train)
    assert all(torch.equal(a, b) for a, b in zip(snapshots.start, snapshots.end))
    assert moe.expert_stage == "converted" and all(r.quantized for r in moe.expert_records)


def test_resume_mid_phase_equals_the_uninterrupted_fit(
    tuned: SimpleNamespace, data: SimpleNamespace, tmp_path: Path
) -> None:
    pl.seed_everything(0)
    moe = _moe()
    fast_trainer(tmp_path, max_epochs=EPOCHS).fit(moe, data.train, ckpt_path=tuned.root / "epoch=0.ckpt")
    assert moe.expert_stage == "converted"
    with torch.no_grad():
        resumed = moe.eval()(data.x_test)
    assert torch.equal(resumed, tuned.predictions)
    ours, theirs = moe.state_dict(), tuned.moe.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoints_rebuild_without_the_experts(tuned: SimpleNamespace, data: SimpleNamespace) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = (
            load_moe(tuned.root / "final.ckpt"),
            MoELightningModule.load_from_checkpoint(tuned.root / "final.ckpt").eval(),
        )
    # Its int8 experts are what the tuned fit converted, not frozen experts `freeze_experts=False` asked to train.
    assert not [w for w in caught if "no expert is trainable" in str(w.message)]
    for loaded in rebuilt:
        assert loaded.expert_stage == "converted" and all(r.quantized for r in loaded.expert_records)
        with torch.no_grad():
            assert torch.equal(loaded(data.x_test), tuned.predictions)


def test_fake_quant_checkpoint_loads_and_converts(tuned: SimpleNamespace, data: SimpleNamespace) -> None:
    middle = tuned.root / "epoch=0.ckpt"
    checkpoint = torch.load(middle, weights_only=True)
    assert checkpoint["moe"]["expert_stage"] == "fake_quant"
    moe = load_moe(middle)
    assert moe.expert_stage == "fake_quant"
    with torch.no_grad():
        fake_quant = moe(data.x_test)
    moe.convert_experts_()
    assert moe.expert_stage == "converted" and all(r.quantized for r in moe.expert_records)
    with torch.no_grad():
        int8 = moe(data.x_test)
    assert float((int8.argmax(1) == fake_quant.argmax(1)).float().mean()) >= 0.95
    with pytest.raises(RuntimeError, match="Expected fake-quant experts to convert"):
        moe.convert_experts_()


def test_test_from_a_fake_quant_checkpoint_runs_the_int8_moe(
    tuned: SimpleNamespace, data: SimpleNamespace, tmp_path: Path
) -> None:
    moe = _moe()
    loader = DataLoader(TensorDataset(data.x_test), batch_size=64)
    predicted = fast_trainer(tmp_path).predict(moe, loader, ckpt_path=tuned.root / f"epoch={EPOCHS - 1}.ckpt")
    assert moe.expert_stage == "converted"
    # The last epoch's checkpoint holds what fit converted at its end: the same int8 MoE.
    torch.testing.assert_close(torch.cat(predicted), tuned.predictions.exp())  # type: ignore[arg-type]


def test_a_converted_checkpoint_cannot_resume_fake_quant_training(
    tuned: SimpleNamespace, data: SimpleNamespace, tmp_path: Path
) -> None:
    trainer = fast_trainer(tmp_path, max_epochs=EPOCHS + 1)
    with pytest.raises(RuntimeError, match="converted to int8 when its fit ended"):
        trainer.fit(_moe(), data.train, ckpt_path=tuned.root / "final.ckpt")


def test_int8_experts_are_refused_before_training(
    tuned: SimpleNamespace, data: SimpleNamespace, tmp_path: Path
) -> None:
    int8 = [stored_program(record.data, record.name) for record in tuned.moe.expert_records]
    moe = MoELightningModule(int8, top_k=2, input_shape=SHAPE, quantize_experts="x86_pt2e")
    with pytest.raises(ValueError, match=r"fine-tunes fp32 experts in fake-quant form .* is int8 already"):
        fast_trainer(tmp_path, max_epochs=1).fit(moe, data.train)


@pytest.mark.parametrize("value", ["linear_int8", "int4", 3])
def test_unknown_backends_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="Expected `quantize_experts` to be None or one of"):
        MoELightningModule(_experts(), top_k=2, input_shape=SHAPE, quantize_experts=value)


def test_fake_quant_experts_are_not_exported_to_the_edge(tuned: SimpleNamespace, tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from lightning_hybridcomp.edge import export_executorch

    moe = load_moe(tuned.root / "epoch=0.ckpt")
    with pytest.raises(ValueError, match=r"fake-quant networks .* call `moe.convert_experts_\(\)` first"):
        export_executorch(moe, tmp_path / "moe.pte")
    assert not (tmp_path / "moe.pte").exists()


def _observed_ranges(moe: MoELightningModule) -> dict[str, Tensor]:
    return {
        f"{i}.{k}": v.clone()
        for i, expert in enumerate(moe.experts)
        for k, v in expert.state_dict().items()
        if k.endswith(("min_val", "max_val", "scale", "zero_point"))
    }


def test_oracle_targets_leave_the_fake_quant_ranges_alone(data: SimpleNamespace) -> None:
    moe = _moe(assignment_target="oracle")
    moe.setup("fit")
    assert moe.expert_stage == "fake_quant"
    moe.train()
    x, y = next(iter(data.train))
    for expert in moe.experts:
        expert(x)  # the training passes of a batch observe it
    before = _observed_ranges(moe)
    assert before
    targets = moe.assignment_targets(x, y, moe.route(x)[1])
    assert torch.equal(targets.sum(-1), torch.ones(len(y)))
    assert all(expert.training for expert in moe.experts)
    after = _observed_ranges(moe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    moe.experts[0](3 * x)  # a training pass observes, as before
    assert any(not torch.equal(before[k], v) for k, v in _observed_ranges(moe).items() if k.startswith("0."))


def test_tuned_experts_train_with_oracle_targets(data: SimpleNamespace, tmp_path: Path) -> None:
    pl.seed_everything(0)
    moe = _moe(assignment_target="oracle")
    fast_trainer(tmp_path, max_epochs=1, limit_train_batches=3).fit(moe, data.train)
    assert moe.expert_stage == "converted"
    assert moe.trainer.callback_metrics["moe/loss/assignment"] > 0
