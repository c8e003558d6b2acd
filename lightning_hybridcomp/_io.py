"""Crash-safe file writes: a file the package writes is either absent or complete.

Every output goes to a temporary sibling first and is renamed onto its name, so a killed run or a full
disk never leaves a half-written report, artifact or checkpoint behind a finished phase.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; rename it onto ``path`` if the block succeeds.

    Parent folders are created. If the block raises, the temporary file is removed and ``path`` keeps
    whatever it held before.

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
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
