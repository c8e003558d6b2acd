"""Crash-safe file writes and safe checkpoint reads.

Every output goes to a temporary sibling first and is renamed onto its name, so a killed run or a full
disk never leaves a half-written report, artifact or checkpoint behind a finished phase. Checkpoints are
read with ``torch.load(weights_only=True)`` only, and a file that cannot be read that way is reported
as one clear error naming it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; rename it onto ``path`` if the block succeeds.

    Parent folders are created. If the block raises, the temporary file is removed and ``path`` keeps
    whatever it held before. The temporary name holds the process id, so two processes writing the same
    file (DDP ranks, two runs) never write into or rename away each other's temporary file.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with atomic_path(Path(folder) / "out.txt") as tmp:
        ...         _ = tmp.write_text("done")
        ...     sorted(p.name for p in Path(folder).iterdir())
        ['out.txt']
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the duration of the block.

    Processes that share a folder (separate jobs on one run directory, on one machine or on a shared file
    system that supports ``flock``) take turns; the lock is released when the block ends or the process
    dies, so a killed job never leaves it held.
    """
    import fcntl

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that ``torch.load(weights_only=True)`` cannot read (truncated, corrupt or foreign)."""


def read_checkpoint(
    path: str | os.PathLike[str], *, what: str = "checkpoint", map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for a missing or unreadable file.

    Args:
        path: the file.
        what: how the error names the file, e.g. ``"`baseline.checkpoint`"``.
        map_location: passed to ``torch.load``.

    Raises:
        ValueError: if ``path`` is not an existing file.
        UnreadableCheckpointError: if it cannot be read: truncated or corrupt, not written by
            ``torch.save``, or holding Python objects other than tensors and plain containers (which are
            never unpickled here).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"Expected {what} to be an existing file, got {str(file)!r} (not found).")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests ``weights_only=False``; the package never does that. Keep the cause only.
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n\n|$)", str(err), re.S)
        cause = f" ({' '.join(found.group(1).split())})" if found and found.group(1).strip() else ""
        raise UnreadableCheckpointError(
            f"Could not read {what} {str(file)!r} with `torch.load(weights_only=True)`: it is corrupt, or it"
            f" holds Python objects other than tensors and plain containers, which are not unpickled{cause}."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as err:
        raise UnreadableCheckpointError(
            f"Could not read {what} {str(file)!r}: it is truncated or corrupt, or not a file written by"
            f" `torch.save` ({type(err).__name__}: {' '.join(str(err).split())[:200]})."
        ) from err
