"""Shared fixtures: quiet, fast, deterministic Lightning runs on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests._helpers import FAST_TRAINER_FLAGS

# One intra-op thread: on 2 shared cores more threads are slower for tiny models, and DDP workers
# would oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_DISABLE_FORK", "0")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture
def trainer_kwargs(tmp_path) -> dict:
    """Fast Trainer flags for tests, writing under ``tmp_path``."""
    return {**FAST_TRAINER_FLAGS, "default_root_dir": str(tmp_path)}
