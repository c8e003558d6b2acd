"""What the benchmark scripts share: the Trainer they train with, and how they write their results.

The scripts run as ``python benchmarks/bench_*.py``, so Python puts this folder on ``sys.path`` and they
import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def benchmark_trainer(
    max_epochs: int, callbacks: list[pl.Callback] | None = None, **overrides: Any
) -> pl.Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or model summary."""
    flags: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks or [],
    }
    return pl.Trainer(**{**flags, **overrides})


def add_out_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """The JSON file a benchmark writes: ``--out`` (``--output`` is accepted as well)."""
    parser.add_argument(
        "--out", "--output", dest="out", type=Path, default=Path(default), help="JSON file to write"
    )


def add_timing_arguments(parser: argparse.ArgumentParser, *, rounds: int, warmup: int) -> None:
    """``--rounds`` interleaved timing rounds (the median is reported), ``--warmup`` untimed ones, and
    ``--threads`` (torch's intra-op threads; default: torch's own)."""
    import torch

    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def run_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The command-line arguments as JSON values (paths, also in lists, as strings), with ``torch`` and ``extra``
    added."""
    import torch

    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    config = {k: plain(v) for k, v in vars(args).items()}
    return {**config, "torch": torch.__version__, **extra}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nWrote {path}")
