"""Reference networks and ``ImageClassifier``, a LightningModule around any image backbone.

The compression callbacks never depend on ``ImageClassifier``; it is the convenient starting point of
the CLI and the pipeline.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_hybridcomp._lightning import inputs_from_batch, labels_from_batch

__all__ = ["CifarResNet", "ImageClassifier", "SmallCNN", "build_backbone", "list_backbones"]

_CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULERS = ("none", "cosine", "step", "onecycle")


class SmallCNN(nn.Module):
    """A compact VGG-style CNN: two conv-BN-ReLU pairs per stage, max pooling, global pooling, a linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: channels of the input images.
        width: channels of the first stage; the second stage has twice as many.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. (2016): three stages of 16/32/64 channels, ``6n + 2`` layers.

    Projection (1x1 conv) shortcuts where the shape changes.

    Args:
        blocks_per_stage: ``n``; 3, 5, 9 and 18 give ResNet-20, -32, -56 and -110.
        num_classes: outputs of the head.
        in_channels: channels of the input images.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def list_backbones() -> list[str]:
    """Names ``build_backbone`` accepts: the in-package networks, then torchvision's classification models."""
    import torchvision.models as tvm
    from torchvision.models import list_models

    return ["small_cnn", *_CIFAR_RESNET_DEPTHS, *list_models(module=tvm)]


def _adapt_input_channels_(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one with ``in_channels`` inputs (same everything else)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                module.dilation,  # type: ignore[arg-type]
                module.groups,
                module.bias is not None,
            )
            with torch.no_grad():
                # Keep pretrained filters useful: average them over the original input channels.
                new.weight.copy_(module.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
                if module.bias is not None:
                    new.bias.copy_(module.bias)  # type: ignore[union-attr]
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return


def _replace_head_(model: nn.Module, num_classes: int) -> None:
    """Replace the last ``nn.Linear`` of ``model`` with one that has ``num_classes`` outputs."""
    name, last = next((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear))
    if last.out_features == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(last.in_features, num_classes))


def build_backbone(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    width: int = 32,
    weights: str | None = None,
) -> nn.Module:
    """Build a classification network by name.

    Args:
        name: ``"small_cnn"``, ``"resnet20"``/``"resnet32"``/``"resnet56"``/``"resnet110"`` (CIFAR-style,
            in-package) or any torchvision classification model name (``"resnet18"``,
            ``"mobilenet_v3_small"``, ``"vgg11_bn"``, ...).
        num_classes: outputs of the classifier head.
        in_channels: channels of the input images; a torchvision model's first convolution is adapted.
        width: first-stage channels of ``"small_cnn"``.
        weights: torchvision weights name such as ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` (downloaded once into
            the torch hub cache); the head is replaced to output ``num_classes``.

    Raises:
        ValueError: for an unknown name, non-positive sizes, or weights asked for an in-package network.

    Example::

        >>> net = build_backbone("resnet20", num_classes=10, in_channels=1)
        >>> net(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{arg}` to be a positive integer, got {value!r}.")
    if name == "small_cnn" or name in _CIFAR_RESNET_DEPTHS:
        if weights is not None:
            raise ValueError(
                f"Expected `weights` to be None for the in-package backbone {name!r}, got {weights!r};"
                " pretrained weights exist only for torchvision models."
            )
        if name == "small_cnn":
            return SmallCNN(num_classes, in_channels, width)
        return CifarResNet(_CIFAR_RESNET_DEPTHS[name], num_classes, in_channels)
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        close = [n for n in available if name.lower() in n or n in name.lower()][:6]
        raise ValueError(
            f"Expected `backbone` to be 'small_cnn', one of {sorted(_CIFAR_RESNET_DEPTHS)} or a torchvision"
            f" classification model name, got {name!r}."
            + (f" Did you mean one of {close}?" if close else " See `list_backbones()` for every name.")
        )
    if weights is None:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        model = tvm.get_model(name, weights=weights)
        _replace_head_(model, num_classes)
    _adapt_input_channels_(model, in_channels)
    return model


class ImageClassifier(pl.LightningModule):
    """Image classification with cross-entropy and torchmetrics accuracy around any backbone.

    Every argument is a plain value, so the class works from ``LightningCLI`` YAML and its checkpoints
    load with ``torch.load(weights_only=True)``. LightningCLI's own ``--optimizer``/``--lr_scheduler``
    override the built-in choice.

    Args:
        backbone: a name for :func:`build_backbone` or an ``nn.Module`` that maps images to logits.
        num_classes: number of classes.
        in_channels: channels of the input images.
        image_size: side of the square input images (sets ``example_input_array``).
        width: first-stage channels of ``"small_cnn"``.
        weights: torchvision pretrained weights name, or ``None``.
        optimizer: ``"sgd"`` (Nesterov momentum), ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        weight_decay: weight decay.
        momentum: momentum of SGD.
        scheduler: ``"none"``, ``"cosine"`` (over ``max_epochs``), ``"step"`` or ``"onecycle"``.
        label_smoothing: cross-entropy label smoothing.

    Raises:
        ValueError: for an unknown backbone, optimizer or scheduler, or non-positive sizes.

    Example::

        >>> model = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=16)
        >>> model(model.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 16,
        width: int = 32,
        weights: str | None = None,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"Expected `image_size` to be a positive integer, got {image_size!r}.")
        if optimizer.lower() not in _OPTIMIZERS:
            raise ValueError(f"Expected `optimizer` to be one of {_OPTIMIZERS}, got {optimizer!r}.")
        if scheduler.lower() not in _SCHEDULERS:
            raise ValueError(f"Expected `scheduler` to be one of {_SCHEDULERS}, got {scheduler!r}.")
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be positive, got {lr!r}.")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.net = (
            backbone
            if isinstance(backbone, nn.Module)
            else build_backbone(backbone, num_classes, in_channels, width=width, weights=weights)
        )
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = inputs_from_batch(batch), labels_from_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(
            logits, y, label_smoothing=float(self.hparams["label_smoothing"]) if stage == "train" else 0.0
        )
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(inputs_from_batch(batch)).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        name = hp.optimizer.lower()
        opt: torch.optim.Optimizer
        if name == "sgd":
            opt = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=True
            )
        elif name == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = hp.scheduler.lower()
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 1
        max_epochs = max(max_epochs, 1)
        if scheduler == "none":
            return opt
        if scheduler == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs)
        elif scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, max_epochs // 3), gamma=0.1)
        else:
            steps = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=int(steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
