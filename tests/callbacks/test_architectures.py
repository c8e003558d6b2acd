"""Real torchvision architectures through StructuredPruning -> QuantizationAwareTraining -> artifact.

Miniature configurations of the torchvision classes users bring (the same layer types: in-place dropout,
stochastic depth, shared ReLU modules in residual blocks, channel shuffles, attention with stored widths),
so that the suite stays fast; ``benchmarks/bench_architectures.py`` runs the full-size networks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models import (
    MobileNetV3,
    ResNet,
    VisionTransformer,
    efficientnet,
    mobilenetv3,
    shufflenet_v2_x0_5,
)
from torchvision.models.resnet import BasicBlock
from torchvision.ops import StochasticDepth

from lightning_hybridcomp._graph_passes import (
    NondeterministicProgramError,
    inference_mode_except_batch_norm,
    random_ops,
    separate_repeated_module_calls_,
)
from lightning_hybridcomp.artifacts import load_artifact, save_artifact
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.programs import export_with_dynamic_batch
from tests._helpers import ClassifierSteps, fast_trainer, random_classification_data

IMAGE = 32


class Wrapped(ClassifierSteps):
    """A user's generic LightningModule: any network as ``self.net``, SGD."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RandomLayers(nn.Module):
    """Every kind of mode-dependent randomness, and a ReLU module applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.drop_path = StochasticDepth(0.2, "row")
        self.drop = nn.Dropout(0.3, inplace=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = self.relu(x.mean(1, keepdim=True) + self.drop_path(y))
        y = F.dropout(y.mean((2, 3)), 0.1, training=self.training)
        return self.head(self.drop(y))


def tiny_mobilenet_v3() -> nn.Module:
    setting, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return MobileNetV3(setting[:4], last_channel // 4, num_classes=10)


def tiny_efficientnet() -> nn.Module:
    setting, _ = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(
        setting[:4], dropout=0.2, stochastic_depth_prob=0.5, num_classes=10, last_channel=64
    )


def tiny_resnet(block: type[nn.Module]) -> nn.Module:
    return ResNet(block, [1, 1, 1, 1], num_classes=10)  # type: ignore[arg-type]


def tiny_vit() -> nn.Module:
    return VisionTransformer(
        image_size=IMAGE, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


def loader(samples: int = 16) -> DataLoader:
    return DataLoader(random_classification_data(samples, (3, IMAGE, IMAGE)), batch_size=8)


# --------------------------------------------------------------------------- graph passes


def test_inference_trace_has_no_random_op_while_batch_norm_keeps_training() -> None:
    net = RandomLayers().train()
    example = torch.randn(2, 3, IMAGE, IMAGE)
    trained = random_ops(export_with_dynamic_batch(net, example))
    assert any("dropout_" in op for op in trained)  # nn.Dropout(inplace=True)
    assert any("bernoulli" in op for op in trained)  # StochasticDepth
    with inference_mode_except_batch_norm(net):
        assert net.bn.training and not net.drop.training and not net.drop_path.training and not net.training
        program = export_with_dynamic_batch(net, example)
    assert random_ops(program) == []
    assert all(m.training for m in net.modules())  # every module's own mode is back
    batch_norms = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    assert batch_norms and all(n.args[5] is True for n in batch_norms)  # still batch statistics


def test_attention_without_dropout_is_deterministic() -> None:
    """scaled_dot_product_attention is tagged as seeded (it may drop out); at dropout_p=0 it is not random."""

    class SelfAttention(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1 if self.training else 0.0)

    example = torch.randn(2, 4, 8)
    assert random_ops(export_with_dynamic_batch(SelfAttention().eval(), example)) == []
    trained = random_ops(export_with_dynamic_batch(SelfAttention().train(), example))
    assert any("scaled_dot_product_attention" in op for op in trained)


class AlwaysDropout(nn.Module):
    """A forward that draws random numbers in every mode: ``F.dropout`` without ``training=self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.dropout(self.conv(x), 0.5).mean((2, 3)))  # training=True whatever the mode


def test_save_artifact_refuses_a_forward_that_always_draws_random_numbers(tmp_path: Path) -> None:
    with pytest.raises(NondeterministicProgramError, match=r"draws random numbers \(aten.dropout"):
        save_artifact(AlwaysDropout(), tmp_path / "net.pt2", torch.randn(2, 3, IMAGE, IMAGE))
    assert not (tmp_path / "net.pt2").exists()


def test_repeated_module_calls_become_separate_partitions_for_the_x86_quantizer() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    def quantizer() -> Any:
        q = xiq.X86InductorQuantizer()
        return q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))

    net = tiny_resnet(BasicBlock).train()
    example = torch.randn(2, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="more than one output node"):
        prepare_qat_pt2e(export_with_dynamic_batch(net, example).module(), quantizer())
    graph = export_with_dynamic_batch(net, example).module()
    assert separate_repeated_module_calls_(graph) == 4  # the second self.relu call of each block
    prepared = prepare_qat_pt2e(graph, quantizer())
    assert torch.isfinite(prepared(example)).all()


# --------------------------------------------------------------------------- prune -> QAT -> artifact


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(tiny_mobilenet_v3, id="mobilenet_v3-inplace_dropout"),
        pytest.param(tiny_efficientnet, id="efficientnet-stochastic_depth"),
        pytest.param(lambda: tiny_resnet(BasicBlock), id="resnet-shared_relu"),
    ],
)
def test_pruned_int8_program_is_deterministic_and_reloads_equal(build: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wrapped(build())
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=0, verbose=False)
    qat = QuantizationAwareTraining(verbose=False, log_fake_quant_error=False)
    trainer = fast_trainer(max_epochs=3, limit_train_batches=2, callbacks=[pruning, qat])
    trainer.fit(model, loader())
    assert qat.stage == "converted" and pruning.step_summaries[-1]["macs_ratio"] < 0.6
    x = torch.randn(4, 3, IMAGE, IMAGE)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    meta = qat.save_artifact(tmp_path / "net.pt2")
    assert meta.dtype == "int8" and meta.extra["ops"]["quantize_per_tensor"] > 0
    loaded = load_artifact(tmp_path / "net.pt2").module
    with torch.no_grad():
        assert torch.equal(loaded(x), first) and torch.equal(loaded(x), loaded(x))


# --------------------------------------------------------------------------- refused before training


class DataDependent(nn.Module):
    """Exportable by nothing: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x).mean((2, 3))
        if y.sum() > 0:
            y = y * 2
        return self.head(y)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(
            lambda: shufflenet_v2_x0_5(num_classes=10),
            r"StructuredPruning cannot prune .* \(ZeroDivisionError: .*\)\. torch-pruning cannot follow",
            id="channel_shuffle",
        ),
        pytest.param(
            tiny_vit,
            r"StructuredPruning cannot prune .* while running the pruned network .* `hidden_dim`",
            id="vit_stored_width",
        ),
        pytest.param(
            DataDependent,
            r"Could not export DataDependent with `torch.export`.*GuardOnDataDependent.*Hint:",
            id="not_exportable",
        ),
        pytest.param(
            AlwaysDropout,
            r"AlwaysDropout, traced at inference for fake quantization, draws random numbers \(aten.dropout",
            id="unconditional_dropout",
        ),
    ],
)
def test_a_network_that_will_fail_is_refused_before_the_first_step(build: Any, match: str) -> None:
    model = Wrapped(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=1, verbose=False)
    qat = QuantizationAwareTraining(verbose=False)
    trainer = fast_trainer(max_epochs=4, limit_train_batches=2, callbacks=[pruning, qat])
    with pytest.raises(ValueError, match=match) as caught:
        trainer.fit(model, loader())
    if match.startswith(("StructuredPruning", "QuantizationAwareTraining")):
        assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no upstream traceback
    assert trainer.global_step == 0 and pruning.steps_done == 0 and qat.stage == "float"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dependency_graph_construction_has_a_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StructuredPruning, "graph_time_limit", 1e-4)
    model = Wrapped(tiny_resnet(BasicBlock))
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, verbose=False)
    trainer = fast_trainer(max_epochs=2, limit_train_batches=2, callbacks=[pruning])
    with pytest.raises(ValueError, match=r"did not finish within 0.0001 s\)\. torch-pruning cannot trace"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0


def test_trial_runs_leave_the_run_itself_unchanged() -> None:
    """The same seed gives the same trained weights with and without the callbacks' trial runs."""

    def train(trials: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, Tensor]:
        with monkeypatch.context() as patch:
            if not trials:
                patch.setattr(StructuredPruning, "preview_network", lambda *a: None)
                patch.setattr(QuantizationAwareTraining, "_trial_prepare", lambda *a: None)
            torch.manual_seed(0)
            model = Wrapped(RandomLayers())
            pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, verbose=False)
            qat = QuantizationAwareTraining(
                verbose=False, convert_on_fit_end=False, log_fake_quant_error=False
            )
            data = DataLoader(random_classification_data(16, (3, IMAGE, IMAGE)), batch_size=8, shuffle=True)
            fast_trainer(max_epochs=3, limit_train_batches=2, callbacks=[pruning, qat]).fit(model, data)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    with pytest.MonkeyPatch.context() as monkeypatch:
        plain, tried = train(False, monkeypatch), train(True, monkeypatch)
    assert plain.keys() == tried.keys() and all(torch.equal(plain[k], tried[k]) for k in plain)


def test_an_upstream_quantizer_failure_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao's own errors (e.g. an annotation it cannot do) come as one line, before pruning is paid for."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    def fail(self: Any, model: Any) -> Any:
        raise ValueError("Input partition has more than one output node")

    monkeypatch.setattr(xiq.X86InductorQuantizer, "annotate", fail)
    model = Wrapped(tiny_resnet(BasicBlock))
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, verbose=False)
    qat = QuantizationAwareTraining(verbose=False)
    trainer = fast_trainer(max_epochs=3, limit_train_batches=2, callbacks=[pruning, qat])
    with pytest.raises(
        ValueError,
        match=r"cannot quantize module 'net' with backend 'x86_pt2e': a trial preparation failed \(ValueError:"
        r" Input partition has more than one output node\)\. .*`module=\.\.\.`",
    ):
        trainer.fit(model, loader())
    assert trainer.global_step == 0 and pruning.steps_done == 0
