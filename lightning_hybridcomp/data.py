"""Datamodules: the embedded handwritten-digits default, Fashion-MNIST, CIFAR-10, MNIST, any ImageFolder tree,
and :class:`ClassEmphasis`, which gives any datamodule's training data an emphasis on some classes.

The digits data ships inside the package, so the default run needs no network. The torchvision
datamodules download only when asked to (``download=True``).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from lightning_hybridcomp._validation import expect_classes, expect_int, expect_ratio, is_number

__all__ = [
    "CIFAR10DataModule",
    "ClassEmphasis",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "dataset_labels",
    "load_digits",
    "read_idx",
]


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        expect_ratio(value, name, closed_low=True, closed_high=False)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "Expected `val_fraction + test_fraction` to be below 1 so that training data remains, got"
            f" {val_fraction} + {test_fraction}."
        )


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Seeded random split of ``range(n)`` into ``len(fractions) + 1`` parts (the first takes the rest)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions]
    first = n - sum(sizes)
    parts, start = [order[:first]], first
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits: ``(images uint8 [1797, 8, 8] with values 0..16, labels uint8 [1797])``.

    Example::

        >>> images, labels = load_digits()
        >>> images.shape, int(images.max()), sorted(set(labels.tolist())) == list(range(10))
        ((1797, 8, 8), 16, True)
    """
    resource = importlib.resources.files("lightning_hybridcomp") / "_assets" / "digits.npz"
    with importlib.resources.as_file(resource) as path, np.load(path) as archive:
        return archive["images"], archive["targets"]


class _SplitDataModule(pl.LightningDataModule):
    """Shared loaders for datamodules that hold ``train``/``val``/``test`` datasets."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        expect_int(batch_size, "batch_size", low=1)
        expect_int(num_workers, "num_workers")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None

    def _loader(self, dataset: Dataset[Any] | None, *, shuffle: bool) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no data for this stage; call `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(_SplitDataModule):
    """The embedded default: 1,797 handwritten digits, 10 classes, shipped with the package.

    Images are scaled to [0, 1], resized with bilinear interpolation to ``image_size`` and standardised
    with the mean and standard deviation of the training split. The train/val/test split is a seeded
    permutation, identical on every machine and every rank for the same ``seed``.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images fed to the model (8 is the native resolution).
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: for a non-positive ``image_size`` or ``batch_size``, or fractions that leave no
            training data.

    Example::

        >>> dm = DigitsDataModule(batch_size=32, image_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype, dm.num_classes
        (torch.Size([32, 1, 16, 16]), torch.float32, torch.int64, 10)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 16,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        expect_int(image_size, "image_size", low=1)
        self.image_size = image_size
        _check_fractions(val_fraction, test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.dims = (1, image_size, image_size)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits()
        x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        y = torch.from_numpy(labels).long()
        train_idx, val_idx, test_idx = _split_indices(
            len(y), (self.val_fraction, self.test_fraction), self.seed
        )
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


class _TorchvisionDataModule(_SplitDataModule):
    """A torchvision dataset with a seeded validation split carved out of its training set."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        val_size: int,
        download: bool,
        augment: bool,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"Expected `val_size` to be a non-negative integer, got {val_size!r}.")
        self.data_dir = str(data_dir)
        self.val_size = val_size
        self.download = download
        self.augment = augment
        self.seed = seed

    def _dataset(self, train: bool, transform: Any) -> Dataset[Any]:
        raise NotImplementedError

    def _transforms(self, train: bool) -> Any:
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(train=True, transform=None)
            self._dataset(train=False, transform=None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            train_full = self._dataset(train=True, transform=self._transforms(train=self.augment))
            val_full = self._dataset(train=True, transform=self._transforms(train=False))
            self.test_set = self._dataset(train=False, transform=self._transforms(train=False))
        except RuntimeError as err:
            raise RuntimeError(
                f"{type(self).__name__} found no usable data under `data_dir`={self.data_dir!r} ({err})."
                " Pass `download=True` to fetch it, or point `data_dir` at an existing copy."
            ) from err
        n = len(train_full)  # type: ignore[arg-type]
        if self.val_size >= n:
            raise ValueError(
                f"Expected `val_size` to be smaller than the training set ({n}), got {self.val_size}."
            )
        train_idx, val_idx = _split_indices(n, (self.val_size / n,), self.seed)
        self.train_set = Subset(train_full, train_idx.tolist())
        self.val_set = Subset(val_full, val_idx.tolist())


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes) through torchvision, with crop-and-flip augmentation.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py``.
        batch_size: samples per batch.
        val_size: training images held out for validation (seeded).
        download: fetch the data when it is missing (needs the network).
        augment: random crop with 4-pixel padding and horizontal flips on the training split.
        seed: seed of the validation split.
        num_workers: DataLoader worker processes.

    Example::

        >>> dm = CIFAR10DataModule("data/", download=False)  # doctest: +SKIP
    """

    num_classes = 10
    dims = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 128,
        val_size: int = 5000,
        download: bool = False,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, download, augment, seed, num_workers)
        self.save_hyperparameters()

    def _transforms(self, train: bool) -> Any:
        from torchvision import transforms as T

        base = super()._transforms(train)
        if not train:
            return base
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), base])

    def _dataset(self, train: bool, transform: Any) -> Dataset[Any]:
        from torchvision.datasets import CIFAR10

        return CIFAR10(self.data_dir, train=train, transform=transform, download=self.download)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (28x28 grayscale, 10 classes) through torchvision.

    Args:
        data_dir: folder that holds (or will hold) ``MNIST/raw``.
        batch_size: samples per batch.
        val_size: training images held out for validation (seeded).
        download: fetch the data when it is missing (needs the network).
        seed: seed of the validation split.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10
    dims = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 128,
        val_size: int = 5000,
        download: bool = False,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, download, False, seed, num_workers)
        self.save_hyperparameters()

    def _dataset(self, train: bool, transform: Any) -> Dataset[Any]:
        from torchvision.datasets import MNIST

        return MNIST(self.data_dir, train=train, transform=transform, download=self.download)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one file of the IDX format (MNIST, Fashion-MNIST), gzipped (``*.gz``) or not.

    Raises:
        ValueError: for a file that is not an unsigned-byte IDX array, or a truncated one.

    Example::

        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
        (10000,)
    """
    import gzip

    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise ValueError(f"Expected {str(path)!r} to be an IDX file of unsigned bytes (MNIST format).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise ValueError(f"The IDX file {str(path)!r} is truncated: shape {shape} needs more bytes.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNISTDataModule(_SplitDataModule):
    """Fashion-MNIST (28x28 grayscale clothing, 10 classes, 60,000 + 10,000 images).

    Reads the four IDX files of the torchvision on-disk format, gzipped or not, from ``data_dir`` itself
    or from ``data_dir/FashionMNIST/raw`` (where torchvision's download puts them). Offline, point
    ``data_dir`` at any copy, for example the one Debian's ``dataset-fashion-mnist`` package installs in
    ``/usr/share/datasets/fashion-mnist``. The network is used only with ``download=True``, and only when
    the files are missing. The whole split is held as tensors standardised with the dataset's mean and
    standard deviation; the validation images are a seeded draw from the training files.

    Args:
        data_dir: folder holding the files, or where ``download=True`` puts them.
        batch_size: samples per batch.
        val_size: training images held out for validation (seeded).
        download: fetch the files through torchvision when they are missing (needs the network).
        seed: seed of the validation split.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: for bad arguments, or files that are not Fashion-MNIST's.
        RuntimeError: at ``setup`` when the files are missing and ``download`` is off (the message says
            how to get them).

    Example::

        >>> dm = FashionMNISTDataModule("/usr/share/datasets/fashion-mnist", batch_size=64)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
    """

    num_classes = 10
    dims = (1, 28, 28)
    mean = 0.2860
    std = 0.3530
    files = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 128,
        val_size: int = 5000,
        download: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"Expected `val_size` to be a non-negative integer, got {val_size!r}.")
        if not isinstance(download, bool):
            raise ValueError(f"Expected `download` to be True or False, got {download!r}.")
        self.data_dir = str(data_dir)
        self.val_size = val_size
        self.download = download
        self.seed = seed
        self.save_hyperparameters()

    def _find(self, name: str) -> Path | None:
        for folder in (Path(self.data_dir), Path(self.data_dir) / "FashionMNIST" / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def missing_files(self) -> list[str]:
        """The names of the four files not found in ``data_dir`` (neither gzipped nor raw)."""
        return [name for pair in self.files.values() for name in pair if self._find(name) is None]

    def prepare_data(self) -> None:
        if self.download and self.missing_files():
            from torchvision.datasets import FashionMNIST

            FashionMNIST(self.data_dir, train=True, download=True)
            FashionMNIST(self.data_dir, train=False, download=True)

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        images_name, labels_name = self.files[split]
        images_path, labels_path = self._find(images_name), self._find(labels_name)
        assert images_path is not None and labels_path is not None  # checked by setup
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise ValueError(
                f"Expected {str(images_path)!r} to hold [n, 28, 28] images and {str(labels_path)!r} their n"
                f" labels, got {images.shape} and {labels.shape}."
            )
        x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(self.mean).div_(self.std)).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        missing = self.missing_files()
        if missing:
            raise RuntimeError(
                f"FashionMNISTDataModule found no {', '.join(missing)} (.gz or not) in `data_dir`={self.data_dir!r}"
                " or its FashionMNIST/raw folder. Pass `download=True` to fetch them, or point `data_dir` at a"
                " copy (`apt-get install dataset-fashion-mnist` puts one in /usr/share/datasets/fashion-mnist)."
            )
        x, y = self._split("train")
        if self.val_size >= len(y):
            raise ValueError(
                f"Expected `val_size` to be smaller than the training set ({len(y)}), got {self.val_size}."
            )
        train_idx, val_idx = _split_indices(len(y), (self.val_size / len(y),), self.seed)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(*self._split("test"))


class ImageFolderDataModule(_SplitDataModule):
    """Your own images in the ``root/<class>/<image>`` layout of torchvision's ``ImageFolder``.

    Images are resized to ``image_size`` and scaled to [-1, 1]; the split is seeded.

    Args:
        root: the folder with one sub-folder per class.
        image_size: side of the square images fed to the model.
        channels: 1 for grayscale, 3 for RGB.
        batch_size: samples per batch.
        val_fraction: share held out for validation.
        test_fraction: share held out for testing.
        seed: seed of the split.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: if ``root`` does not exist or is not a folder, or for invalid sizes and fractions.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not Path(root).is_dir():
            raise ValueError(
                f"Expected `root` to be an existing folder with one sub-folder per class, got {str(root)!r}."
            )
        expect_int(image_size, "image_size", low=1)
        self.image_size = image_size
        if channels not in (1, 3):
            raise ValueError(f"Expected `channels` to be 1 or 3, got {channels!r}.")
        _check_fractions(val_fraction, test_fraction)
        self.root = str(root)
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.dims = (channels, image_size, image_size)
        self.classes: list[str] = []
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        if not self.classes:
            self.setup()
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        ops: list[Any] = [T.Resize((self.image_size, self.image_size))]
        if self.channels == 1:
            ops.append(T.Grayscale(1))
        ops += [T.ToTensor(), T.Normalize([0.5] * self.channels, [0.5] * self.channels)]
        dataset = ImageFolder(self.root, transform=T.Compose(ops))
        self.classes = list(dataset.classes)
        train_idx, val_idx, test_idx = _split_indices(
            len(dataset), (self.val_fraction, self.test_fraction), self.seed
        )
        self.train_set = Subset(dataset, train_idx.tolist())
        self.val_set = Subset(dataset, val_idx.tolist())
        self.test_set = Subset(dataset, test_idx.tolist())


class ClassEmphasis(pl.LightningDataModule):
    """Any datamodule, with some classes drawn more often in training: an expert's data emphasis.

    The training loader draws as many samples per epoch as the training set holds, with replacement, a
    sample of ``classes`` ``weight`` times as likely as any other; validation, test and predict are the
    wrapped datamodule's, so every model is measured on the same data. Experts trained with different
    emphases make different mistakes by design, which a gate can learn to route around. The draw is seeded
    per epoch, so a fit resumed from a checkpoint sees the samples an uninterrupted one does; under DDP
    Lightning shards it (``DistributedSamplerWrapper``).

    Args:
        datamodule: the datamodule to wrap; its training dataset yields ``(input, label)`` pairs.
        classes: the emphasized class indices.
        weight: how much likelier a sample of ``classes`` is drawn than another (above 0; 1 draws all alike).
        seed: seed of the draws.

    Raises:
        ValueError: for an empty ``classes``, a negative or repeated class, or a ``weight`` not above 0; at
            the first training loader, for a class the training labels do not hold.
        TypeError: for a ``datamodule`` that is not a ``LightningDataModule``.

    Example::

        >>> from lightning_hybridcomp.data import DigitsDataModule
        >>> dm = ClassEmphasis(DigitsDataModule(image_size=8), classes=[3, 8], weight=4.0)
        >>> dm.setup("fit")
        >>> labels = torch.cat([y for _, y in dm.train_dataloader()])
        >>> bool(torch.isin(labels, torch.tensor([3, 8])).float().mean() > 0.35)  # 2 of 10 classes, 4x
        True
    """

    def __init__(
        self, datamodule: pl.LightningDataModule, classes: Sequence[int], weight: float = 4.0, seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(
                f"Expected `datamodule` to be a LightningDataModule, got {type(datamodule).__name__}."
            )
        self.classes = expect_classes(classes, "classes")
        if not is_number(weight) or not weight > 0:
            raise ValueError(f"Expected `weight` to be a number above 0, got {weight!r}.")
        self.datamodule = datamodule
        self.weight = float(weight)
        self.seed = int(seed)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.setup(stage)

    def train_dataloader(self) -> DataLoader[Any]:
        loader = self.datamodule.train_dataloader()
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"Expected {type(self.datamodule).__name__}.train_dataloader() to return one DataLoader, got"
                f" {type(loader).__name__}."
            )
        labels = dataset_labels(loader.dataset)
        absent = sorted(set(self.classes) - set(labels.unique().tolist()))
        if absent:
            raise ValueError(
                f"Expected every emphasized class to be among the training labels, got {absent} (the labels"
                f" are {labels.min().item()}..{labels.max().item()})."
            )
        emphasized = torch.isin(labels, torch.tensor(self.classes))
        weights = torch.where(emphasized, self.weight, 1.0).double()
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=_EpochSeededSampler(weights, self.seed),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            persistent_workers=loader.persistent_workers,
        )

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    # The wrapped datamodule's batch hooks and state stay its own.
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)


def dataset_labels(dataset: Dataset[Any]) -> Tensor:
    """The label of every sample of ``dataset``: from its tensors or ``targets`` where it has them, else read.

    Subsets are followed to the dataset they index, so no input is loaded or transformed for them either.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).long().reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


class _EpochSeededSampler(Sampler[int]):
    """Draws ``len(weights)`` indices with replacement, in proportion to ``weights``, seeded by the epoch."""

    def __init__(self, weights: Tensor, seed: int) -> None:
        self.weights = weights
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch's start (directly, or through its DDP wrapper)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator)
        return iter(drawn.tolist())
