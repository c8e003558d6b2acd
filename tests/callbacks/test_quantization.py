"""QuantizationAwareTraining: real Trainer runs on tiny models and the embedded digits.

The expensive runs (fits, exports, conversions) happen once in module-scoped fixtures and are checked by
several tests. Tolerances are stated where a figure is compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.fx import GraphModule

from lightning_hybridcomp.artifacts import load_artifact
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.models import build_backbone
from lightning_hybridcomp.profiling import count_macs, serialized_size
from tests._helpers import ClassifierSteps, fast_trainer, ready_digits, relative_distance, run_ddp_script

IMAGE = 8
# QAT int8 accuracy may trail fp32 on the 270-image test split by at most this much (8 images).
ACCURACY_BOUND = 0.03
# int8 logits vs the fake-quant logits of the same weights: relative L2 distance and argmax agreement.
LOGIT_REL_TOL = 0.08
MIN_AGREEMENT = 0.97


# --------------------------------------------------------------------------- models written for the tests


class DigitsCNN(ClassifierSteps):
    """A classifier around one backbone; steps call ``self(x)``."""

    def __init__(self, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", 10, 1, width=width)
        self.lr = lr

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TwoPartCNN(DigitsCNN):
    """Two trainable children used by ``forward`` directly: QAT traces the LightningModule's own forward."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr = 3e-3
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TokenMLP(DigitsCNN):
    """A Linear/Embedding network: pixel intensities become tokens of an embedding, then an MLP."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr = 3e-3
        self.register_buffer("edges", torch.linspace(-1.5, 2.5, 15))
        self.embed = nn.Embedding(16, 8)
        self.mlp = nn.Sequential(nn.Linear(IMAGE * IMAGE * 8, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.bucketize(x.flatten(1), self.edges)
        return self.mlp(self.embed(tokens).flatten(1))


class DataDependent(DigitsCNN):
    """A network torch.export cannot trace: Python control flow on tensor values."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.net = _BranchingNet()


class _BranchingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent branch
            h = h * 2
        return self.fc(h.flatten(1))


class StageProbe(Callback):
    """Records what the fake-quant network does during the epoch its observers or BN are frozen."""

    def __init__(self, epoch: int, network: str = "net") -> None:
        self.epoch = epoch
        self.network = network
        self.bn_before: Tensor | None = None
        self.bn_after: Tensor | None = None
        self.observers_enabled: list[bool] = []

    def _bn_mean(self, pl_module: pl.LightningModule) -> Tensor:
        network = pl_module.get_submodule(self.network)
        return next(b for n, b in network.named_buffers() if n.endswith("running_mean")).clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.current_epoch != self.epoch:
            return
        from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

        if self.bn_before is None:
            self.bn_before = self._bn_mean(pl_module)
        self.bn_after = self._bn_mean(pl_module)
        self.observers_enabled += [
            bool(m.observer_enabled[0])
            for m in pl_module.get_submodule(self.network).modules()
            if isinstance(m, FakeQuantizeBase)
        ]


def _trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return fast_trainer(tmp_path, **{"num_sanity_val_steps": 0, **kwargs})


def _test_tensors(dm: DigitsDataModule) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*[(x, y) for x, y in dm.test_dataloader()])
    return torch.cat(xs), torch.cat(ys)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _int8_tensors(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors if t.dtype == torch.int8)


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return ready_digits(IMAGE)


@pytest.fixture(scope="module")
def qat_run(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """fp32 reference and a QAT run (fake quant from epoch 1, observers frozen at epoch 3)."""
    root = tmp_path_factory.mktemp("qat_run")
    x_test, y_test = _test_tensors(digits)

    pl.seed_everything(0)
    fp32 = DigitsCNN()
    _trainer(root / "fp32", max_epochs=4).fit(fp32, digits)
    fp32_accuracy = _accuracy(fp32, x_test, y_test)

    pl.seed_everything(0)
    model = DigitsCNN()
    fp32_state_bytes = serialized_size(model.net)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=3)
    probe = StageProbe(epoch=3)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(
        root / "qat", max_epochs=4, callbacks=[qat, probe, checkpoints], enable_checkpointing=True
    )
    trainer.fit(model, digits)
    fit_metrics = dict(trainer.callback_metrics)
    test_metrics = trainer.test(model, digits, verbose=False)[0]
    trainer.save_checkpoint(root / "ckpt" / "after.ckpt")
    with torch.no_grad():
        int8_logits = model.eval()(x_test)
    return SimpleNamespace(
        root=root,
        model=model,
        qat=qat,
        probe=probe,
        ckpt=root / "ckpt",
        fit_metrics=fit_metrics,
        test_metrics=test_metrics,
        fp32_accuracy=fp32_accuracy,
        fp32_state_bytes=fp32_state_bytes,
        x_test=x_test,
        y_test=y_test,
        int8_logits=int8_logits,
    )


# --------------------------------------------------------------------------- conversion and accuracy


def test_fit_ends_in_a_real_int8_model(qat_run: SimpleNamespace) -> None:
    net = qat_run.model.net
    assert qat_run.qat.stage == "converted"
    assert isinstance(net, GraphModule)
    targets = {str(n.target) for n in net.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.dequantize_per_channel.default" in targets
    # Every conv/linear weight is stored as int8 and the fp32 originals were stripped.
    weights = [t for name, t in net.state_dict().items() if t.dim() >= 2]
    assert weights and all(t.dtype == torch.int8 for t in weights)
    assert _int8_tensors(net) == sum(t.numel() for t in weights)
    assert not any(p.requires_grad for p in net.parameters())


def test_int8_accuracy_is_close_to_fp32(qat_run: SimpleNamespace) -> None:
    int8_accuracy = float((qat_run.int8_logits.argmax(1) == qat_run.y_test).float().mean())
    assert qat_run.test_metrics["test_acc"] == pytest.approx(int8_accuracy, abs=1e-6)
    assert qat_run.fp32_accuracy > 0.9
    assert int8_accuracy >= qat_run.fp32_accuracy - ACCURACY_BOUND


def test_int8_predictions_match_the_fake_quant_model(qat_run: SimpleNamespace, tmp_path: Path) -> None:
    # The last epoch's checkpoint holds the exact weights and observer ranges that were converted.
    model = DigitsCNN()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(qat_run.x_test), batch_size=512)
    batches = _trainer(tmp_path, callbacks=[qat]).predict(
        model, loader, ckpt_path=qat_run.ckpt / "epoch=3.ckpt"
    )
    fake_quant_logits = torch.cat(batches)  # type: ignore[arg-type]
    assert qat.stage == "fake_quant"
    agreement = float((fake_quant_logits.argmax(1) == qat_run.int8_logits.argmax(1)).float().mean())
    assert agreement >= MIN_AGREEMENT
    assert relative_distance(qat_run.int8_logits, fake_quant_logits) < LOGIT_REL_TOL


def test_logged_figures(qat_run: SimpleNamespace) -> None:
    metrics = qat_run.fit_metrics
    assert float(metrics["qat/stage"]) == 1.0  # last epoch trained with fake quantization
    assert 0.0 < float(metrics["qat/fake_quant_error"]) < 0.5
    summary = qat_run.qat.summary
    assert summary is not None and summary.dtype == "int8"
    assert float(metrics["qat/size_bytes"]) == summary.size_bytes  # written at the end of fit
    assert qat_run.test_metrics["qat/stage"] == 2.0
    assert qat_run.test_metrics["qat/size_bytes"] == summary.size_bytes
    # MACs of the int8 program equal the fp32 network's (BN is folded, convs and the head remain).
    fp32_macs = count_macs(DigitsCNN().net.eval(), qat_run.x_test[:1])
    assert qat_run.test_metrics["qat/macs"] == summary.macs == fp32_macs


def test_observers_freeze(qat_run: SimpleNamespace) -> None:
    probe = qat_run.probe
    assert probe.observers_enabled and not any(probe.observers_enabled)
    assert probe.bn_before is not None and not torch.equal(probe.bn_before, probe.bn_after)  # BN still learns


def test_artifact_from_the_callback(qat_run: SimpleNamespace) -> None:
    path = qat_run.root / "model.pt2"
    metadata = qat_run.qat.save_artifact(path)
    assert metadata.steps == ("qat:x86_pt2e",) and metadata.architecture == "SmallCNN"
    # Graph overhead (~10 KB) dominates this small net; the 0.35x bound is checked in test_artifacts.py.
    assert metadata.size_bytes == path.stat().st_size <= 0.5 * qat_run.fp32_state_bytes
    loaded = load_artifact(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(qat_run.x_test[:37]), qat_run.int8_logits[:37])


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_load_with_weights_only(qat_run: SimpleNamespace) -> None:
    stages = {}
    for name in ("epoch=0", "epoch=2", "after"):
        checkpoint = torch.load(qat_run.ckpt / f"{name}.ckpt", weights_only=True)
        state = next(
            v for k, v in checkpoint["callbacks"].items() if k.startswith("QuantizationAwareTraining")
        )
        stages[name] = state["stage"]
    assert stages == {"epoch=0": "float", "epoch=2": "fake_quant", "after": "converted"}


@pytest.mark.parametrize("name", ["epoch=0", "epoch=2", "after"])
def test_test_from_checkpoint_before_during_and_after_qat(
    qat_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path, name: str
) -> None:
    model = DigitsCNN()  # fresh fp32 structure: the callback rebuilds the checkpoint's
    qat = QuantizationAwareTraining(start_epoch=1)
    result = _trainer(tmp_path, callbacks=[qat]).test(
        model, digits, ckpt_path=qat_run.ckpt / f"{name}.ckpt", verbose=False
    )
    accuracy = result[0]["test_acc"]
    if name == "epoch=0":
        assert qat.stage == "float"
        reference = DigitsCNN()
        checkpoint = torch.load(qat_run.ckpt / "epoch=0.ckpt", weights_only=True)
        reference.load_state_dict(checkpoint["state_dict"])
        assert accuracy == pytest.approx(_accuracy(reference, qat_run.x_test, qat_run.y_test), abs=1e-6)
    elif name == "epoch=2":
        # A fake-quant checkpoint is evaluated as the int8 model fit would have produced from it.
        assert qat.stage == "converted" and _int8_tensors(model.net) > 0
        assert accuracy >= qat_run.fp32_accuracy - 2 * ACCURACY_BOUND
    else:
        assert qat.stage == "converted"
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(qat_run.x_test), qat_run.int8_logits)
        assert accuracy == pytest.approx(qat_run.test_metrics["test_acc"], abs=1e-6)
        assert result[0]["qat/size_bytes"] == qat_run.test_metrics["qat/size_bytes"]


def test_resume_mid_qat_continues_and_converts(
    qat_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path
) -> None:
    pl.seed_everything(1)
    model = DigitsCNN()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=3)
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=[qat])
    trainer.fit(model, digits, ckpt_path=qat_run.ckpt / "epoch=2.ckpt")
    assert qat.stage == "converted"
    assert qat._started_at == 1  # fake quantization was restored, not inserted a second time
    resumed_accuracy = _accuracy(model, qat_run.x_test, qat_run.y_test)
    uninterrupted = qat_run.test_metrics["test_acc"]
    assert abs(resumed_accuracy - uninterrupted) <= ACCURACY_BOUND


def test_fit_cannot_resume_from_a_converted_checkpoint(
    qat_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path
) -> None:
    trainer = _trainer(tmp_path, max_epochs=5, callbacks=[QuantizationAwareTraining(start_epoch=1)])
    with pytest.raises(RuntimeError, match="converted int8 model, which cannot be trained"):
        trainer.fit(DigitsCNN(), digits, ckpt_path=qat_run.ckpt / "after.ckpt")


def test_converted_model_cannot_be_fitted_again(
    qat_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path
) -> None:
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[qat_run.qat])
    with pytest.raises(RuntimeError, match="already converted to int8"):
        trainer.fit(qat_run.model, digits)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"backend": "linear_int8"}, "quantized with backend 'linear_int8'"),
        ({"network_name": "other"}, "quantized network 'other'"),
        ({"stage": "half"}, "unknown QAT stage 'half'"),
        ({"example_input_shape": None}, "no example input shape"),
        ({"qparams": {"no_such_node": {"1": 0.5}}}, "does not match the rebuilt one"),
    ],
)
def test_inconsistent_checkpoint_state_is_refused(
    qat_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    checkpoint = torch.load(qat_run.ckpt / "after.ckpt", weights_only=True)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("QuantizationAwareTraining"))
    checkpoint["callbacks"][key].update(change)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match=match):
        _trainer(tmp_path, callbacks=[QuantizationAwareTraining()]).test(DigitsCNN(), digits, ckpt_path=path)


def test_save_artifact_before_conversion_is_refused() -> None:
    with pytest.raises(RuntimeError, match="converted to int8 before saving"):
        QuantizationAwareTraining().save_artifact("never.pt2")


# --------------------------------------------------------------------------- other networks and backends


def test_whole_forward_is_hosted_and_checkpoints_reload(digits: DigitsDataModule, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TwoPartCNN()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2)
    probe = StageProbe(epoch=2, network="qat_network")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    callbacks = [qat, probe, checkpoints]
    trainer = _trainer(
        tmp_path, max_epochs=3, limit_train_batches=6, callbacks=callbacks, enable_checkpointing=True
    )
    trainer.fit(model, digits)
    assert isinstance(model.qat_network, GraphModule) and _int8_tensors(model.qat_network) > 0
    # Frozen BatchNorm statistics do not move while the epoch trains; the observers still learn.
    assert probe.bn_before is not None and torch.equal(probe.bn_before, probe.bn_after)
    assert probe.observers_enabled and all(probe.observers_enabled)
    x, y = _test_tensors(digits)
    with torch.no_grad():
        hosted = model.eval()(x)
        torch.testing.assert_close(hosted, model.qat_network(x))
    assert trainer.test(model, digits, verbose=False)[0]["test_acc"] == pytest.approx(
        _accuracy(model, x, y), abs=1e-6
    )

    fresh = TwoPartCNN()
    fresh_qat = QuantizationAwareTraining(start_epoch=1, convert_on_fit_end=False)
    _trainer(tmp_path, callbacks=[fresh_qat]).test(
        fresh, digits, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt", verbose=False
    )
    assert (
        fresh_qat.stage == "fake_quant"
        and "qat_network.activation_post_process_0.scale" in fresh.state_dict()
    )


@pytest.fixture(scope="module")
def linear_run(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("linear_run")
    x_test, y_test = _test_tensors(digits)
    pl.seed_everything(0)
    fp32 = TokenMLP()
    _trainer(root, max_epochs=3).fit(fp32, digits)
    pl.seed_everything(0)
    model = TokenMLP()
    qat = QuantizationAwareTraining(backend="linear_int8", start_epoch=1, convert_on_fit_end=False)
    trainer = _trainer(root, max_epochs=3, callbacks=[qat])
    trainer.fit(model, digits)
    with torch.no_grad():
        fake_quant_logits = model.eval()(x_test)
    qat.convert_on_fit_end = True  # evaluation outside fit now converts the fake-quant model
    trainer.test(model, digits, verbose=False)
    with torch.no_grad():
        int8_logits = model.eval()(x_test)
    trainer.save_checkpoint(root / "after.ckpt")
    return SimpleNamespace(
        root=root,
        model=model,
        qat=qat,
        fp32_accuracy=_accuracy(fp32, x_test, y_test),
        fake_quant_logits=fake_quant_logits,
        int8_logits=int8_logits,
        x_test=x_test,
        y_test=y_test,
    )


def test_linear_int8_backend_converts_linear_and_embedding(linear_run: SimpleNamespace) -> None:
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor

    model = linear_run.model
    assert linear_run.qat.stage == "converted"
    assert all(isinstance(m.weight, Int8Tensor) for m in model.mlp if isinstance(m, nn.Linear))
    assert isinstance(model.embed.weight, IntxUnpackedToInt8Tensor)
    agreement = float(
        (linear_run.int8_logits.argmax(1) == linear_run.fake_quant_logits.argmax(1)).float().mean()
    )
    assert agreement >= MIN_AGREEMENT
    assert relative_distance(linear_run.int8_logits, linear_run.fake_quant_logits) < LOGIT_REL_TOL
    int8_accuracy = float((linear_run.int8_logits.argmax(1) == linear_run.y_test).float().mean())
    assert int8_accuracy >= linear_run.fp32_accuracy - ACCURACY_BOUND


def test_linear_int8_artifact_and_checkpoint(
    linear_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path
) -> None:
    metadata = linear_run.qat.save_artifact(tmp_path / "mlp.pt2")
    assert metadata.dtype == "int8" and metadata.steps == ("qat:linear_int8",)
    loaded = load_artifact(tmp_path / "mlp.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(linear_run.x_test), linear_run.int8_logits)
    # torchao's int8 tensors are stored as plain inner tensors: readable with weights_only and by Lightning.
    checkpoint = torch.load(linear_run.root / "after.ckpt", weights_only=True)
    assert (
        "mlp.0.weight::qdata" in checkpoint["state_dict"] and "mlp.0.weight" not in checkpoint["state_dict"]
    )
    model = TokenMLP()
    qat = QuantizationAwareTraining(backend="linear_int8")
    _trainer(tmp_path, callbacks=[qat]).test(
        model, digits, ckpt_path=linear_run.root / "after.ckpt", verbose=False
    )
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(linear_run.x_test), linear_run.int8_logits)


def test_submodule_by_name_with_example_shape(digits: DigitsDataModule, tmp_path: Path) -> None:
    model = TokenMLP()
    qat = QuantizationAwareTraining(backend="linear_int8", module="mlp.2", example_input_shape=[2, 128])
    _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[qat]).fit(
        model, digits
    )
    from torchao.quantization import Int8Tensor

    assert isinstance(model.mlp[2].weight, Int8Tensor)  # the named layer, even a root Linear, is int8
    assert type(model.mlp[0].weight) is nn.Parameter and type(model.embed.weight) is nn.Parameter


def test_start_step_inserts_mid_epoch(digits: DigitsDataModule, tmp_path: Path) -> None:
    qat = QuantizationAwareTraining(backend="linear_int8", start_step=3)
    _fit(TokenMLP(), [qat], tmp_path, digits, max_epochs=3)  # two batches per epoch
    assert qat._started_at == 1 and qat.stage == "converted"


class TokenInput(DigitsCNN):
    """Integer token ids in, as in text models: the traced example keeps the dtype."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr = 1e-2
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).mean(1))


def test_integer_token_inputs(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 20, (32, 6), generator=g), torch.randint(0, 10, (32,), generator=g)
    )
    qat = QuantizationAwareTraining(backend="linear_int8")
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[qat])
    trainer.fit(TokenInput(), torch.utils.data.DataLoader(data, batch_size=8))
    metadata = qat.save_artifact(tmp_path / "tokens.pt2")  # default example: int64 zeros of the traced shape
    assert metadata.input_shape == (6,) and metadata.dtype == "int8"
    tokens = torch.randint(0, 20, (3, 6), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            load_artifact(tmp_path / "tokens.pt2").module(tokens), qat.quantized_network(tokens)
        )


# --------------------------------------------------------------------------- with pruning


@pytest.fixture(scope="module")
def pruned_run(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from lightning_hybridcomp.callbacks.pruning import StructuredPruning

    root = tmp_path_factory.mktemp("pruned_run")
    pl.seed_everything(0)
    model = DigitsCNN(width=16)
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, verbose=False)
    qat = QuantizationAwareTraining(start_epoch=0)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(root, max_epochs=3, callbacks=[pruning, qat, checkpoints], enable_checkpointing=True)
    with pytest.warns(UserWarning, match="waits and starts at epoch 1"):
        trainer.fit(model, digits)
    x_test, y_test = _test_tensors(digits)
    return SimpleNamespace(root=root, model=model, qat=qat, pruning=pruning, x_test=x_test, y_test=y_test)


def test_pruning_then_qat_in_one_fit(pruned_run: SimpleNamespace) -> None:
    qat = pruned_run.qat
    assert qat.stage == "converted" and qat._started_at == 1  # after the pruning step at epoch 1
    dense_macs = count_macs(DigitsCNN(width=16).net.eval(), pruned_run.x_test[:1])
    assert qat.summary is not None and qat.summary.macs < 0.5 * dense_macs
    metadata = qat.save_artifact(pruned_run.root / "pruned.pt2")
    assert metadata.steps == ("prune:l1:0.5", "qat:x86_pt2e") and metadata.dtype == "int8"
    assert _accuracy(pruned_run.model, pruned_run.x_test, pruned_run.y_test) > 0.8


@pytest.mark.parametrize("qat_first", [True, False])
def test_pruned_qat_checkpoint_reloads_in_any_callback_order(
    pruned_run: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path, qat_first: bool
) -> None:
    from lightning_hybridcomp.callbacks.pruning import StructuredPruning

    model = DigitsCNN(width=16)  # unpruned: both structures are rebuilt from the checkpoint
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, verbose=False)
    qat = QuantizationAwareTraining(convert_on_fit_end=False, verbose=False)
    callbacks: list[Callback] = [qat, pruning] if qat_first else [pruning, qat]
    result = _trainer(tmp_path, callbacks=callbacks).test(
        model, digits, ckpt_path=pruned_run.root / "ckpt" / "epoch=2.ckpt", verbose=False
    )
    assert qat.stage == "fake_quant"
    assert count_macs(model.net.eval(), pruned_run.x_test[:1]) == pruned_run.qat.summary.macs
    assert result[0]["test_acc"] > 0.8


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86_pt2e", "xnnpack"])
def test_ddp_two_processes_convert_to_the_same_int8_model(tmp_path: Path, backend: str) -> None:
    proc = run_ddp_script(
        Path(__file__).with_name("_ddp_qat.py"),
        tmp_path,
        timeout=600,
        env={"HYBRIDCOMP_QAT_BACKEND": backend},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["stage"] == "converted" and r["int8_elements"] > 0 for r in ranks)
    assert ranks[0]["state_hash"] == ranks[1]["state_hash"]
    assert ranks[0]["logits"] == ranks[1]["logits"]
    assert all(all(r["optimizer_covers_network"]) for r in ranks)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"backend": "int4"},
            ValueError,
            r"Expected `backend` to be one of \('x86_pt2e', 'linear_int8', 'xnnpack'\)",
        ),
        ({"backend": "XNNPACK", "start_epoch": 2, "freeze_observers_epoch": 1}, ValueError, "to be after"),
        ({"backend": "xnnpack", "example_input_shape": [0]}, ValueError, "list of positive integers"),
        ({"backend": "fbgemm"}, ValueError, "deprecated; 'x86_pt2e' is their PT2E successor"),
        ({"backend": 3}, TypeError, "Expected `backend` to be a string"),
        ({"module": ""}, TypeError, "Expected `module` to be None or the fully qualified name"),
        ({"start_epoch": -1}, ValueError, "Expected `start_epoch` to be a non-negative integer, got -1"),
        ({"start_epoch": 1.5}, ValueError, "Expected `start_epoch` to be a non-negative integer"),
        ({"start_step": -2}, ValueError, "Expected `start_step` to be a non-negative integer or None"),
        ({"start_epoch": 2, "start_step": 10}, ValueError, "only one of `start_epoch` and `start_step`"),
        ({"freeze_bn_epoch": True}, ValueError, "Expected `freeze_bn_epoch`"),
        ({"start_epoch": 2, "freeze_observers_epoch": 2}, ValueError, "`freeze_observers_epoch` to be after"),
        ({"backend": "linear_int8", "freeze_observers_epoch": 3}, ValueError, "no observers to freeze"),
        ({"example_input_shape": [1, 0, 8]}, ValueError, "list of positive integers"),
        ({"convert_on_fit_end": "yes"}, TypeError, "Expected `convert_on_fit_end` to be a bool"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**kwargs)


def _fit(
    model: pl.LightningModule, callbacks: list[Callback], tmp_path: Path, digits: DigitsDataModule, **kw: Any
) -> pl.Trainer:
    kwargs: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "callbacks": callbacks,
    }
    kwargs.update(kw)
    trainer = _trainer(tmp_path, **kwargs)
    trainer.fit(model, digits)
    return trainer


def test_unknown_submodule_name(digits: DigitsDataModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected `module` to be the fully qualified name of a submodule"):
        _fit(DigitsCNN(width=4), [QuantizationAwareTraining(module="net.nope")], tmp_path, digits)


def test_submodule_without_example_shape(digits: DigitsDataModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `example_input_shape` for module 'net\.classifier'"):
        _fit(DigitsCNN(width=4), [QuantizationAwareTraining(module="net.classifier")], tmp_path, digits)


def test_start_epoch_beyond_max_epochs(digits: DigitsDataModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `start_epoch` to be below `max_epochs`=1, got 1"):
        _fit(DigitsCNN(width=4), [QuantizationAwareTraining(start_epoch=1)], tmp_path, digits)


def test_start_step_beyond_max_steps(digits: DigitsDataModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected `start_step` to be below `max_steps`=2, got 5"):
        _fit(DigitsCNN(width=4), [QuantizationAwareTraining(start_step=5)], tmp_path, digits, max_steps=2)

    # Without max_steps, the fit's length in steps is known once the dataloader is: refused before the first
    # batch, not warned about after training.
    class NoTraining(DigitsCNN):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            raise AssertionError("training started")

    with pytest.raises(ValueError, match=r"`start_step` to be below the fit's 2 optimizer steps .* got 2"):
        _fit(NoTraining(width=4), [QuantizationAwareTraining(start_step=2)], tmp_path, digits)

    # A dataloader of unknown length: Lightning cannot count the steps, so the start is not refused.
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(zip(torch.randn(16, 1, IMAGE, IMAGE), torch.randint(0, 10, (16,))))

    qat = QuantizationAwareTraining(start_step=1, convert_on_fit_end=False)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=8)
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[qat]).fit(DigitsCNN(width=4), stream)
    assert qat.stage == "fake_quant"
    with pytest.raises(
        ValueError, match=r"below the fit's 1 optimizer steps .*accumulate_grad_batches=2\), got 1"
    ):
        _fit(
            NoTraining(width=4),
            [QuantizationAwareTraining(start_step=1)],
            tmp_path,
            digits,
            accumulate_grad_batches=2,
        )


class _FakePruning(Callback):
    """A user's own structural callback (the StructuralCompression contract) whose last step falls late."""

    network = ""
    last_step_epoch = 3
    finished = False
    step_label = "prune:fake"

    def restore_structure_(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any = None
    ) -> None:
        pass

    def preview_network(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
        return None


def test_start_after_pruning_beyond_max_epochs(digits: DigitsDataModule, tmp_path: Path) -> None:
    assert isinstance(_FakePruning(), StructuralCompression)
    with pytest.raises(ValueError, match="would start at epoch 3"):
        _fit(
            DigitsCNN(width=4), [_FakePruning(), QuantizationAwareTraining()], tmp_path, digits, max_epochs=2
        )


def test_network_that_cannot_be_exported(digits: DigitsDataModule, tmp_path: Path) -> None:
    model = DataDependent()
    with pytest.raises(ValueError, match=r"Could not export _BranchingNet with `torch.export`.*Hint:"):
        _fit(model, [QuantizationAwareTraining()], tmp_path, digits)
    assert isinstance(model.net, _BranchingNet)  # nothing half-converted


def test_linear_backend_on_a_network_without_linear_layers(digits: DigitsDataModule, tmp_path: Path) -> None:
    model = DigitsCNN(width=4)
    qat = QuantizationAwareTraining(
        backend="linear_int8", module="net.features", example_input_shape=[2, 1, 8, 8]
    )
    with pytest.raises(
        ValueError, match=r"to contain nn\.Linear or nn\.Embedding layers for backend 'linear_int8'"
    ):
        _fit(model, [qat], tmp_path, digits)
    assert qat.stage == "float"


def test_spawning_strategies_are_refused(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not spawn worker processes"):
        QuantizationAwareTraining().setup(trainer, DigitsCNN(width=4), "fit")


def test_batches_of_other_sizes_work(qat_run: SimpleNamespace) -> None:
    net = qat_run.model.net.eval()
    with torch.no_grad():
        for size in (1, 5, 300):
            assert net(torch.randn(size, 1, IMAGE, IMAGE)).shape == (size, 10)
