"""Tests of ``StructuredPruning`` and ``load_pruned_model`` with real Trainer runs on tiny networks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp._io import UnreadableCheckpointError
from lightning_hybridcomp._lightning import make_example, optimizer_parameters, unwrap_optimizer
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.pruned_checkpoints import STATE_NAME, apply_structure_
from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model
from lightning_hybridcomp.models import build_backbone
from tests._helpers import ClassifierSteps, fast_trainer, random_classification_data, run_ddp_script
from tests._reference import reference_macs, reference_params

NUM_CLASSES = 10


class Classifier(ClassifierSteps):
    """A plain user LightningModule around a backbone (deliberately not the package's ImageClassifier)."""

    def __init__(
        self,
        backbone: str = "small_cnn",
        in_channels: int = 1,
        image_size: int = 16,
        optimizer: str = "sgd",
        lr: float = 0.05,
        samples: int = 16,
        with_example: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backbone == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Flatten(),
                nn.Linear(in_channels * image_size * image_size, 64),
                nn.ReLU(),
                nn.Linear(64, 32),
                nn.ReLU(),
                nn.Linear(32, NUM_CLASSES),
            )
        else:
            self.net = build_backbone(backbone, NUM_CLASSES, in_channels, width=8)
        if with_example:
            self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.hparams.lr)
        else:
            opt = torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}

    def _data(self, seed: int) -> TensorDataset:
        c, s, n = self.hparams.in_channels, self.hparams.image_size, self.hparams.samples
        return random_classification_data(n, (c, s, s), num_classes=NUM_CLASSES, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._data(0), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data(1), batch_size=8)


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    options = {"num_sanity_val_steps": 0, "limit_val_batches": 1, **kwargs}
    return fast_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **options)


def _costs(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """MACs and params by the layer-by-layer reference count (independent of the package's counter)."""
    return reference_macs(model, torch.zeros(*shape)), reference_params(model)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("backbone", "image_size", "in_channels"),
    [
        ("small_cnn", 16, 1),
        ("resnet20", 16, 3),
        ("resnet18", 32, 3),
        ("mobilenet_v3_small", 32, 3),
        ("mlp", 8, 1),
    ],
)
def test_macs_and_params_drop_to_target(
    tmp_path: Path, backbone: str, image_size: int, in_channels: int
) -> None:
    torch.manual_seed(0)
    model = Classifier(backbone, in_channels=in_channels, image_size=image_size)
    shape = (1, in_channels, image_size, image_size)
    macs0, params0 = _costs(model.net, shape)
    pruning = StructuredPruning(pruning_ratio=0.5, target="macs", iterative_steps=2)
    trainer = _trainer(tmp_path, [pruning], max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model)

    macs, params = _costs(model.net, shape)
    assert pruning.finished and pruning.steps_done == 2
    assert 0.40 <= macs / macs0 <= 0.50  # reached, without overshooting by more than a few micro-steps
    assert params < params0
    # The classifier head is detected and kept, so the model still predicts every class.
    assert model.eval()(torch.zeros(*shape)).shape == (1, NUM_CLASSES)
    # The figures the callback reports agree with the independent count.
    assert pruning.step_summaries[-1]["macs"] == macs
    assert trainer.callback_metrics["pruning/macs_ratio"].item() == pytest.approx(macs / macs0, rel=1e-5)
    assert trainer.callback_metrics["pruning/params"].item() == pytest.approx(params)
    assert trainer.callback_metrics["pruning/step"].item() == 2


def test_channel_ratio_removes_half_of_every_layer(tmp_path: Path) -> None:
    model = Classifier("small_cnn")
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=1, epochs_between_steps=2)
    trainer = _trainer(tmp_path, [pruning], max_epochs=5, limit_train_batches=1)
    trainer.fit(model)
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8]  # width 8 -> 4, 16 -> 8
    assert model.net.classifier.in_features == 8 and model.net.classifier.out_features == NUM_CLASSES
    assert [s["epoch"] for s in pruning.step_summaries] == [1, 3]
    assert pruning.last_step_epoch == 3


def test_unreachable_target_warns_once_and_stops(tmp_path: Path) -> None:
    model = Classifier("small_cnn")
    pruning = StructuredPruning(pruning_ratio=0.95, target="MACs", iterative_steps=2, max_layer_ratio=0.5)
    with pytest.warns(
        UserWarning, match=r"cannot reach `pruning_ratio`=0.95 of the macs \(keep 0.05x\)"
    ) as record:
        _trainer(tmp_path, [pruning], max_epochs=3, limit_train_batches=1).fit(model)
    assert sum("cannot reach" in str(w.message) for w in record) == 1
    assert pruning.finished
    convs = [m.out_channels for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [4, 4, 8, 8]  # every layer stopped at its 50% cap


@pytest.mark.parametrize("global_pruning", [False, True])
def test_layer_selection_round_to_and_max_layer_ratio(tmp_path: Path, global_pruning: bool) -> None:
    model = Classifier("resnet20", image_size=8)
    pruning = StructuredPruning(
        pruning_ratio=0.7,
        iterative_steps=2,
        global_pruning=global_pruning,
        ignored_layers=["net.conv1", "net.layer3.*.conv1"],
        round_to=2,
        max_layer_ratio=0.5,
    )
    _trainer(tmp_path, [pruning], max_epochs=3, limit_train_batches=1).fit(model)
    before = {
        n: m.out_channels
        for n, m in Classifier("resnet20", image_size=8).named_modules()
        if isinstance(m, nn.Conv2d)
    }
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # Ignored by name and by glob: their channels stay, and so do the channels coupled to them through the
    # residual additions (the stem feeds layer1's shortcuts).
    assert after["net.conv1"] == before["net.conv1"]
    assert all(after[f"net.layer3.{i}.conv1"] == 64 for i in range(3))
    pruned = [n for n in after if after[n] < before[n]]
    assert pruned  # something was pruned
    for name in after:
        assert after[name] % 2 == 0
        # The per-layer cap holds (global ranking: torch-pruning checks it before each ~1% micro-step).
        assert after[name] >= before[name] * 0.5 - (0.01 * before[name] + 2 if global_pruning else 0)
    assert sum(after.values()) < sum(before.values())


# ---------------------------------------------------------------------------------------------- criteria


@pytest.mark.parametrize(
    "importance", ["l1", "l2", "taylor", "bn_scale", "lamp", "fpgm", "random", "instance", "L1"]
)
def test_every_importance_prunes(tmp_path: Path, importance: str) -> None:
    torch.manual_seed(0)
    model = Classifier("small_cnn")
    criterion: Any = (
        tp.importance.GroupMagnitudeImportance(p=2, group_reduction="max")
        if importance == "instance"
        else importance
    )
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, importance=criterion)
    _trainer(tmp_path, [pruning], max_epochs=2, limit_train_batches=2).fit(model)
    convs = [m.out_channels for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [4, 4, 8, 8]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_taylor_uses_the_training_gradients(tmp_path: Path) -> None:
    """Taylor picks the channels with the smallest |w * grad| summed over the epoch's batches."""

    class Recorder(pl.Callback):
        grads: dict[str, Tensor] = {}
        weights: dict[str, Tensor] = {}

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
        ) -> None:
            if trainer.current_epoch == 0:
                for n, p in pl_module.named_parameters():
                    self.grads[n] = self.grads.get(n, torch.zeros_like(p)) + p.grad.detach()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 0:
                self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    model = Classifier("mlp", image_size=8)
    recorder = Recorder()
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1, importance="taylor")
    _trainer(tmp_path, [recorder, pruning], max_epochs=2, limit_train_batches=2).fit(model)
    # Reference: group Taylor score of fc1's outputs = mean over the coupled layers (fc1 rows, fc2 columns).
    w1, g1 = recorder.weights["net.1.weight"], recorder.grads["net.1.weight"]
    w2, g2 = recorder.weights["net.3.weight"], recorder.grads["net.3.weight"]
    score = ((w1 * g1).abs().sum(1) + (w2 * g2).abs().sum(0)) / 2
    expected_kept = torch.sort(torch.argsort(score, descending=True)[:32]).values
    history = pruning.pruning_history()
    removed = next(r[2] for r in history if r[0] == "net.1")
    kept = torch.tensor(sorted(set(range(64)) - set(removed)))
    assert torch.equal(kept, expected_kept)


@pytest.mark.parametrize("pruner", ["group_norm", "bn_scale", "growing_reg"])
def test_regularizing_pruners_edit_gradients_before_the_optimizer_step(tmp_path: Path, pruner: str) -> None:
    class GradProbe(pl.Callback):
        def __init__(self) -> None:
            self.raw: dict[str, Tensor] = {}
            self.changed: list[bool] = []

        def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.raw = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
        ) -> None:
            self.changed.append(
                any(
                    not torch.equal(p.grad, self.raw[n])
                    for n, p in pl_module.named_parameters()
                    if n in self.raw
                )
            )

    probe = GradProbe()
    model = Classifier("small_cnn")
    pruning = StructuredPruning(
        pruning_ratio=0.5, iterative_steps=1, start_epoch=1, pruner=pruner, regularization=1e-2
    )
    _trainer(tmp_path, [pruning, probe], max_epochs=3, limit_train_batches=2).fit(model)
    # Regularised in epoch 0 (two optimizer steps), plain gradients once the only step is done.
    assert probe.changed[:2] == [True, True]
    assert not any(probe.changed[2:])
    assert [m.out_channels for m in model.net.modules() if isinstance(m, nn.Conv2d)] == [4, 4, 8, 8]


# ---------------------------------------------------------------------------------------------- training state


class StateProbe(pl.Callback):
    """Before the pruning callback: tags optimizer moments with the parameter values. After it: checks them."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def tag(self, trainer: pl.Trainer) -> None:
        opt = unwrap_optimizer(trainer.optimizers[0])
        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state:
                    opt.state[p]["exp_avg"] = p.detach().clone()
                    opt.state[p]["exp_avg_sq"] = p.detach().abs().clone()
        self.lr = opt.param_groups[0]["lr"]
        self.sched_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = unwrap_optimizer(trainer.optimizers[0])
        held = {id(p) for p in optimizer_parameters(trainer)}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        carried = [
            torch.equal(opt.state[p]["exp_avg"], p.detach())
            and torch.equal(opt.state[p]["exp_avg_sq"], p.detach().abs())
            for p in pl_module.parameters()
            if p in opt.state
        ]
        self.checks.append(
            {
                "optimizer_is_model": held == trainable,
                "carried": carried,
                "lr_kept": opt.param_groups[0]["lr"] == self.lr,
                "scheduler_kept": trainer.lr_scheduler_configs[0].scheduler.last_epoch == self.sched_epoch,
                "train_mode": all(m.training for m in pl_module.modules()),
                "frozen": not pl_module.net.features[0].weight.requires_grad,
            }
        )


def test_optimizer_holds_current_parameters_and_carries_state(tmp_path: Path) -> None:
    class Before(pl.Callback):
        def __init__(self, probe: StateProbe) -> None:
            self.probe = probe

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch > 0:
                self.probe.tag(trainer)

    class After(pl.Callback):
        def __init__(self, probe: StateProbe) -> None:
            self.probe = probe

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch > 0:
                self.probe.check(trainer, pl_module)

    model = Classifier("small_cnn", optimizer="adam")
    model.net.features[0].weight.requires_grad_(False)  # a frozen layer stays frozen after pruning
    probe = StateProbe()
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=1)
    _trainer(tmp_path, [Before(probe), pruning, After(probe)], max_epochs=4, limit_train_batches=2).fit(model)

    assert len(probe.checks) == 3  # epochs 1, 2 (pruning steps) and 3 (no step)
    for check in probe.checks:
        assert check["optimizer_is_model"]
        assert check["carried"] and all(check["carried"])  # Adam moments sliced exactly like the weights
        assert check["lr_kept"] and check["scheduler_kept"]
        assert check["train_mode"]  # tracing switched to eval mode; the callback switched back
        assert check["frozen"]
    assert pruning.steps_done == 2


# ---------------------------------------------------------------------------------------------- checkpoints


class StopAfter(pl.Callback):
    """Stops the run at the end of an epoch, like an interrupted job."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _fit_with_checkpoints(
    tmp_path: Path, stop_after: int | None = None, ckpt_path: str | None = None, **pruning_kwargs: Any
) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = Classifier("resnet20", in_channels=1, image_size=16)
    pruning = StructuredPruning(
        **(pruning_kwargs or {"pruning_ratio": 0.5}), iterative_steps=3, start_epoch=0
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    callbacks: list[pl.Callback] = [pruning, checkpoint]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = _trainer(tmp_path, callbacks, max_epochs=4, enable_checkpointing=True, limit_train_batches=2)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, pruning, trainer


@pytest.mark.parametrize(
    "pruning_kwargs",
    [
        {"pruning_ratio": 0.5},
        {"pruning_ratio": 0.6, "target": "macs", "global_pruning": True, "importance": "lamp"},
    ],
    ids=["ratio-per-layer", "macs-global"],
)
def test_resume_mid_pruning_equals_uninterrupted_run(tmp_path: Path, pruning_kwargs: dict[str, Any]) -> None:
    full_model, full_pruning, _ = _fit_with_checkpoints(tmp_path / "full", **pruning_kwargs)

    with pytest.warns(UserWarning, match="ended after 2 of 3 pruning steps"):
        # Interrupted after 2 of the 3 steps.
        _fit_with_checkpoints(tmp_path / "part", stop_after=1, **pruning_kwargs)
    mid = tmp_path / "part" / "ckpt" / "epoch=1.ckpt"
    state = torch.load(mid, weights_only=True)["callbacks"]["StructuredPruning"]
    assert state["steps_done"] == 2
    resumed_model, resumed_pruning, _ = _fit_with_checkpoints(
        tmp_path / "part", ckpt_path=str(mid), **pruning_kwargs
    )

    assert resumed_pruning.steps_done == full_pruning.steps_done == 3
    assert _shapes(resumed_model) == _shapes(full_model)
    assert resumed_pruning.pruning_history() == full_pruning.pruning_history()
    assert _costs(resumed_model.net, (1, 1, 16, 16)) == _costs(full_model.net, (1, 1, 16, 16))
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(resumed_model.eval()(x), full_model.eval()(x))


def test_pruned_checkpoint_reloads_with_identical_outputs(tmp_path: Path) -> None:
    model, pruning, _ = _fit_with_checkpoints(tmp_path)
    last = tmp_path / "ckpt" / "epoch=3.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # plain data only
    assert checkpoint["callbacks"]["StructuredPruning"]["history"] == pruning.pruning_history()
    x = torch.randn(4, 1, 16, 16)
    expected = model.eval()(x)

    from_class = load_pruned_model(last, Classifier)
    from_instance = load_pruned_model(last, Classifier("resnet20", in_channels=1, image_size=16))
    assert torch.equal(from_class(x), expected)
    assert torch.equal(from_instance(x), expected)
    assert not from_class.training
    # LightningCLI adds private keys such as `_instantiator` to the hyper-parameters
    checkpoint["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    cli_style = tmp_path / "cli.ckpt"
    torch.save(checkpoint, cli_style)
    assert torch.equal(load_pruned_model(cli_style, Classifier)(x), expected)

    # validate/test/predict(ckpt_path=...) on a fresh model work with the callback in the Trainer.
    loader = DataLoader(TensorDataset(x), batch_size=4)
    fresh = Classifier("resnet20", in_channels=1, image_size=16)
    evaluator = _trainer(tmp_path, [StructuredPruning(pruning_ratio=0.5, iterative_steps=3)], max_epochs=1)
    predictions = evaluator.predict(fresh, dataloaders=loader, ckpt_path=str(last))
    assert torch.equal(predictions[0], expected)
    metrics = evaluator.validate(Classifier("resnet20", in_channels=1, image_size=16), ckpt_path=str(last))
    assert torch.isfinite(torch.tensor(metrics[0]["val_loss"]))
    # A second load into the already pruned model is a no-op, never a second pruning.
    evaluator.validate(fresh, ckpt_path=str(last))
    assert _shapes(fresh) == _shapes(model)


# ---------------------------------------------------------------------------------------------- interplay


def test_checkpoint_early_stopping_accumulation_and_bf16(tmp_path: Path) -> None:
    model = Classifier("small_cnn")
    pruning = StructuredPruning(pruning_ratio=0.5, target="params", iterative_steps=2, start_epoch=1)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", mode="min", save_top_k=1)
    stop = EarlyStopping(monitor="val_loss", patience=2, mode="min")
    trainer = _trainer(
        tmp_path,
        [pruning, best, stop],
        max_epochs=4,
        enable_checkpointing=True,
        limit_train_batches=2,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
    )
    trainer.fit(model)
    assert pruning.finished
    # After a step the pre-pruning scores no longer compete: the best checkpoint has the final structure.
    best_model = load_pruned_model(best.best_model_path, Classifier)
    assert _shapes(best_model) == _shapes(model)
    _, params = _costs(model.net, (1, 1, 16, 16))
    _, params0 = _costs(Classifier("small_cnn").net, (1, 1, 16, 16))
    assert params <= 0.5 * params0


def test_compiled_module_is_pruned_and_recompiled(tmp_path: Path) -> None:
    torch._dynamo.reset()
    model = Classifier("small_cnn")
    compiled = torch.compile(model, backend="eager")  # compile first, prune during fit: see docs/pruning.md
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1, start_epoch=1)
    _trainer(tmp_path, [pruning], max_epochs=2, limit_train_batches=2).fit(compiled)
    assert [m.out_channels for m in model.net.modules() if isinstance(m, nn.Conv2d)] == [4, 4, 8, 8]
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model.net(x))
    torch._dynamo.reset()


@pytest.mark.slow
def test_ddp_two_processes_agree(tmp_path: Path) -> None:
    result = run_ddp_script(Path(__file__).with_name("_ddp_pruning.py"), tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["steps_done"] == rank1["steps_done"] == 2
    assert rank0["history"] == rank1["history"] and rank0["history"]
    assert rank0["shapes"] == rank1["shapes"]
    assert rank0["digest"] == rank1["digest"]  # identical weights on both ranks
    assert rank0["digest"] != rank0["digest_after_last_step"]  # and training went on after the last step
    assert all(rank0["optimizer_matches"]) and all(rank1["optimizer_matches"])


@pytest.mark.slow
def test_ddp_ranks_that_disagree_fail_together(tmp_path: Path) -> None:
    """Negative control for the test above: without averaged scores the ranks prune differently."""
    result = run_ddp_script(
        Path(__file__).with_name("_ddp_pruning.py"),
        tmp_path,
        timeout=300,
        env={"HYBRIDCOMP_TEST_NO_AGREEMENT": "1"},
    )
    assert result.returncode != 0
    assert "the ranks removed different channels" in result.stderr


@pytest.mark.parametrize(
    ("kwargs", "label", "cost_target"),
    [
        ({}, "prune:l1:0.5", None),
        ({"pruning_ratio": 0.3, "importance": "L2"}, "prune:l2:0.3", None),
        (
            {"pruning_ratio": 0.8, "target": "MACs", "importance": "lamp"},
            "prune:lamp:macs=0.8",
            ("macs", 0.2),
        ),
        ({"pruning_ratio": 0.25, "target": "params"}, "prune:l1:params=0.25", ("params", 0.75)),
    ],
)
def test_one_ratio_with_a_target_kind(kwargs, label, cost_target):
    pruning = StructuredPruning(**kwargs)
    assert pruning.step_label == label
    kept = pruning._settings.cost_target
    assert (kept is None) == (cost_target is None)
    if cost_target is not None:
        assert kept[0] == cost_target[0] and kept[1] == pytest.approx(cost_target[1])
        assert pruning._settings.channel_ratio is None


def test_removed_target_arguments_name_the_new_ones():
    with pytest.raises(TypeError, match="target_macs_ratio"):
        StructuredPruning(target_macs_ratio=0.3)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pruning_ratio": 1.0}, ValueError, r"`pruning_ratio` to be a float in \[0, 1\)"),
        ({"pruning_ratio": -0.1}, ValueError, r"`pruning_ratio`"),
        ({"target": "flops"}, ValueError, r"`target` to be one of \('channels', 'macs', 'params'\)"),
        ({"target": 3}, TypeError, "`target` to be a string"),
        (
            {"pruning_ratio": 1.0, "target": "macs"},
            ValueError,
            r"`pruning_ratio`.*fraction of the original macs",
        ),
        ({"pruning_ratio": None}, ValueError, "`pruning_ratio`"),
        ({"importance": "l3"}, ValueError, r"`importance` to be .* one of"),
        ({"importance": nn.Linear(1, 1)}, TypeError, r"`importance` to be a name or"),
        ({"pruner": "magnitude"}, ValueError, r"`pruner` to be one of"),
        ({"regularization": 1e-4}, ValueError, r"`regularization` to be None for pruner 'base'"),
        ({"pruner": "group_norm", "regularization": -1.0}, ValueError, r"`regularization` to be a positive"),
        ({"iterative_steps": 0}, ValueError, r"`iterative_steps` to be an integer >= 1"),
        ({"start_epoch": -1}, ValueError, r"`start_epoch`"),
        ({"epochs_between_steps": 0}, ValueError, r"`epochs_between_steps`"),
        ({"round_to": 0}, ValueError, r"`round_to`"),
        ({"max_layer_ratio": 0.0}, ValueError, r"`max_layer_ratio`"),
        ({"example_input_shape": [1, 0, 4]}, ValueError, r"`example_input_shape`"),
        (
            {"ignored_layers": [nn.Linear(1, 1)]},
            TypeError,
            r"`ignored_layers` to be a list of fully qualified",
        ),
        (
            {"ignored_layers": "net.fc"},
            TypeError,
            r"`ignored_layers` .* got the string 'net.fc'; write \['net.fc'\]",
        ),
        ({"network": nn.Linear(1, 1)}, TypeError, r"`network` to be the fully qualified name"),
        ({"global_pruning": "yes"}, TypeError, r"`global_pruning`"),
        ({"importance": "taylor"}, ValueError, r"`start_epoch` >= 1 with Taylor"),
    ],
)
def test_bad_arguments_raise_eagerly(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        StructuredPruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"network": "backbone"}, r"Expected `network` to be the fully qualified name"),
        ({"ignored_layers": ["net.head*"]}, r"`ignored_layers` to match .* 'net.head\*' matches nothing"),
        ({"network": "net.features"}, r"Expected `example_input_shape` for network 'net.features'"),
        ({"ignored_layers": ["net.*"]}, r"to contain prunable layers"),
        ({"iterative_steps": 3, "start_epoch": 1}, r"falls at epoch 3.*max_epochs"),
    ],
)
def test_bad_configuration_raises_before_any_pruning(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    model = Classifier("small_cnn")
    reference = _shapes(model)
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [StructuredPruning(**kwargs)], max_epochs=3, limit_train_batches=1).fit(model)
    assert _shapes(model) == reference  # nothing half-pruned


def test_lightning_model_pruning_in_the_same_run_is_refused(tmp_path: Path) -> None:
    callbacks = [StructuredPruning(), ModelPruning("l1_unstructured", amount=0.5)]
    with pytest.raises(ValueError, match="not to contain Lightning's `ModelPruning`"):
        _trainer(tmp_path, callbacks, max_epochs=3).fit(Classifier())
    # Two instances would share one checkpoint entry; Lightning itself refuses that.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `StructuredPruning`"):
        _trainer(tmp_path, [StructuredPruning(), StructuredPruning()], max_epochs=3)


def test_spawning_strategy_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [StructuredPruning()], max_epochs=3, strategy="ddp_fork", devices=1)
    with pytest.raises(Exception, match="does not spawn worker processes"):
        trainer.fit(Classifier())


def test_batch_layout_without_inputs_raises(tmp_path: Path) -> None:
    class DictBatches(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch["pixels"]), batch["label"])

        def train_dataloader(self) -> DataLoader:
            x, y = self._data(0).tensors
            return DataLoader([{"pixels": a, "label": b} for a, b in zip(x, y)], batch_size=8)

    model = DictBatches(with_example=False)
    with pytest.raises(RuntimeError, match=r"Could not find the input tensor .* pass `example_input_shape`"):
        _trainer(tmp_path, [StructuredPruning()], max_epochs=3, limit_val_batches=0).fit(model)
    # The documented fix: give the shape explicitly.
    model = DictBatches(with_example=False)
    pruning = StructuredPruning(iterative_steps=1, example_input_shape=[1, 1, 16, 16])
    _trainer(tmp_path, [pruning], max_epochs=2, limit_val_batches=0, limit_train_batches=1).fit(model)
    assert pruning.steps_done == 1


@pytest.mark.parametrize("callback", ["pruning", "qat"])
def test_example_input_array_of_several_inputs_is_refused_before_training(
    tmp_path: Path, callback: str
) -> None:
    from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining

    def make() -> pl.Callback:
        if callback == "pruning":
            return StructuredPruning(iterative_steps=1)
        return QuantizationAwareTraining(start_epoch=0, convert_on_fit_end=False)

    class TwoInputs(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = (torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            raise AssertionError("training started")

    with pytest.raises(
        TypeError, match=r"`TwoInputs.example_input_array` to be one input tensor, got a tuple of 2"
    ):
        _trainer(tmp_path, [make()], max_epochs=2, limit_train_batches=1).fit(TwoInputs())

    # A one-item tuple or mapping is that input: the run is the run of the tensor.
    class OneItemTuple(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = (torch.zeros(1, 1, 16, 16),)

    class OneKeyMapping(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = {"x": torch.zeros(1, 1, 16, 16)}

    runs = []
    for model in (OneItemTuple(), OneKeyMapping(), Classifier()):
        torch.manual_seed(0)
        model.load_state_dict(Classifier().state_dict())
        _trainer(tmp_path, [make()], max_epochs=2, limit_train_batches=1).fit(model)
        runs.append(model)
    x = torch.randn(3, 1, 16, 16)
    for run in runs[:2]:
        assert _shapes(run) == _shapes(runs[2])
        assert torch.equal(run.eval()(x), runs[2].eval()(x))


class BuiltInConfigureModel(Classifier):
    """A module that builds its network in `configure_model`, which Lightning calls after every `setup`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None  # type: ignore[assignment]

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build_backbone("small_cnn", NUM_CLASSES, 1, width=8)


class BuiltInSetup(Classifier):
    """A module that builds its network in its own `setup`, which Lightning calls after the callbacks'."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None  # type: ignore[assignment]

    def setup(self, stage: str) -> None:
        if self.net is None:
            self.net = build_backbone("small_cnn", NUM_CLASSES, 1, width=8)


@pytest.mark.parametrize("built_in", [BuiltInConfigureModel, BuiltInSetup], ids=["configure_model", "setup"])
def test_layer_names_of_a_network_built_after_the_callbacks_setup(tmp_path: Path, built_in: type) -> None:
    from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining

    last = [n for n, m in build_backbone("small_cnn", NUM_CLASSES, 1, width=8).named_modules() if m][-1]
    model = built_in()
    pruning = StructuredPruning(iterative_steps=1, ignored_layers=[f"net.{last}"])
    qat = QuantizationAwareTraining(module="net", start_epoch=1)
    _trainer(tmp_path, [pruning, qat], max_epochs=2, limit_train_batches=1).fit(model)
    assert pruning.steps_done == 1 and qat.stage == "converted"
    assert [name for name, _ in model.named_children()] == ["net"]  # QAT hosted `net`, not the whole module

    # A wrong name is refused before training, among the names the built network has.
    with pytest.raises(
        ValueError, match=r"'net\.nope' matches nothing.* look like \['net', 'net\.features',"
    ):
        _trainer(tmp_path, [StructuredPruning(ignored_layers=["net.nope"])], max_epochs=4).fit(built_in())
    with pytest.raises(ValueError, match=r"got 'nope'\. Top-level submodules: \['net'\]"):
        _trainer(tmp_path, [QuantizationAwareTraining(module="nope")], max_epochs=2).fit(
            BuiltInConfigureModel()
        )


def test_taylor_without_training_gradients_raises(tmp_path: Path) -> None:
    class NoSteps(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            return None

    pruning = StructuredPruning(importance="taylor", iterative_steps=1, start_epoch=1)
    with pytest.raises(RuntimeError, match="Taylor importance needs gradients"):
        _trainer(tmp_path, [pruning], max_epochs=2, limit_train_batches=1).fit(NoSteps())


def test_restoring_into_a_differently_pruned_model_raises(tmp_path: Path) -> None:
    model, _, _ = _fit_with_checkpoints(tmp_path)
    earlier = tmp_path / "ckpt" / "epoch=0.ckpt"  # one step; `model` carries three
    evaluator = _trainer(tmp_path, [StructuredPruning(pruning_ratio=0.5, iterative_steps=3)], max_epochs=1)
    with pytest.raises(RuntimeError, match="cannot be restored in place"):
        evaluator.validate(model, ckpt_path=str(earlier))
    other_network = _trainer(tmp_path, [StructuredPruning(network="net")], max_epochs=1)
    with pytest.raises(RuntimeError, match="pruned on network ''"):
        other_network.validate(Classifier("resnet20", in_channels=1, image_size=16), ckpt_path=str(earlier))


def test_reusing_a_callback_for_another_model_raises(tmp_path: Path) -> None:
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=1)
    _trainer(tmp_path, [pruning], max_epochs=2, limit_train_batches=1).fit(Classifier())
    with pytest.raises(RuntimeError, match="Use a new StructuredPruning instance"):
        _trainer(tmp_path, [pruning], max_epochs=2, limit_train_batches=1).fit(Classifier())


def test_load_pruned_model_bad_input(tmp_path: Path) -> None:
    plain = _trainer(tmp_path, [], max_epochs=1, limit_train_batches=1, enable_checkpointing=True)
    plain.fit(Classifier())
    unpruned = plain.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="has no StructuredPruning state"):
        load_pruned_model(unpruned, Classifier)

    class NoHparams(Classifier):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint.pop("hyper_parameters", None)

    pruning = StructuredPruning(iterative_steps=1)
    trainer = _trainer(
        tmp_path / "b", [pruning], max_epochs=2, limit_train_batches=1, enable_checkpointing=True
    )
    trainer.fit(NoHparams())
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    # Without hyper-parameters a class is built from its defaults, as `load_from_checkpoint` builds it; one
    # with a required argument cannot be built from the checkpoint.
    from_defaults = load_pruned_model(path, NoHparams)
    assert _shapes(from_defaults) == _shapes(load_pruned_model(path, NoHparams())) != _shapes(Classifier())

    class NeedsWidth(NoHparams):
        def __init__(self, width: int) -> None:
            super().__init__()

    with pytest.raises(
        ValueError, match=r"hold `hyper_parameters` to construct NeedsWidth, which requires \['width'\]"
    ):
        load_pruned_model(path, NeedsWidth)
    with pytest.raises(TypeError, match="LightningModule class or an instance"):
        load_pruned_model(path, nn.Linear)
    with pytest.raises(TypeError, match=r"LightningModule class or an nn\.Module"):
        load_pruned_model(path, 42)  # type: ignore[arg-type]

    # Another architecture: other layer names, or the same names with fewer channels.
    saved = Path(path).read_bytes()
    with pytest.raises(ValueError, match=r"does not have .*written for another architecture"):
        load_pruned_model(path, Classifier("mlp"))
    narrow = Classifier()
    narrow.net = build_backbone("small_cnn", NUM_CLASSES, 1, width=2)
    with pytest.raises(ValueError, match="another architecture"):
        load_pruned_model(path, narrow)
    with pytest.raises(ValueError, match=r"does not have .*written for another architecture"):
        _trainer(tmp_path / "c", [StructuredPruning(iterative_steps=1)], max_epochs=1).validate(
            Classifier("mlp"), ckpt_path=path
        )
    # Missing, truncated and non-checkpoint files: one clear error naming the file, which is left as it was.
    with pytest.raises(ValueError, match="`checkpoint_path` to be an existing file"):
        load_pruned_model(tmp_path / "nope.ckpt", Classifier)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(UnreadableCheckpointError, match=r"truncated\.ckpt'.*truncated or corrupt"):
        load_pruned_model(truncated, Classifier)
    assert truncated.read_bytes() == saved[: len(saved) // 2]
    assert Path(path).read_bytes() == saved


def test_private_guards() -> None:
    with pytest.raises(ValueError, match="torch dtype name"):
        make_example([1, 2], "torch.notatype", torch.device("cpu"))
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_structure_(net, [["0", True, [0, 1]]], torch.zeros(1, 4))
    assert net[0].out_features == 6 and net[2].in_features == 6
    assert apply_structure_(net, [["0", True, [0, 1]]], torch.zeros(1, 4)) == 0  # idempotent
    with pytest.raises(RuntimeError, match="cannot be restored in place"):
        apply_structure_(net, [["0", True, [2]]], torch.zeros(1, 4))


def test_the_callback_fulfils_the_contract_quantization_reads() -> None:
    pruning = StructuredPruning()
    assert isinstance(pruning, StructuralCompression)
    # Checkpoints find the callback's state under its class name.
    assert pruning.state_key == STATE_NAME == StructuredPruning.__qualname__
