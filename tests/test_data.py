from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_hybridcomp.data import (
    CIFAR10DataModule,
    ClassEmphasis,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    dataset_labels,
    load_digits,
    read_idx,
)
from tests._helpers import ClassifierSteps


def test_bundled_digits_are_the_full_dataset() -> None:
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 16 and images.min() == 0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_shapes_dtypes_and_splits(image_size: int) -> None:
    dm = DigitsDataModule(batch_size=50, image_size=image_size)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1257, 270, 270] and sum(sizes) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, image_size, image_size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) <= 9
    assert dm.dims == (1, image_size, image_size)
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3


def test_digits_split_is_deterministic_by_seed() -> None:
    def split(seed: int) -> torch.Tensor:
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return dm.test_set.tensors[1]

    assert torch.equal(split(0), split(0))
    assert not torch.equal(split(0), split(1))
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    # the three splits are disjoint and cover every image exactly once
    dm = DigitsDataModule()
    dm.setup()
    total = torch.cat([s.tensors[1] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert torch.equal(torch.bincount(total), torch.from_numpy(np.bincount(load_digits()[1])).long())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -4}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_loader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="call `setup\\(\\)` first"):
        DigitsDataModule().train_dataloader()


# --- torchvision datamodules on local files in torchvision's on-disk formats (never the network) ---


def _write_cifar(root, n_train_per_batch: int = 12, n_test: int = 10) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train_per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_reads_local_files(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    _write_cifar(tmp_path)
    # The fixture files are not the real archive: check that the files exist, skip only their md5.
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    dm = CIFAR10DataModule(str(tmp_path), batch_size=8, val_size=10, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (8, 3, 32, 32)


def test_cifar10_missing_data_says_how_to_get_it(tmp_path) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "nothing"), num_workers=0)
    with pytest.raises(RuntimeError, match="download=True"):
        dm.setup("fit")


def _write_idx(path, array: np.ndarray) -> None:
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    path.write_bytes(
        struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def test_mnist_reads_local_idx_files(tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    dm = MNISTDataModule(str(tmp_path), batch_size=6, val_size=6, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 12)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 1, 28, 28) and y.dtype == torch.int64


def _fashion_fixture(
    folder, *, gz: bool, n_train: int = 30, n_test: int = 12
) -> tuple[np.ndarray, np.ndarray]:
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        _write_idx(folder / name, array)
        if gz:
            raw = (folder / name).read_bytes()
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            (folder / name).unlink()
    return arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any download through torchvision or any socket is recorded and refused."""
    import socket

    import torchvision.datasets

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("network")
        raise OSError("network access in a test")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_reads_local_idx_files(tmp_path, no_network, gz: bool, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    test_images, test_labels = _fashion_fixture(folder, gz=gz)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=5, val_size=6, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 12)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (torch.from_numpy(test_images[:5].astype(np.float32)) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == test_labels[:5].tolist()
    assert no_network == []


def test_fashion_mnist_downloads_only_when_asked_and_missing(tmp_path, no_network) -> None:
    dm = FashionMNISTDataModule(str(tmp_path / "empty"), download=False)
    dm.prepare_data()
    with pytest.raises(
        RuntimeError, match=r"found no train-images-idx3-ubyte.*download=True.*dataset-fashion-mnist"
    ):
        dm.setup("fit")
    assert no_network == []
    _fashion_fixture(tmp_path / "here", gz=True)
    FashionMNISTDataModule(str(tmp_path / "here"), download=True).prepare_data()  # present: nothing to fetch
    assert no_network == []
    with pytest.raises(OSError, match="network access"):
        FashionMNISTDataModule(str(tmp_path / "empty"), download=True).prepare_data()
    assert no_network == ["network"]


def test_fashion_mnist_bad_files_and_arguments(tmp_path) -> None:
    (tmp_path / "bad").write_bytes(b"not idx")
    with pytest.raises(ValueError, match="to be an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros((3, 28, 28), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-10])
    with pytest.raises(ValueError, match="is truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="Expected `val_size` to be a non-negative integer"):
        FashionMNISTDataModule(val_size=-1)
    _fashion_fixture(tmp_path / "small", gz=False)
    with pytest.raises(ValueError, match=r"Expected `val_size` to be smaller than the training set \(30\)"):
        FashionMNISTDataModule(str(tmp_path / "small"), val_size=30).setup("fit")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, channels: int) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, channels=channels, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 3, 3)
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, channels, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_image_folder_missing_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="`root` to be an existing folder"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_image_folder_bad_channels(tmp_path) -> None:
    with pytest.raises(ValueError, match="`channels` to be 1 or 3"):
        ImageFolderDataModule(str(tmp_path), channels=2)


# --- ClassEmphasis: any datamodule's training data with some classes drawn more often ---


class _LabelRecorder(ClassifierSteps):
    """Records the labels of every training batch, epoch by epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx: int):
        self.seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_class_emphasis_draws_the_classes_in_proportion_to_the_weight() -> None:
    base = DigitsDataModule(image_size=8, batch_size=100)
    dm = ClassEmphasis(base, classes=[3, 8], weight=5.0, seed=1)
    dm.setup("fit")
    counts = torch.bincount(base.train_set.tensors[1], minlength=10).double()
    emphasized = counts[[3, 8]].sum()
    expected = 5.0 * emphasized / (5.0 * emphasized + counts.sum() - emphasized)  # about 0.55
    drawn = []
    sampler = dm.train_dataloader().sampler
    for epoch in range(8):
        sampler.set_epoch(epoch)
        labels = base.train_set.tensors[1][list(sampler)]
        assert len(labels) == len(base.train_set)  # an epoch is as long as the training set
        drawn.append(torch.isin(labels, torch.tensor([3, 8])).double().mean())
    assert float(torch.stack(drawn).mean()) == pytest.approx(float(expected), abs=0.02)
    # Validation and test are the wrapped datamodule's own: every model is measured on the same data.
    for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        ours, theirs = getattr(dm, name)(), getattr(base, name)()
        assert ours.dataset is theirs.dataset and ours.batch_size == theirs.batch_size


def test_class_emphasis_draws_by_epoch_so_a_resumed_fit_sees_the_same_samples(tmp_path) -> None:
    """Lightning sets the epoch: an interrupted fit resumed from its checkpoint draws what an uninterrupted one does."""
    from tests._helpers import fast_trainer

    def data() -> ClassEmphasis:
        return ClassEmphasis(DigitsDataModule(image_size=8, batch_size=64), classes=[0], weight=3.0, seed=4)

    whole = _LabelRecorder()
    fast_trainer(tmp_path / "whole", max_epochs=3).fit(whole, datamodule=data())
    assert whole.seen[0] != whole.seen[1] != whole.seen[2]  # a new draw every epoch
    first = _LabelRecorder()
    trainer = fast_trainer(tmp_path / "cut", max_epochs=1)
    trainer.fit(first, datamodule=data())
    checkpoint = tmp_path / "cut.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = _LabelRecorder()
    fast_trainer(tmp_path / "resumed", max_epochs=3).fit(
        resumed, datamodule=data(), ckpt_path=str(checkpoint)
    )
    assert first.seen[0] == whole.seen[0]
    assert resumed.seen == {1: whole.seen[1], 2: whole.seen[2]}


def test_class_emphasis_reads_labels_without_loading_inputs() -> None:
    class TargetsOnly(torch.utils.data.Dataset):
        targets = [0, 1, 2, 1, 0, 2]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int):
            raise AssertionError("the labels are read from `targets`, no input is loaded")

    subset = torch.utils.data.Subset(TargetsOnly(), [5, 1, 3])
    assert dataset_labels(subset).tolist() == [2, 1, 1]
    pairs = [(torch.zeros(2), label) for label in (4, 2, 4)]  # neither tensors nor targets: read
    assert dataset_labels(pairs).tolist() == [4, 2, 4]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"classes": []}, ValueError, "Expected `classes` to be a non-empty list"),
        ({"classes": [1, 1]}, ValueError, "distinct class indices"),
        ({"classes": [-1]}, ValueError, "integers >= 0"),
        ({"classes": "3"}, ValueError, "Expected `classes`"),
        ({"classes": [True]}, ValueError, "Expected `classes`"),
        ({"classes": [1], "weight": 0}, ValueError, "Expected `weight` to be a number above 0, got 0"),
        ({"classes": [1], "weight": True}, ValueError, "Expected `weight`"),
    ],
)
def test_class_emphasis_rejects_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ClassEmphasis(DigitsDataModule(), **kwargs)


def test_class_emphasis_refuses_a_class_the_labels_lack_and_other_loaders() -> None:
    with pytest.raises(TypeError, match="Expected `datamodule` to be a LightningDataModule, got list"):
        ClassEmphasis([], classes=[1])  # type: ignore[arg-type]
    dm = ClassEmphasis(DigitsDataModule(image_size=8), classes=[2, 10, 12])
    dm.setup("fit")
    with pytest.raises(
        ValueError, match=r"among the training labels, got \[10, 12\] \(the labels are 0..9\)"
    ):
        dm.train_dataloader()

    class TwoLoaders(DigitsDataModule):
        def train_dataloader(self):
            return [super().train_dataloader(), super().train_dataloader()]

    two = ClassEmphasis(TwoLoaders(image_size=8), classes=[1])
    two.setup("fit")
    with pytest.raises(
        TypeError, match=r"TwoLoaders.train_dataloader\(\) to return one DataLoader, got list"
    ):
        two.train_dataloader()
