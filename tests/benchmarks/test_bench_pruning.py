"""The pruning benchmark removes structure where Lightning's ModelPruning only masks it.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


@pytest.mark.slow
def test_pruning_benchmark_removes_what_model_pruning_masks(tmp_path: Path) -> None:
    figures = run_benchmark(
        "bench_pruning.py", tmp_path / "pruning.json",
        "--epochs=3", "--steps=1", "--width=8", "--image-size=16", "--repeats=2",
    )  # fmt: skip
    runs = figures["runs"]
    assert set(runs) == {"unpruned", "ModelPruning", "StructuredPruning"}
    masked, removed = runs["ModelPruning"], runs["StructuredPruning"]
    assert masked["macs"] == runs["unpruned"]["macs"] and masked["params"] == runs["unpruned"]["params"]
    assert masked["zero_filter_fraction"] == pytest.approx(0.5, abs=0.05)
    assert masked["nonzero_params"] < masked["params"]
    # Half the channels of every layer gone: about a quarter of the MACs of the inner convolutions remain.
    assert removed["ratios"]["macs"] < 0.35 and removed["ratios"]["params"] < 0.35
    assert removed["nonzero_params"] == removed["params"]
    assert removed["size_bytes"] < runs["unpruned"]["size_bytes"]
    assert removed["ratios"]["macs"] == pytest.approx(removed["macs"] / runs["unpruned"]["macs"])
    assert figures["config"]["epochs"] == 3 and figures["config"]["torch"]
