"""ExecuTorch deployment: real lowering to XNNPACK, real ``.pte`` files, the real runtime, on tiny models.

Lowering costs seconds even for a tiny network, so each program is written once in a module-scoped fixture
and checked by several tests. Tolerances are stated where outputs are compared.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_hybridcomp import _executorch
from lightning_hybridcomp.artifacts import compile_artifact
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.edge import (
    EdgeMoE,
    UndelegatedOperatorsError,
    export_executorch,
    load_executorch,
    xnnpack_ptq,
)
from lightning_hybridcomp.edge_programs import sidecar_path
from lightning_hybridcomp.models import build_backbone
from lightning_hybridcomp.moe import MoELightningModule
from lightning_hybridcomp.profiling import count_macs
from tests._helpers import ClassifierSteps, fast_trainer, ready_digits
from tests._reference import reference_macs

IMAGE = 8
MAX_BATCH = 4
# fp32 .pte logits vs eager: XNNPACK's kernels reorder the float sums.
FP32_ATOL = 1e-4
# int8 .pte logits vs the PT2E-converted model (same int8 scheme, XNNPACK's requantization rounding): max |diff|
# 0.0046 and argmax agreement 1.0 measured on 8 inputs of this kind of model; bounds required here.
INT8_ATOL = 0.1
MIN_AGREEMENT = 0.99


class EdgeCNN(ClassifierSteps):
    """The user's LightningModule for the pruned + xnnpack-QAT run: ``self.net`` is a small CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", 10, 1, width=8)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return ready_digits(IMAGE)


@pytest.fixture(scope="module")
def test_images(digits: DigitsDataModule) -> Tensor:
    return torch.cat([x for x, _ in digits.test_dataloader()])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 10, 1, width=4).eval()
    path = tmp_path_factory.mktemp("fp32") / "net.pte"
    metadata = export_executorch(
        net, path, example_inputs=torch.randn(1, 1, IMAGE, IMAGE), max_batch=MAX_BATCH
    )
    return SimpleNamespace(net=net, path=path, metadata=metadata)


@pytest.fixture(scope="module")
def int8(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Pruning and xnnpack QAT in one fit, the int8 artifact, and its ``.pte`` exported from the artifact."""
    root = tmp_path_factory.mktemp("int8")
    pl.seed_everything(0)
    model = EdgeCNN()
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=0, verbose=False)
    qat = QuantizationAwareTraining(backend="xnnpack", start_epoch=1, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
    trainer = fast_trainer(
        root,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[pruning, qat, checkpoints],
        enable_checkpointing=True,
    )
    trainer.fit(model, digits)
    qat.save_artifact(root / "model.pt2")
    metadata = export_executorch(root / "model.pt2", root / "model.pte", max_batch=64)
    return SimpleNamespace(root=root, model=model.eval(), qat=qat, metadata=metadata, path=root / "model.pte")


# --------------------------------------------------------------------------- round trips


def test_fp32_program_matches_eager_and_is_deterministic(fp32: SimpleNamespace) -> None:
    program = load_executorch(fp32.path)
    for batch in range(1, MAX_BATCH + 1):
        x = torch.randn(batch, 1, IMAGE, IMAGE)
        with torch.no_grad():
            reference = fp32.net(x)
        out = program(x)
        torch.testing.assert_close(out, reference, atol=FP32_ATOL, rtol=0)
        assert torch.equal(program(x), out)  # deployed programs are deterministic, bit for bit
    x = torch.randn(2, 1, IMAGE, IMAGE)
    first = program(x)
    program(torch.randn(2, 1, IMAGE, IMAGE))
    assert torch.equal(program(x), first)  # an output is not overwritten by the next call


def test_side_car_describes_the_program(fp32: SimpleNamespace) -> None:
    meta = fp32.metadata
    side = json.loads(sidecar_path(fp32.path).read_text())
    assert side["size_bytes"] == fp32.path.stat().st_size == meta.size_bytes
    assert meta.input_shape == (1, IMAGE, IMAGE) and meta.num_classes == 10 and meta.max_batch == MAX_BATCH
    assert meta.dtype == "float32" and meta.quantizer is None and meta.undelegated == {}
    sample = torch.randn(1, 1, IMAGE, IMAGE)
    assert meta.macs == count_macs(fp32.net, sample) == reference_macs(fp32.net, sample)
    assert meta.params == sum(p.numel() for p in fp32.net.parameters())
    assert meta.methods == ("forward",) and meta.kind == "classifier"


def test_pruned_xnnpack_qat_program_matches_the_converted_model(
    int8: SimpleNamespace, test_images: Tensor
) -> None:
    meta = int8.metadata
    assert int8.qat.stage == "converted"
    assert meta.dtype == "int8" and meta.quantizer == "XNNPACKQuantizer"
    assert meta.steps == ("prune:l1:0.5", "qat:xnnpack") and meta.undelegated == {}
    dense = count_macs(build_backbone("small_cnn", 10, 1, width=8).eval(), test_images[:1])
    assert meta.macs < 0.5 * dense
    program = load_executorch(int8.path)
    with torch.no_grad():
        reference = int8.model(test_images)
    out = torch.cat([program(chunk) for chunk in test_images.split(program.max_batch)])
    agreement = float((out.argmax(1) == reference.argmax(1)).float().mean())
    assert agreement >= MIN_AGREEMENT
    torch.testing.assert_close(out, reference, atol=INT8_ATOL, rtol=0)
    assert torch.equal(program(test_images[:1]), program(test_images[:1]))


@pytest.mark.parametrize("sizes", [(16, 17), (12, 16), (24, 32), (20, 32, 5, 64)])
def test_int8_program_is_right_at_every_batch_whatever_ran_before(
    int8: SimpleNamespace, test_images: Tensor, sizes: tuple[int, ...]
) -> None:
    # XNNPACK's int8 kernels in ExecuTorch 1.5.1 gave logits off by 15-20 when a method first run at a
    # batch of about 12 or more was then called at a larger one; the loader sizes every method for its
    # largest batch first. A freshly loaded program, each sequence from its first call.
    program = load_executorch(int8.path)
    with torch.no_grad():
        for n in sizes:
            torch.testing.assert_close(
                program(test_images[:n]), int8.model(test_images[:n]), atol=INT8_ATOL, rtol=0
            )


def test_inductor_refuses_xnnpack_int8_and_the_moe_keeps_such_experts_eager(
    int8: SimpleNamespace, fp32: SimpleNamespace, test_images: Tensor
) -> None:
    # Inductor's x86 int8 kernels take uint8 activations; XNNPACK's scheme quantizes them to int8.
    with pytest.raises(ValueError, match=r"signed int8 .* inductor's x86 int8 kernels cannot run"):
        compile_artifact(int8.model.net)
    moe = MoELightningModule([int8.root / "model.pt2", fp32.net], top_k=2, input_shape=[1, IMAGE, IMAGE])
    moe.eval().compile_experts_()
    assert [r.compiled is not None for r in moe.expert_records] == [False, True]
    with torch.no_grad():
        assert moe(test_images[:8]).shape == (8, 10)
    # A gate on that expert's features holds its int8 graph: it stays eager too, and routes as uncompiled.
    for gate, compiled in (("expert:0", False), ("expert:1", True)):
        moe = MoELightningModule(
            [int8.root / "model.pt2", fp32.net], top_k=1, input_shape=[1, IMAGE, IMAGE], gate=gate
        ).eval()
        with torch.no_grad():
            eager = moe(test_images[:8])
            moe.compile_experts_()
            assert (moe._compiled_gate is not None) == compiled
            torch.testing.assert_close(moe(test_images[:8]), eager)


def test_xnnpack_checkpoint_rebuilds_for_predict(
    int8: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path
) -> None:
    # The same checkpoint guarantees as x86_pt2e: a converted checkpoint predicts as the converted model.
    model = EdgeCNN()
    callbacks = [
        StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=0, verbose=False),
        QuantizationAwareTraining(backend="xnnpack", start_epoch=1, verbose=False),
    ]
    x = torch.cat([x for x, _ in digits.test_dataloader()])[:64]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    predicted = fast_trainer(tmp_path, callbacks=callbacks).predict(
        model, loader, ckpt_path=int8.root / "epoch=1.ckpt"
    )
    with torch.no_grad():
        expected = int8.model(x)
    assert callbacks[1].stage == "converted"  # type: ignore[attr-defined]
    torch.testing.assert_close(torch.cat(predicted), expected)  # type: ignore[arg-type]


def _edge_callbacks() -> list[Any]:
    return [
        StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=0, verbose=False),
        QuantizationAwareTraining(backend="xnnpack", start_epoch=1, verbose=False),
    ]


@pytest.mark.parametrize(("name", "stage"), [("epoch=0", "float"), ("epoch=1", "fake_quant")])
def test_xnnpack_checkpoints_before_and_during_qat_predict_and_resume(
    int8: SimpleNamespace, digits: DigitsDataModule, tmp_path: Path, name: str, stage: str
) -> None:
    # The x86_pt2e guarantees hold for xnnpack: predict from a checkpoint of any stage, resume mid-QAT.
    checkpoint = torch.load(int8.root / f"{name}.ckpt", weights_only=True)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("QuantizationAwareTraining"))
    assert state["stage"] == stage
    callbacks = _edge_callbacks()
    images = torch.cat([x for x, _ in digits.test_dataloader()])[:32]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=32)
    predicted = fast_trainer(tmp_path / "predict", callbacks=callbacks).predict(
        EdgeCNN(), loader, ckpt_path=int8.root / f"{name}.ckpt"
    )
    assert callbacks[1].stage == ("float" if stage == "float" else "converted")
    assert torch.cat(predicted).shape == (32, 10)  # type: ignore[arg-type]
    if stage == "float":
        return  # resuming before QAT is a fit that inserts it, as every fresh fit does
    callbacks = _edge_callbacks()
    model = EdgeCNN()
    flags = {"limit_train_batches": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0}
    trainer = fast_trainer(tmp_path / "fit", max_epochs=3, callbacks=callbacks, **flags)
    trainer.fit(model, digits, ckpt_path=int8.root / f"{name}.ckpt")
    assert callbacks[1].stage == "converted" and callbacks[1]._started_at == 1  # type: ignore[attr-defined]
    assert any(t.dtype == torch.int8 for t in model.net.state_dict().values())


def test_moe_program_predicts_what_the_module_predicts(
    int8: SimpleNamespace, fp32: SimpleNamespace, test_images: Tensor, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    moe = MoELightningModule(
        [int8.root / "model.pt2", fp32.net], top_k=2, input_shape=[1, IMAGE, IMAGE]
    ).eval()
    nn.init.normal_(moe.gate.w_gate.weight, std=2.0)  # a gate that routes (the trained one starts at zero)
    meta = export_executorch(moe, tmp_path / "moe.pte", max_batch=16)
    assert meta.kind == "moe" and meta.methods == ("gate", "expert_0", "expert_1")
    assert meta.extra["expert_dtypes"] == ["int8", "float32"] and meta.undelegated == {}
    runner = load_executorch(tmp_path / "moe.pte")
    assert isinstance(runner, EdgeMoE) and runner.top_k == 2
    images = test_images[:96]
    for k in (1, 2):
        moe.eval_top_k = k
        runner.top_k = k
        with torch.no_grad():
            expected = moe(images)
        out = torch.cat([runner(chunk) for chunk in images.split(16)])
        assert torch.equal(runner.route(images[:16]).indices, moe.route(images[:16])[0].indices)
        assert float((out.argmax(1) == expected.argmax(1)).float().mean()) >= MIN_AGREEMENT
        torch.testing.assert_close(out.exp(), expected.exp(), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match=r"Expected `top_k` to be an integer in \[1, 2\], got 3"):
        runner.top_k = 3
    with pytest.raises(ValueError, match="Expected `calibration` to be None for a MoELightningModule"):
        export_executorch(moe, tmp_path / "again.pte", calibration=images)


def test_post_training_int8_program_matches_its_pt2e_model(fp32: SimpleNamespace, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(64, 1, IMAGE, IMAGE, generator=generator)
    meta = export_executorch(
        fp32.net, tmp_path / "ptq.pte", example_inputs=calibration[:1], calibration=calibration
    )
    assert meta.dtype == "int8" and meta.steps == ("ptq:xnnpack",) and meta.quantizer == "XNNPACKQuantizer"
    reference_model = xnnpack_ptq(
        fp32.net, calibration[:1], calibration
    )  # the same quantizer and calibration
    x = torch.randn(MAX_BATCH * 8, 1, IMAGE, IMAGE, generator=generator)
    with torch.no_grad():
        reference = reference_model(x)
    program = load_executorch(tmp_path / "ptq.pte")
    out = torch.cat([program(chunk) for chunk in x.split(program.max_batch)])
    torch.testing.assert_close(out, reference, atol=INT8_ATOL, rtol=0)
    assert float((out.argmax(1) == reference.argmax(1)).float().mean()) >= 0.9  # random inputs: close calls


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (
            torch.randn(2, 1, IMAGE + 1, IMAGE),
            ValueError,
            r"expects a float32 tensor of shape \(batch, 1, 8, 8\)",
        ),
        (torch.randn(1, IMAGE, IMAGE), ValueError, "lacks the batch dimension"),
        (
            torch.zeros(2, 1, IMAGE, IMAGE, dtype=torch.uint8),
            ValueError,
            r"Convert it with `x.to\(torch.float32\)`",
        ),
        (
            torch.randn(MAX_BATCH + 1, 1, IMAGE, IMAGE),
            ValueError,
            r"with batch from 1 to 4, got .* planned for at most 4",
        ),
        (torch.randn(0, 1, IMAGE, IMAGE), ValueError, "An empty batch"),
        ([torch.randn(1, 1, IMAGE, IMAGE)], TypeError, "takes one input"),
    ],
)
def test_wrong_inputs_name_the_expected_shape(fp32: SimpleNamespace, x: Any, error: type, match: str) -> None:
    program = load_executorch(fp32.path)
    with pytest.raises(error, match=match):
        program(x)


def _copy_program(fp32: SimpleNamespace, folder: Path, data: bytes | None = None) -> Path:
    target = folder / "copy.pte"
    target.write_bytes(fp32.path.read_bytes() if data is None else data)
    sidecar_path(target).write_text(sidecar_path(fp32.path).read_text())
    return target


def test_damaged_files_are_refused(fp32: SimpleNamespace, tmp_path: Path) -> None:
    data = fp32.path.read_bytes()
    with pytest.raises(ValueError, match=r"is truncated: its header says \d+ bytes, the file has 1000"):
        load_executorch(_copy_program(fp32, tmp_path, data[:1000]))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="is corrupt: its bytes differ"):
        load_executorch(_copy_program(fp32, tmp_path, bytes(flipped)))
    with pytest.raises(ValueError, match="is not an ExecuTorch program"):
        load_executorch(_copy_program(fp32, tmp_path, b"PK\x03\x04" + bytes(200)))
    lonely = tmp_path / "lonely.pte"
    lonely.write_bytes(data)
    with pytest.raises(ValueError, match=r"has no side-car 'lonely\.pte\.json'"):
        load_executorch(lonely)
    with pytest.raises(ValueError, match="does not exist"):
        load_executorch(tmp_path / "missing.pte")
    with pytest.raises(ValueError, match=r"Expected `path` to end in '\.pte'"):
        load_executorch(tmp_path / "model.pt2")
    bad_side = _copy_program(fp32, tmp_path)
    sidecar_path(bad_side).write_text("{}")
    with pytest.raises(ValueError, match=r"side-car .* is corrupt"):
        load_executorch(bad_side)


class _CumulativeNet(nn.Module):
    """A network with an operator XNNPACK has no kernel for (a cumulative sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cumsum(self.conv(x).flatten(1), dim=1)


def test_network_xnnpack_cannot_lower_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        UndelegatedOperatorsError, match=r"outside the delegate.*forward: cumsum x1.*allow_undelegated=True"
    ):
        export_executorch(
            _CumulativeNet(), tmp_path / "c.pte", example_inputs=torch.randn(1, 1, IMAGE, IMAGE)
        )
    assert not (tmp_path / "c.pte").exists() and not sidecar_path(tmp_path / "c.pte").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"path": "net.pt2"}, ValueError, r"Expected `path` to end in '\.pte'"),
        ({"max_batch": 0}, ValueError, r"Expected `max_batch` to be an integer >= 1, got 0"),
        ({"source": 3}, TypeError, "Expected `source` to be an nn.Module"),
        ({"source": "missing.pt2"}, ValueError, "does not exist"),
        ({"allow_undelegated": "yes"}, TypeError, "Expected `allow_undelegated` to be a bool"),
    ],
)
def test_invalid_export_arguments(tmp_path: Path, kwargs: dict[str, Any], error: type, match: str) -> None:
    arguments: dict[str, Any] = {"source": nn.Linear(3, 2), "path": str(tmp_path / "x.pte"), **kwargs}
    source, path = arguments.pop("source"), arguments.pop("path")
    with pytest.raises(error, match=match):
        export_executorch(source, path, example_inputs=torch.randn(1, 3), **arguments)


def test_calibration_of_an_int8_model_is_refused(int8: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only for an fp32 model"):
        export_executorch(
            int8.model,
            tmp_path / "x.pte",
            example_inputs=torch.randn(1, 1, IMAGE, IMAGE),
            calibration=torch.randn(8, 1, IMAGE, IMAGE),
        )


def test_missing_executorch_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.import_module

    def without_executorch(name: str, *args: Any) -> Any:
        if name.startswith("executorch"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(_executorch.importlib, "import_module", without_executorch)
    extra = r'pip install "lightning-hybridcomp\[edge\]"'
    with pytest.raises(
        ImportError, match=rf"QuantizationAwareTraining\(backend='xnnpack'\) needs ExecuTorch.*{extra}"
    ):
        QuantizationAwareTraining(backend="xnnpack")
    with pytest.raises(ImportError, match=rf"Exporting to ExecuTorch needs ExecuTorch.*{extra}"):
        export_executorch(nn.Linear(3, 2), tmp_path / "x.pte", example_inputs=torch.randn(1, 3))


def test_export_command_writes_a_program_and_prints_errors(
    int8: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_hybridcomp.cli import main

    main(["export", str(int8.root / "model.pt2"), str(tmp_path / "cli.pte"), "--max_batch", "2"])
    assert "| int8 " in capsys.readouterr().out
    program = load_executorch(tmp_path / "cli.pte")
    assert program.max_batch == 2 and program.metadata.steps == int8.metadata.steps
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.pt2"), str(tmp_path / "x.pte")])
    assert exit_info.value.code == 2
    assert "hybridcomp: error: Expected `source` to be an existing file" in capsys.readouterr().err


def test_pipeline_says_once_why_edge_figures_are_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lightning_hybridcomp import pipeline_edge
    from lightning_hybridcomp.report import ResultRow

    monkeypatch.setattr(pipeline_edge, "executorch_available", lambda: False)
    said: list[str] = []
    rows = [ResultRow("baseline", "baseline", 0.9, 10, 100.0, 1000)]
    note = pipeline_edge.add_edge_figures(
        rows, {}, tmp_path, test_batches=[], threads=1, rounds=1, warmup=0, say=said.append
    )
    assert said == [note] and 'pip install "lightning-hybridcomp[edge]"' in note
    assert rows[0].edge_latency_b1_ms is None and not any(tmp_path.iterdir())
