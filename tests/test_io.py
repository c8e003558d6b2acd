from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_hybridcomp._io import UnreadableCheckpointError, atomic_path, read_checkpoint


class NotAllowed:
    """A class ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_read_checkpoint_reads_plain_data(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.ckpt")
    checkpoint = read_checkpoint(tmp_path / "ok.ckpt")
    assert checkpoint["epoch"] == 3 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))


def test_read_checkpoint_names_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected the weights to be an existing file, got '.*nope.ckpt'"):
        read_checkpoint(tmp_path / "nope.ckpt", what="the weights")
    torch.save({"w": torch.ones(100)}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableCheckpointError, match=r"'.*half.ckpt': it is truncated or corrupt"):
        read_checkpoint(tmp_path / "half.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(
        UnreadableCheckpointError, match=r"'.*text.ckpt' with `torch.load\(weights_only=True\)`"
    ):
        read_checkpoint(tmp_path / "text.ckpt")
    torch.save({"object": NotAllowed()}, tmp_path / "pickled.ckpt")
    with pytest.raises(UnreadableCheckpointError) as caught:
        read_checkpoint(tmp_path / "pickled.ckpt")
    message = str(caught.value)
    assert "NotAllowed" in message and "not unpickled" in message
    assert "False" not in message  # torch's advice to load with weights_only=False is not passed on
    assert isinstance(caught.value, ValueError)


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half of the sec")
        raise OSError(28, "disk full")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_atomic_path_temporary_name_is_the_process_s_own(tmp_path: Path) -> None:
    # Two processes writing the same file (DDP ranks) never share, overwrite or rename each other's file.
    with atomic_path(tmp_path / "weights.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.name == f"weights.pt.{os.getpid()}.tmp"
        tmp.write_text("mine")
    assert (tmp_path / "weights.pt").read_text() == "mine"
