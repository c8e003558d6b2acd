"""Rank-zero work outside a Trainer, in one process: the rank read from launchers' variables, errors kept.

The two-process behaviour (the others wait, and stop when rank zero fails) is tested end to end in
``test_pipeline_ddp.py``.
"""

from __future__ import annotations

import pytest

from lightning_hybridcomp._distributed import broadcast_from_rank_zero, is_global_zero, on_rank_zero

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@pytest.fixture
def launcher_env(monkeypatch):
    """Set rank variables as a launcher would, starting from none of them."""
    for name in _RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(
    ("variables", "zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),  # Lightning's launcher, rank 0 after the launch
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # the process it started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first process of the second node
        ({"RANK": "2", "LOCAL_RANK": "0"}, False),  # torchrun
        ({"SLURM_PROCID": "1"}, False),
    ],
)
def test_rank_zero_is_read_from_the_launcher_before_any_process_group(launcher_env, variables, zero) -> None:
    launcher_env(**variables)
    assert is_global_zero() is zero


def test_one_process_runs_the_work_and_keeps_its_error(launcher_env) -> None:
    assert on_rank_zero(lambda: {"macs": 5}, what="adding") == {"macs": 5}
    assert broadcast_from_rank_zero([1, 2]) == [1, 2]
    failure = OSError(28, "No space left on device")

    def fail() -> None:
        raise failure

    with pytest.raises(OSError, match="No space left") as caught:
        on_rank_zero(fail, what="writing")
    assert caught.value is failure  # rank zero's own error, not a wrapper


def test_other_ranks_skip_the_work(launcher_env) -> None:
    launcher_env(LOCAL_RANK="1")
    calls: list[int] = []
    assert on_rank_zero(lambda: calls.append(1), what="writing") is None
    assert calls == []
