"""MoELightningModule: sparse dispatch vs a dense reference, a real fit on digits, checkpoints, DDP, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_hybridcomp.artifacts import save_artifact
from lightning_hybridcomp.callbacks import KnowledgeDistillation, soft_target_loss
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.moe.dispatch import BucketedExpert, bucket_size
from lightning_hybridcomp.moe.gate import Gate, GateNetwork, routing_mask, top_k_gate
from lightning_hybridcomp.moe.module import MoELightningModule, load_moe
from lightning_hybridcomp.profiling import count_macs, count_macs_and_params
from tests._helpers import fast_trainer, random_classification_data, run_ddp_script

IMAGE = [1, 8, 8]


class TinyCNN(nn.Module):
    """A small classifier; widths differ between experts so their MACs differ."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BranchyNet(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def _random_experts(widths=(2, 3, 4), seed=0) -> list[nn.Module]:
    torch.manual_seed(seed)
    experts = [TinyCNN(w) for w in widths]
    for expert in experts:  # non-trivial BatchNorm statistics, so eval semantics matter
        for m in expert.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return experts


def _randomise_gate_(moe: MoELightningModule, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, image_size=8)
    dm.setup("fit")
    return dm


def _train_expert(dm: DigitsDataModule, width: int, classes: list[int], seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN(width)
    x, y = dm.train_set.tensors
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def experts(digits) -> tuple[list[nn.Module], list[float]]:
    """Three experts of different sizes that differ in what they know: digits 0-4, digits 5-9, all (small)."""
    models = [
        _train_expert(digits, 8, [0, 1, 2, 3, 4], seed=0, epochs=6),
        _train_expert(digits, 12, [5, 6, 7, 8, 9], seed=1, epochs=6),
        _train_expert(digits, 4, list(range(10)), seed=2, epochs=3),
    ]
    x, y = digits.val_set.tensors
    with torch.no_grad():
        accs = [float((m(x).argmax(-1) == y).float().mean()) for m in models]
    return models, accs


def _fit(
    experts, digits, *, balance: float, epochs: int = 12, **kwargs
) -> tuple[MoELightningModule, pl.Trainer]:
    pl.seed_everything(0)
    moe = MoELightningModule(
        experts, top_k=2, input_shape=IMAGE, balance_coefficient=balance, learning_rate=1e-2, **kwargs
    )
    trainer = fast_trainer(max_epochs=epochs)
    trainer.fit(moe, digits)
    return moe, trainer


@pytest.fixture(scope="module")
def fitted(experts, digits) -> tuple[MoELightningModule, pl.Trainer]:
    return _fit(experts[0], digits, balance=0.1)


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batch", [16, 1])  # one image takes its own path: no grouping of a batch
def test_sparse_dispatch_equals_dense_reference(k, training, batch):
    moe = MoELightningModule(_random_experts(), top_k=k, input_shape=IMAGE)
    _randomise_gate_(moe)
    moe.train(training)
    x = torch.randn(batch, *IMAGE)
    calls: dict[int, list[Tensor]] = {i: [] for i in range(3)}
    hooks = [
        expert.register_forward_hook(lambda m, args, out, i=i: calls[i].append(args[0]))
        for i, expert in enumerate(moe.experts)
    ]
    torch.manual_seed(1)
    gating, _ = moe.route(x)
    result = moe.dispatch(x, gating)
    for h in hooks:
        h.remove()
    dense = moe.dense_reference(x, gating)
    torch.testing.assert_close(result.probs, dense, rtol=1e-5, atol=1e-6)
    # Each expert ran once, on exactly the samples routed to it.
    mask = routing_mask(gating.indices, 3)
    assert result.counts.tolist() == mask.sum(0).long().tolist()
    for i in range(3):
        rows = mask[:, i].nonzero().squeeze(1)
        if rows.numel():
            assert len(calls[i]) == 1 and torch.equal(calls[i][0], x[rows])
        else:
            assert calls[i] == []
    # Deterministic: the same decision gives bit-identical mixtures.
    assert torch.equal(moe.dispatch(x, gating).probs, result.probs)
    if training:  # gradients into the gate agree with the dense reference too
        grads = []
        for use_dense in (False, True):
            moe.zero_grad()
            torch.manual_seed(1)
            gating, _ = moe.route(x)
            out = moe.dense_reference(x, gating) if use_dense else moe.dispatch(x, gating).probs
            out.clamp_min(1e-12).log()[:, 0].sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in moe.gate.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_with_an_expert_that_gets_no_sample(k):
    moe = MoELightningModule(_random_experts(), top_k=k, input_shape=IMAGE).eval()
    x = torch.randn(8, *IMAGE)
    logits = torch.randn(8, 3)
    logits[:, 1] = -1e4
    gating = top_k_gate(logits, k)
    called = []
    handle = moe.experts[1].register_forward_hook(lambda *args: called.append(True))
    result = moe.dispatch(x, gating)
    handle.remove()
    assert result.counts[1].item() == 0 and called == []
    torch.testing.assert_close(result.probs, moe.dense_reference(x, gating), rtol=1e-5, atol=1e-6)


def test_bucketed_expert_compiles_once_per_bucket_past_dynamos_recompile_limit():
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]):
        graphs.append(int(example_inputs[-1].shape[0]) if example_inputs else -1)
        return gm.forward

    expert = TinyCNN(2).eval()
    bucketed = BucketedExpert(torch.compile(expert, backend=counting_backend, dynamic=False))
    sizes = list(range(1, 41)) + list(range(40, 0, -3))
    with torch.no_grad():
        for n in sizes:
            x = torch.randn(n, *IMAGE)
            torch.testing.assert_close(bucketed(x), expert(x), rtol=1e-5, atol=1e-6)
    buckets = sorted({bucket_size(n) for n in sizes})
    assert buckets == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # more than Dynamo's limit of 8
    assert len(graphs) == len(buckets)  # one compilation per bucket, none fell back to eager
    assert bucketed.buckets == set(buckets)


def test_capacity_factor_drops_the_lowest_weights_and_counts_them():
    moe = MoELightningModule(_random_experts(), top_k=1, input_shape=IMAGE, capacity_factor=0.5).train()
    x = torch.randn(12, *IMAGE)
    logits = torch.zeros(12, 3)
    logits[:, 0] = torch.linspace(1.0, 3.0, 12)  # everything to expert 0, the last samples most confident
    gating = top_k_gate(logits, 1)
    result = moe.dispatch(x, gating)
    capacity = math.ceil(0.5 * 12 * 1 / 3)
    assert result.counts.tolist() == [capacity, 0, 0]
    assert result.keep.squeeze(1).tolist() == [False] * 10 + [True] * 2
    assert torch.all(result.probs[:10] == 0)
    torch.testing.assert_close(
        result.probs, moe.dense_reference(x, gating, result.keep), rtol=1e-5, atol=1e-6
    )
    # Outside training the limit is off by default (outputs must not depend on the batch composition).
    moe.eval()
    assert moe.dispatch(x, gating).keep.all()
    moe.capacity_in_eval = True
    assert (~moe.dispatch(x, gating).keep).sum().item() == 10


def test_capacity_drops_are_logged_in_training(digits):
    moe = MoELightningModule(_random_experts(), top_k=1, input_shape=IMAGE, capacity_factor=0.5)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(moe, digits)
    # 64 samples, 3 experts, capacity ceil(0.5 * 64 / 3) = 11 each: at least 64 - 33 dropped per batch.
    assert trainer.callback_metrics["moe/train/dropped"].item() >= 2 * (64 - 33)


# ---------------------------------------------------------------------------------------------- a real fit


def _reference_figures(moe: MoELightningModule, dm: DigitsDataModule) -> dict[str, float]:
    """The validation figures recomputed by an independent dense loop over the validation set."""
    moe.eval()
    x, y = dm.val_set.tensors
    with torch.no_grad():
        logits, _ = moe.gate(x)
        k = moe.active_top_k
        probs = logits.softmax(-1)
        top, indices = probs.topk(k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)  # the evaluation mixture is normalised at every k
        all_probs = torch.stack([expert(x).softmax(-1) for expert in moe.experts], dim=1)  # [B, N, C]
        mixed = (weights.unsqueeze(-1) * all_probs.gather(1, indices[..., None].expand(-1, -1, 10))).sum(1)
    counts = torch.bincount(indices.flatten(), minlength=3).double()
    return {
        "val/acc": float((mixed.argmax(-1) == y).double().mean()),
        "moe/expected_macs": moe.gate_macs
        + float(sum(counts[i] / len(y) * moe.expert_macs[i] for i in range(3))),
        **{f"moe/expert_load/{i}": float(counts[i] / counts.sum()) for i in range(3)},
    }


def test_fit_on_digits_learns_a_gate_and_balances_load(fitted, experts, digits):
    moe, trainer = fitted
    stats = moe.routing_stats
    worst, best = min(experts[1]), max(experts[1])
    assert stats["val/acc"] > worst + 0.15, (stats, experts[1])
    assert stats["val/acc"] > best, "the gate should combine the two specialists beyond any single expert"
    loads = [stats[f"moe/expert_load/{i}"] for i in range(3)]
    assert min(loads) >= 0.1, loads  # nobody starves with the balancing loss on
    assert stats["moe/dead_expert_share"] == 0.0
    assert stats["moe/samples"] == len(digits.val_set)
    assert sum(loads) == pytest.approx(1.0)
    for key, value in _reference_figures(moe, digits).items():
        assert stats[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # k = 2 of 3 experts: the expected cost is below running all of them, above the gate alone.
    assert moe.gate_macs < stats["moe/expected_macs"] < moe.gate_macs + sum(moe.expert_macs)
    for key in (
        "moe/loss/task",
        "moe/loss/balance",
        "moe/loss/importance",
        "moe/loss/z",
        "moe/expected_macs",
        "moe/expert_load/2",
        "moe/routing_entropy",
        "moe/gate_entropy",
        "moe/dead_expert_share",
        "val/acc",
    ):
        assert key in trainer.callback_metrics, key
    assert trainer.callback_metrics["moe/loss/importance"].item() == 0.0  # coefficient 0 by default
    assert all(not p.requires_grad for p in moe.experts.parameters())
    # The same figures for any images, outside a Trainer.
    figures = moe.routing_statistics(digits.val_set.tensors[0], batch_size=50)
    assert figures["expected_macs"] == pytest.approx(stats["moe/expected_macs"])
    assert figures["expert_load"] == pytest.approx(loads)
    assert figures["samples"] == len(digits.val_set)
    models = experts[0]
    own = sum(p.numel() for p in moe.gate.parameters())
    assert moe.total_params() == sum(p.numel() for m in models for p in m.parameters()) + own
    assert moe.total_bytes() > sum(moe.expert_sizes)


def test_fit_without_balancing_loss_is_allowed_to_collapse(experts, digits, record_property):
    moe, _ = _fit(experts[0], digits, balance=0.0, epochs=8)
    loads = [moe.routing_stats[f"moe/expert_load/{i}"] for i in range(3)]
    record_property("loads_without_balance", loads)
    print(f"expert loads without the balancing loss: {loads}; accuracy {moe.routing_stats['val/acc']:.3f}")
    assert sum(loads) == pytest.approx(1.0)
    assert moe.routing_stats["val/acc"] > min(experts[1])


def test_top1_routing_at_evaluation_costs_less(fitted, digits):
    moe, trainer = fitted
    k2 = dict(moe.routing_stats)
    moe.eval_top_k = 1
    try:
        trainer.validate(moe, digits, verbose=False)
        k1 = dict(moe.routing_stats)
        assert k1 == pytest.approx({**k1, **_reference_figures(moe, digits)}, rel=1e-6)
    finally:
        moe.eval_top_k = None
    assert k1["moe/expected_macs"] < k2["moe/expected_macs"]
    assert k1["val/acc"] > 0.5


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_without_expert_classes(fitted, digits, tmp_path):
    moe, trainer = fitted
    path = tmp_path / "moe.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert len(checkpoint["moe"]["experts"]) == 3
    x = digits.val_set.tensors[0]
    moe.eval()
    with torch.no_grad():
        expected = moe(x)
    loaded = load_moe(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert loaded.expert_macs == moe.expert_macs and loaded.gate_macs == moe.gate_macs
    # A fresh process that never imports this test module (where TinyCNN lives) gives the same outputs.
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from lightning_hybridcomp.moe.module import load_moe\n"
        "m = load_moe(sys.argv[1])\n"
        "assert 'TinyCNN' not in repr(m)\n"
        "with torch.no_grad(): torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_load_from_checkpoint_rebuilds_the_moe_from_the_checkpoint_alone(fitted, digits, tmp_path):
    moe, trainer = fitted
    path = tmp_path / "moe.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert "experts" not in hparams and hparams["gate"] == "cnn"
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in hparams.values())
    x = digits.val_set.tensors[0]
    moe.eval()
    with torch.no_grad():
        expected = moe(x)
        for loaded in (
            MoELightningModule.load_from_checkpoint(path, weights_only=True).eval(),
            MoELightningModule.load_from_checkpoint(
                path
            ).eval(),  # Lightning 2.6 reads weights only by default
            load_moe(path),
        ):
            assert torch.equal(loaded(x), expected)
            assert loaded.expert_names == moe.expert_names and loaded.expert_macs == moe.expert_macs
            assert loaded.gate_macs == moe.gate_macs and loaded.total_params() == moe.total_params()
            assert loaded.expert_sizes == moe.expert_sizes and loaded.total_bytes() == moe.total_bytes()


def test_expert_classes_come_back_with_the_checkpoint(digits, tmp_path):
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    moe = MoELightningModule(
        _random_experts(), input_shape=IMAGE, assignment_target="classes", expert_classes=groups
    )
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(moe, digits)
    path = tmp_path / "classes.ckpt"
    trainer.save_checkpoint(path)
    for loaded in (MoELightningModule.load_from_checkpoint(path, weights_only=True), load_moe(path)):
        assert loaded.hparams["expert_classes"] == groups and loaded.assignment_target == "classes"
        assert torch.equal(loaded._class_experts, moe._class_experts)
    assert moe._class_experts.sum(dim=1).tolist() == [1] * 10  # each class has its one expert
    assert "_class_experts" not in moe.state_dict()  # rebuilt from the hyperparameters, not stored


def test_moe_without_experts_waits_for_a_checkpoint():
    unbuilt = MoELightningModule(input_shape=IMAGE)
    with pytest.raises(RuntimeError, match=r"created without `experts`.*load_from_checkpoint\(path\)"):
        unbuilt(torch.randn(2, *IMAGE))
    with pytest.raises(ValueError, match="Expected the checkpoint to be a MoELightningModule checkpoint"):
        unbuilt.on_load_checkpoint({"state_dict": {}})


def _loader(n_batches: int = 3) -> DataLoader:
    return DataLoader(random_classification_data(n_batches * 16, IMAGE), batch_size=16, shuffle=False)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_fit_resume_from_expert_files_matches_an_uninterrupted_run(tmp_path):
    paths = []
    for i, expert in enumerate(_random_experts()):
        paths.append(str(tmp_path / f"expert{i}.pt2"))
        save_artifact(expert.eval(), paths[-1], torch.randn(2, *IMAGE))

    def build() -> MoELightningModule:
        torch.manual_seed(0)
        return MoELightningModule(paths, top_k=2, noisy_gating=False, learning_rate=1e-2)

    full = build()
    fast_trainer(max_epochs=2, limit_val_batches=0).fit(full, _loader())
    first = build()
    trainer = fast_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(first, _loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = build()
    fast_trainer(max_epochs=2, limit_val_batches=0).fit(
        resumed, _loader(), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    for (name, a), b in zip(full.gate.state_dict().items(), resumed.gate.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(first.gate.w_gate.weight, full.gate.w_gate.weight)  # the second epoch did train
    assert full.hparams["input_shape"] == IMAGE  # taken from the artifacts

    # Another file where expert 1 was: resuming is an error that names it.
    save_artifact(TinyCNN(3).eval(), paths[1], torch.randn(2, *IMAGE))
    with pytest.raises(RuntimeError, match=r"Expert 1 of this MoE, experts\[1\] \('.*expert1.pt2'\)"):
        fast_trainer(max_epochs=2).fit(build(), _loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    # A missing expert file is named at construction.
    Path(paths[2]).unlink()
    with pytest.raises(ValueError, match=r"experts\[2\] \('.*expert2.pt2'\) to be an existing file"):
        build()


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_resume_with_a_different_number_of_experts_is_an_error(tmp_path):
    moe = MoELightningModule(_random_experts(), input_shape=IMAGE)
    trainer = fast_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(moe, _loader(1))
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    two = MoELightningModule(_random_experts()[:2], input_shape=IMAGE)
    with pytest.raises(RuntimeError, match="trained with 3 experts"):
        fast_trainer(max_epochs=2).fit(two, _loader(1), ckpt_path=tmp_path / "three.ckpt")
    with pytest.raises(RuntimeError, match="checkpoint with a 'moe' entry"):
        two.on_load_checkpoint({"state_dict": {}})


def test_load_moe_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="MoE checkpoint `path` to be an existing file"):
        load_moe(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="to be a MoELightningModule checkpoint"):
        load_moe(tmp_path / "plain.ckpt")
    data = (tmp_path / "plain.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-40])
    with pytest.raises(ValueError, match=r"Could not read the MoE checkpoint `path` '.*cut.ckpt'"):
        load_moe(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {}, "moe": {"experts": [], "format_version": 2}}, tmp_path / "newer.ckpt")
    with pytest.raises(ValueError, match=r"newer.ckpt' was written by a newer lightning_hybridcomp"):
        load_moe(tmp_path / "newer.ckpt")


def test_load_moe_refuses_pickled_programs(tmp_path):
    moe = MoELightningModule(_random_experts(), input_shape=IMAGE)
    checkpoint = {"state_dict": moe.state_dict(), "hyper_parameters": dict(moe.hparams), "moe": {}}
    moe.on_save_checkpoint(checkpoint)
    # A program saved with its example inputs holds a pickle that torch.export.load may open unsafely.
    program = torch.export.export(TinyCNN(2).eval(), (torch.randn(2, *IMAGE),))
    import io

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    checkpoint["moe"]["experts"][0] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=r"Refusing to load the stored program of experts\[0\]"):
        load_moe(tmp_path / "tampered.ckpt")


# ---------------------------------------------------------------------------------------------- gates, experts


def test_gate_on_expert_features(digits, tmp_path):
    experts = _random_experts()
    moe = MoELightningModule(experts, top_k=2, input_shape=IMAGE, gate="expert:2", learning_rate=1e-2)
    assert moe.gate_macs > moe.expert_macs[2]  # the cut expert plus the head
    with torch.no_grad():
        x = torch.randn(5, *IMAGE)
        torch.testing.assert_close(moe.gate.features(x), experts[2].eval().features(x), rtol=1e-5, atol=1e-6)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(moe, digits)
    assert not any(p.requires_grad for p in moe.gate.features.parameters())
    assert moe.gate.w_gate.weight.abs().sum() > 0  # the head trained
    trainer.save_checkpoint(tmp_path / "feat.ckpt")
    loaded = load_moe(tmp_path / "feat.ckpt")
    moe.eval()
    x = digits.val_set.tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), moe(x), rtol=0, atol=0)
        lightning_loaded = MoELightningModule.load_from_checkpoint(tmp_path / "feat.ckpt").eval()
        assert torch.equal(lightning_loaded(x), moe(x))
    assert lightning_loaded.gate_macs == moe.gate_macs


def test_user_gate_module_round_trips_through_an_exported_gate(digits, tmp_path):
    gate = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    moe = MoELightningModule(_random_experts(), top_k=1, eval_top_k=1, input_shape=IMAGE, gate=gate)
    assert moe.gate_macs == 64 * 3  # count_macs: the linear layer's multiply-accumulates, no bias adds
    trainer = fast_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(moe, digits)
    trainer.save_checkpoint(tmp_path / "user_gate.ckpt")
    loaded = load_moe(tmp_path / "user_gate.ckpt")
    assert loaded.hparams["gate"] == "module"
    moe.eval()
    x = digits.val_set.tensors[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), moe(x), rtol=0, atol=0)
        # Evaluation mixes with normalised weights: at k = 1 the chosen expert's own distribution.
        torch.testing.assert_close(loaded(x).exp().sum(-1), torch.ones(len(x)))
        lightning_loaded = MoELightningModule.load_from_checkpoint(tmp_path / "user_gate.ckpt").eval()
        assert torch.equal(lightning_loaded(x), moe(x))
    assert lightning_loaded.gate_macs == moe.gate_macs


def test_gate_network_as_gate_is_the_cnn_gate_with_its_own_weights(digits, tmp_path):
    torch.manual_seed(0)
    gate = GateNetwork(in_channels=1, num_experts=3, channels=4, input_size=4)
    moe = MoELightningModule(_random_experts(), top_k=2, input_shape=IMAGE, gate=gate, learning_rate=1e-2)
    assert moe.gate is gate
    assert [moe.hparams[k] for k in ("gate", "gate_channels", "gate_input_size")] == ["cnn", 4, 4]
    assert moe.gate_macs == count_macs(gate, torch.randn(1, *IMAGE))
    trainer = fast_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(moe, digits)
    assert gate.w_gate.weight.abs().sum() > 0  # the user's gate network trained in place
    moe.eval()
    x = digits.val_set.tensors[0][:32]
    with torch.no_grad():  # routed by the network's own logits
        gating = top_k_gate(gate(x)[0], 2)
        torch.testing.assert_close(moe(x).exp(), moe.dense_reference(x, gating), rtol=1e-5, atol=1e-6)
    trainer.save_checkpoint(tmp_path / "gate_network.ckpt")
    with torch.no_grad():
        for loaded in (
            load_moe(tmp_path / "gate_network.ckpt"),
            MoELightningModule.load_from_checkpoint(tmp_path / "gate_network.ckpt").eval(),
        ):
            assert type(loaded.gate) is GateNetwork and loaded.gate.channels == 4
            assert torch.equal(loaded(x), moe(x))


class LinearGate(Gate):
    """A user Gate: deterministic logits from one linear layer, never noisy."""

    def __init__(self, num_experts: int = 3) -> None:
        super().__init__(num_experts)
        self.linear = nn.Linear(64, num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.linear(x.flatten(1)), None


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_gate_subclass_is_used_as_it_is_and_passed_again_to_load(tmp_path):
    with pytest.warns(UserWarning, match="checkpoints do not hold the gate LinearGate"):
        moe = MoELightningModule(_random_experts(), top_k=2, input_shape=IMAGE, gate=LinearGate())
    assert isinstance(moe.gate, LinearGate) and moe.gate_macs == 64 * 3
    trainer = fast_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(moe, _loader(2))
    trainer.save_checkpoint(tmp_path / "linear_gate.ckpt")
    for load in (load_moe, MoELightningModule.load_from_checkpoint):
        with pytest.raises(ValueError, match="trained with a gate module that could not be exported"):
            load(tmp_path / "linear_gate.ckpt")
    x = torch.randn(8, *IMAGE)
    moe.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="checkpoints do not hold"):
        assert torch.equal(load_moe(tmp_path / "linear_gate.ckpt", gate=LinearGate())(x), moe(x))
        loaded = MoELightningModule.load_from_checkpoint(tmp_path / "linear_gate.ckpt", gate=LinearGate())
        assert torch.equal(loaded.eval()(x), moe(x))


def test_unfrozen_experts_fine_tune_but_int8_experts_stay_frozen(digits):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    fp32, to_quantize = _random_experts((3, 2))
    example = torch.randn(4, *IMAGE)
    program = torch.export.export(
        to_quantize.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program.module(), quantizer)
    prepared(example)
    int8 = torch.export.export(
        convert_pt2e(prepared), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    original = {k: v.clone() for k, v in fp32.state_dict().items()}
    moe = MoELightningModule([fp32, int8], top_k=2, input_shape=IMAGE, freeze_experts=False)
    assert [e.quantized for e in moe.expert_records] == [False, True]
    assert all(p.requires_grad for p in moe.experts[0].parameters())
    assert not any(p.requires_grad for p in moe.experts[1].parameters())
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in moe.experts]
    fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(moe, digits)
    changed = [
        any(not torch.equal(v, e.state_dict()[k]) for k, v in b.items()) for e, b in zip(moe.experts, before)
    ]
    assert changed == [True, False]
    # The MoE owns a copy: the user's module is untouched.
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in original.items())


class _DictBatches(torch.utils.data.Dataset):
    def __init__(self, data: torch.utils.data.TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image, label = self.data[i]
        return {"image": image, "label": label}


def test_dict_batches_train_and_evaluate_like_tuple_batches():
    data = random_classification_data(32, IMAGE)
    results = []
    for dataset in (data, _DictBatches(data)):
        pl.seed_everything(0)
        moe = MoELightningModule(_random_experts(), top_k=2, input_shape=IMAGE)
        loader = DataLoader(dataset, batch_size=16)
        trainer = fast_trainer(max_epochs=1)
        trainer.fit(moe, loader, loader)
        results.append(([p.detach().clone() for p in moe.gate.parameters()], trainer.test(moe, loader)))
    (gate, tested), (dict_gate, dict_tested) = results
    assert all(torch.equal(a, b) for a, b in zip(gate, dict_gate))
    assert tested == dict_tested
    with pytest.raises(RuntimeError, match=r"Could not find the labels .*\('y', 'label'"):
        moe.test_step({"image": data.tensors[0][:4], "cls": data.tensors[1][:4]}, 0)


@pytest.mark.parametrize("freeze_experts", [True, False])
def test_knowledge_distillation_distills_into_the_training_mixture(freeze_experts):
    # The callback hooks the module's forward: training_step computes its mixture through self(x).
    moe = MoELightningModule(
        _random_experts(), top_k=2, input_shape=IMAGE, noisy_gating=False, freeze_experts=freeze_experts
    )
    _randomise_gate_(moe)
    teacher = TinyCNN(5).eval()
    loader = DataLoader(random_classification_data(16, IMAGE), batch_size=16)
    x, _ = next(iter(loader))
    reference = copy.deepcopy(moe).train()
    with torch.no_grad():
        expected = soft_target_loss(reference(x), teacher(x), 2.0)
    gate_before = [p.detach().clone() for p in moe.gate.parameters()]
    trainer = fast_trainer(
        max_steps=1, callbacks=[KnowledgeDistillation(teacher, alpha=0.5, temperature=2.0)]
    )
    trainer.fit(moe, loader)
    torch.testing.assert_close(trainer.callback_metrics["distillation/soft_target_loss"], expected)
    assert any(not torch.equal(a, b) for a, b in zip(gate_before, moe.gate.parameters()))
    assert moe._routed is None  # the step took its routing: no graph kept between steps
    assert "training_step" not in moe.__dict__


@pytest.mark.parametrize(("expert_learning_rate", "expected"), [(None, 1e-3), (5e-5, 5e-5)])
def test_trainable_experts_get_their_own_learning_rate(expert_learning_rate, expected):
    moe = MoELightningModule(
        _random_experts(),
        top_k=2,
        input_shape=IMAGE,
        freeze_experts=False,
        learning_rate=1e-2,
        expert_learning_rate=expert_learning_rate,
    )
    gate, experts = moe.configure_optimizers().param_groups
    assert gate["lr"] == 1e-2 and experts["lr"] == pytest.approx(expected)
    assert {id(p) for p in experts["params"]} == {id(p) for p in moe.experts.parameters()}
    assert {id(p) for p in gate["params"]} == {id(p) for p in moe.gate.parameters() if p.requires_grad}
    frozen = MoELightningModule(_random_experts(), top_k=2, input_shape=IMAGE, learning_rate=1e-2)
    assert [g["lr"] for g in frozen.configure_optimizers().param_groups] == [1e-2]  # the gate alone


def test_artifact_and_checkpoint_experts(tmp_path):
    from lightning_hybridcomp.models import ImageClassifier

    torch.manual_seed(0)
    classifier = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=8, width=4).eval()
    ckpt = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, ckpt)
    artifact_model = TinyCNN(3).eval()
    meta = save_artifact(artifact_model, tmp_path / "tiny.pt2", torch.randn(2, *IMAGE))
    moe = MoELightningModule([str(ckpt), str(tmp_path / "tiny.pt2")]).eval()
    assert moe.hparams["input_shape"] == IMAGE  # recorded by both files
    assert moe.expert_macs[1] == meta.macs and moe.expert_sizes[1] == meta.size_bytes
    x = torch.randn(6, *IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts[0](x), classifier(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.experts[1](x), artifact_model(x), rtol=1e-5, atol=1e-6)


def test_pruned_checkpoint_expert_is_rebuilt_with_its_structure(tmp_path):
    from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model
    from lightning_hybridcomp.models import ImageClassifier

    pl.seed_everything(0)
    classifier = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=8, width=4)
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, verbose=False)
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[pruning])
    trainer.fit(classifier, DigitsDataModule(batch_size=32, image_size=8))
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    unpruned = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=8, width=4).eval()
    unpruned_macs = count_macs_and_params(unpruned, torch.randn(1, *IMAGE))[0]
    moe = MoELightningModule([str(tmp_path / "pruned.ckpt"), TinyCNN(2)]).eval()
    reference = load_pruned_model(tmp_path / "pruned.ckpt", ImageClassifier)
    x = torch.randn(4, *IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts[0](x), reference(x), rtol=1e-5, atol=1e-6)
    assert moe.expert_macs[0] < 0.5 * unpruned_macs


@pytest.mark.slow
def test_compiled_experts_give_the_same_predictions():
    moe = MoELightningModule(_random_experts(), top_k=2, input_shape=IMAGE).eval()
    _randomise_gate_(moe)
    x = torch.randn(12, *IMAGE)
    keys = list(moe.state_dict())
    with torch.no_grad():
        reference = moe(x)
        reference_routing = moe.route(x)[0].indices
        moe.compile_experts_(gate=False)
        assert moe._compiled_gate is None
        torch.testing.assert_close(moe(x), reference, rtol=1e-4, atol=1e-5)
        moe.compile_experts_()
        assert moe._compiled_gate is not None
        for n in (12, 5, 1):  # the gate compiles once for every batch size
            torch.testing.assert_close(moe(x[:n]), reference[:n], rtol=1e-4, atol=1e-5)
            assert torch.equal(moe.route(x[:n])[0].indices, reference_routing[:n])
    assert list(moe.state_dict()) == keys
    with pytest.raises(TypeError, match="`gate` to be a bool"):
        moe.compile_experts_(gate="yes")
    assert moe.train()(x).requires_grad  # training uses the exported graphs, with autograd


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_gate_training_reduces_figures_across_ranks(tmp_path):
    result = run_ddp_script(Path(__file__).with_name("_ddp_moe.py"), tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    val_size = len(dm.val_set)
    assert [r["local_val_samples"] for r in ranks] == [val_size // 2] * 2
    # Every rank reports figures over the whole validation set, identical to the last bit.
    assert ranks[0]["stats"] == ranks[1]["stats"]
    assert ranks[0]["stats"]["moe/samples"] == val_size
    assert ranks[0]["logged_load_0"] == pytest.approx(ranks[0]["stats"]["moe/expert_load/0"])
    assert ranks[0]["gate"] == ranks[1]["gate"]  # DDP kept the gate in sync
    assert all(r["experts_unchanged"] for r in ranks)


# ---------------------------------------------------------------------------------------------- bad input


def _experts_with(*extra: nn.Module) -> list[nn.Module]:
    return [*_random_experts((2, 2)), *extra]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(experts=[TinyCNN(2)]), ValueError, "at least two experts, got 1"),
        (dict(experts=TinyCNN(2)), TypeError, "Expected `experts` to be a list"),
        (dict(experts=[TinyCNN(2), 3]), TypeError, r"Expected experts\[1\] to be an nn.Module"),
        (dict(top_k=0), ValueError, r"Expected `top_k` to be an integer in \[1, 2\], got 0"),
        (dict(top_k=3), ValueError, r"Expected `top_k` to be an integer in \[1, 2\], got 3"),
        (dict(eval_top_k=3), ValueError, r"Expected `eval_top_k` to be an integer in \[1, 2\]"),
        (dict(balance_coefficient=-0.01), ValueError, "Expected `balance_coefficient` to be a non-negative"),
        (
            dict(importance_coefficient=-1.0),
            ValueError,
            "Expected `importance_coefficient` to be a non-negative",
        ),
        (dict(z_loss_coefficient=-1e-3), ValueError, "Expected `z_loss_coefficient` to be a non-negative"),
        (dict(weight_decay=-1.0), ValueError, "Expected `weight_decay` to be a non-negative"),
        (dict(learning_rate=0.0), ValueError, "Expected `learning_rate` to be a positive float"),
        (
            dict(expert_learning_rate=-1e-4),
            ValueError,
            "Expected `expert_learning_rate` to be a positive float or None",
        ),
        (dict(capacity_factor=0.0), ValueError, "Expected `capacity_factor` to be a positive float or None"),
        (
            dict(assignment_target="sharp"),
            ValueError,
            r"Expected `assignment_target` to be one of \('hard', 'soft', 'oracle', 'classes'\), got 'sharp'",
        ),
        (
            dict(assignment_target="classes"),
            ValueError,
            r"Expected `expert_classes` with assignment_target='classes': one list of class indices per expert",
        ),
        (
            dict(expert_classes=[[0], [1]]),
            ValueError,
            r"Expected `expert_classes` only with assignment_target='classes'.*got assignment_target='hard'",
        ),
        (
            dict(assignment_target="classes", expert_classes=[[0, 1]]),
            ValueError,
            r"Expected `expert_classes` to hold one list per expert \(2\), got 1",
        ),
        (
            dict(assignment_target="classes", expert_classes=[[0], [1, 1]]),
            ValueError,
            r"Expected `expert_classes\[1\]` to be a non-empty list of distinct class indices",
        ),
        (
            dict(assignment_target="classes", expert_classes=[[0], [3, 10]]),
            ValueError,
            r"Expected `expert_classes` to name classes below 10 \(the experts' class count\), got \[10\]",
        ),
        (dict(gate_channels=0), ValueError, r"Expected `gate_channels` to be an integer >= 1"),
        (dict(gate_input_size=0), ValueError, r"Expected `gate_input_size` to be an integer >= 1"),
        (dict(gate="mlp"), ValueError, "Expected `gate` to be one of 'cnn'"),
        (dict(gate="module"), ValueError, "Expected `gate` to be one of 'cnn'"),
        (
            dict(gate="expert:0", gate_channels=16),
            ValueError,
            r"Expected `gate_channels` only with gate='cnn'.*got gate_channels=16 with gate='expert:0'",
        ),
        (
            dict(gate="expert:1", gate_input_size=4),
            ValueError,
            r"Expected `gate_input_size` only with gate='cnn'",
        ),
        (
            dict(gate=GateNetwork(1, 2), gate_input_size=4),
            ValueError,
            "only with gate='cnn'.*a GateNetwork passed as `gate` has its own",
        ),
        (dict(gate="expert:7"), ValueError, "expert index must be below the number of experts"),
        (dict(gate=3), TypeError, "Expected `gate` to be one of"),
        (dict(input_shape=None), ValueError, "Expected `input_shape`"),
        (dict(input_shape=[1, 0, 8]), ValueError, "Expected `input_shape` to be a list of positive integers"),
        (dict(input_shape=[64]), ValueError, r"Expected `input_shape` to be \[channels, height, width\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"experts": _experts_with(), "input_shape": IMAGE, **kwargs}
    with pytest.raises(error, match=match):
        MoELightningModule(**args)


def test_eval_top_k_setter_validates_and_is_saved():
    moe = MoELightningModule(_experts_with(), input_shape=IMAGE, top_k=2)
    moe.eval_top_k = 1
    assert moe.hparams["eval_top_k"] == 1 and moe.eval().active_top_k == 1
    assert moe.train().active_top_k == 2
    with pytest.raises(ValueError, match=r"Expected `eval_top_k` to be an integer in \[1, 2\], got 3"):
        moe.eval_top_k = 3


def test_experts_with_different_class_counts_are_named():
    with pytest.raises(ValueError, match=r"same number of classes.*experts\[2\] \(TinyCNN\) differs"):
        MoELightningModule(_experts_with(TinyCNN(2, num_classes=5)), input_shape=IMAGE)


def test_expert_that_rejects_the_input_shape_is_named():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))  # expects 1x16x16
    with pytest.raises(
        ValueError, match=r"experts\[2\] \(Sequential\) does not accept inputs of shape \(2, 1, 8, 8\)"
    ):
        MoELightningModule(_experts_with(flat), input_shape=IMAGE)


def test_experts_recording_different_input_shapes_are_named(tmp_path):
    save_artifact(TinyCNN(2).eval(), tmp_path / "a.pt2", torch.randn(2, 1, 8, 8))
    save_artifact(TinyCNN(2).eval(), tmp_path / "b.pt2", torch.randn(2, 1, 12, 12))
    files = [str(tmp_path / "a.pt2"), str(tmp_path / "b.pt2")]
    with pytest.raises(
        ValueError, match=r"same input shape.*takes \[1, 8, 8\] and experts\[1\] \('.*b.pt2'\)"
    ):
        MoELightningModule(files)
    with pytest.raises(
        ValueError, match=r"`input_shape`=\[1, 8, 8\], but experts\[1\] \('.*b.pt2'\) records"
    ):
        MoELightningModule(files, input_shape=IMAGE)


def test_missing_and_unsupported_expert_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"experts\[0\] \('.*nope.pt2'\) to be an existing file"):
        MoELightningModule([str(tmp_path / "nope.pt2"), TinyCNN(2)], input_shape=IMAGE)
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"experts\[1\] \('.*weights.txt'\) to be a supported expert format"):
        MoELightningModule([TinyCNN(2), str(tmp_path / "weights.txt")], input_shape=IMAGE)
    (tmp_path / "fake.pt2").write_bytes(b"not an archive")
    with pytest.raises(
        ValueError, match=r"Could not load experts\[1\] \('.*fake.pt2'\) as a compressed-model"
    ):
        MoELightningModule([TinyCNN(2), str(tmp_path / "fake.pt2")], input_shape=IMAGE)
    (tmp_path / "broken.ckpt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ValueError, match=r"Could not read experts\[1\] \('.*broken.ckpt'\)"):
        MoELightningModule([TinyCNN(2), str(tmp_path / "broken.ckpt")], input_shape=IMAGE)
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(ValueError, match=r"experts\[1\] \('.*tensor.ckpt'\) to be a Lightning checkpoint"):
        MoELightningModule([TinyCNN(2), str(tmp_path / "tensor.ckpt")], input_shape=IMAGE)
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint of `lightning_hybridcomp.models.ImageClassifier`"):
        MoELightningModule([TinyCNN(2), str(tmp_path / "other.ckpt")], input_shape=IMAGE)


def test_unexportable_expert_and_headless_feature_gate_are_named():
    with pytest.raises(ValueError, match=r"Could not export experts\[2\] \(BranchyNet\)"):
        MoELightningModule(_experts_with(BranchyNet()), input_shape=IMAGE)
    pooled = nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(
        ValueError, match=r"Expected experts\[2\] \(Sequential\) to end in a linear classifier head"
    ):
        MoELightningModule(_experts_with(pooled), input_shape=IMAGE, gate="expert:2")


def test_gate_module_with_wrong_output_is_an_error():
    with pytest.raises(ValueError, match=r"gate module to return logits of shape \[batch, 2\]"):
        MoELightningModule(
            _experts_with(), input_shape=IMAGE, gate=nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
        )
    with pytest.raises(ValueError, match="The gate module does not accept inputs"):
        MoELightningModule(_experts_with(), input_shape=IMAGE, gate=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="The gate module does not accept inputs"):
        MoELightningModule(_experts_with(), input_shape=IMAGE, gate=GateNetwork(in_channels=3, num_experts=2))
    with pytest.raises(
        ValueError,
        match=r"Expected the gate GateNetwork to return \(logits, noise_std\) with logits of shape \[batch, 2\]",
    ):
        MoELightningModule(_experts_with(), input_shape=IMAGE, gate=GateNetwork(in_channels=1, num_experts=5))


def test_cnn_gate_options_at_their_defaults_go_with_any_gate():
    # Configurations that spell out the defaults keep working with the other gates.
    moe = MoELightningModule(
        _experts_with(), input_shape=IMAGE, gate="expert:1", gate_channels=8, gate_input_size=None
    )
    assert moe.hparams["gate"] == "expert:1"
    cnn = MoELightningModule(_experts_with(), input_shape=IMAGE, gate_channels=4, gate_input_size=4)
    assert isinstance(cnn.gate, GateNetwork) and (cnn.gate.channels, cnn.gate.input_size) == (4, 4)
