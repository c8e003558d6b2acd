"""The edge benchmark puts every runtime side by side.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


@pytest.mark.slow
def test_edge_benchmark_puts_every_runtime_side_by_side(tmp_path: Path) -> None:
    figures = run_benchmark(
        "bench_edge.py", tmp_path / "edge.json",
        "--networks", "digits", "--train-epochs=1", "--tune-batches=2", "--rounds=2", "--warmup=1",
        "--moe-experts=2",
    )  # fmt: skip
    rows = {row["model"]: row for row in figures["rows"]}
    assert list(rows) == [
        "torch eager fp32",
        "compile_artifact fp32",
        "compile_artifact int8 (x86_pt2e)",
        "ExecuTorch fp32",
        "ExecuTorch int8",
        "ExecuTorch pruned fp32",
        "ExecuTorch pruned int8",
        "ExecuTorch MoE k=1",
        "ExecuTorch MoE k=2",
    ]
    fp32 = rows["ExecuTorch fp32"]
    assert fp32["x ET fp32 @1"] == pytest.approx(1.0) and fp32["x ET fp32 bytes"] == pytest.approx(1.0)
    assert rows["ExecuTorch pruned int8"]["MACs"] <= 0.3 * fp32["MACs"]  # pruned to at most 0.25x, rounded
    assert rows["ExecuTorch pruned int8"]["bytes"] < rows["ExecuTorch pruned fp32"]["bytes"] < fp32["bytes"]
    assert rows["ExecuTorch int8"]["bytes"] < 0.5 * fp32["bytes"]
    assert rows["ExecuTorch MoE k=1"]["MACs"] < rows["ExecuTorch MoE k=2"]["MACs"]
    for row in rows.values():
        assert row["ms @1"] > 0 and row["ms @32"] > 0 and 0.0 <= row["test acc"] <= 1.0
    # The int8 programs predict about as well as fp32 (one training epoch; post-training calibration).
    assert rows["ExecuTorch int8"]["test acc"] >= fp32["test acc"] - 0.05
