"""Shared fixtures: fast, deterministic Lightning runs on the CPU (warning filters live in pyproject)."""

from __future__ import annotations

import pytest
import torch

from tests._helpers import FAST_TRAINER_FLAGS

# One intra-op thread: on 2 shared cores more threads are slower for tiny models, and DDP workers
# would oversubscribe.
torch.set_num_threads(1)


@pytest.fixture
def trainer_kwargs(tmp_path) -> dict:
    """Fast Trainer flags for tests, writing under ``tmp_path``."""
    return {**FAST_TRAINER_FLAGS, "default_root_dir": str(tmp_path)}
