"""Work between Trainer runs under DDP: global rank zero does it, the other ranks wait and fail with it.

A Trainer synchronises its own ranks; what a job does around its Trainers (write files, measure models)
runs on every rank unless guarded. :func:`on_rank_zero` guards it with one writer and one collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from lightning_hybridcomp._lightning import close_process_group
from lightning_hybridcomp.pipeline_config import PipelineError

_T = TypeVar("_T")

# Set by launchers in the processes they start: Lightning's DDP launcher (LOCAL_RANK, NODE_RANK),
# torchrun (RANK), SLURM (SLURM_PROCID).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def distributed_is_initialized() -> bool:
    """Whether a default ``torch.distributed`` process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def is_global_zero() -> bool:
    """Whether this process is global rank zero, also before a Trainer has set up the process group.

    Lightning's DDP launcher starts the other ranks from inside the first ``trainer.fit``, by running the
    same command again; those processes know their rank from the launcher's environment variables before
    any process group exists.
    """
    if distributed_is_initialized():
        return dist.get_rank() == 0
    return all(int(os.environ.get(name) or 0) == 0 for name in _RANK_VARIABLES)


def broadcast_from_rank_zero(value: _T) -> _T:
    """Rank zero's ``value`` on every rank (a collective when a process group is up, else ``value``)."""
    if not distributed_is_initialized():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(work: Callable[[], _T], *, what: str) -> _T:
    """Run ``work`` on global rank zero only and return its result on every rank.

    Every rank must call this at the same point. The others wait in one broadcast (a barrier) until rank
    zero is done, so what rank zero wrote is on disk when they go on. If ``work`` fails, every rank stops:
    rank zero raises its own error, the others a :class:`PipelineError` quoting it, and the process group
    is closed first so that no rank is left waiting in a collective or aborts in gloo's threads at exit.

    Args:
        work: the rank-zero-only step (writing files, measuring models); its result must be picklable.
        what: what ``work`` does, for the other ranks' error message, e.g. ``"writing the baseline"``.

    Raises:
        PipelineError: on the other ranks, when ``work`` failed on rank zero.

    Example::

        >>> on_rank_zero(lambda: 2 + 3, what="adding")  # one process: just runs it
        5
    """
    result: _T | None = None
    error: BaseException | None = None
    if is_global_zero():
        try:
            result = work()
        except BaseException as err:  # a KeyboardInterrupt on rank zero must stop the others too
            error = err
    failure = f"{type(error).__name__}: {error}" if error is not None else None
    result, failure = broadcast_from_rank_zero((result, failure))
    if failure is not None:
        close_process_group()
        if error is not None:
            raise error
        raise PipelineError(f"Rank 0 failed while {what}, so this rank stops too. Its error: {failure}")
    return result  # type: ignore[return-value]
