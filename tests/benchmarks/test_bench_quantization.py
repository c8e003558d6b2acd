"""The quantization benchmark shrinks every artifact to int8.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


@pytest.mark.slow
def test_quantization_benchmark_shrinks_artifacts_to_int8(tmp_path: Path) -> None:
    figures = run_benchmark(
        "bench_quantization.py", tmp_path / "quantization.json",
        "--epochs=3", "--qat-epochs=1", "--prune-steps=1", "--width=8", "--image-size=16",
        "--rounds=1", "--repeats=2",
    )  # fmt: skip
    runs = {run["model"]: run for run in figures["runs"]}
    assert list(runs) == ["fp32", "PTQ int8", "QAT int8", "pruned+QAT int8"]
    fp32 = runs["fp32"]
    for name in ("PTQ int8", "QAT int8", "pruned+QAT int8"):
        assert runs[name]["dtype"] == "int8"
        assert runs[name]["artifact_bytes"] < 0.6 * fp32["artifact_bytes"]
        assert runs[name]["artifact_ratio_to_fp32_artifact"] == pytest.approx(
            runs[name]["artifact_bytes"] / fp32["artifact_bytes"]
        )
    assert runs["QAT int8"]["macs"] == fp32["macs"]
    assert runs["pruned+QAT int8"]["macs"] < 0.35 * fp32["macs"]
    assert runs["pruned+QAT int8"]["steps"] == ["prune:l1:0.5", "qat:x86_pt2e"]
