"""The architectures benchmark runs a torchvision network through prune+QAT beside a refused one.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


@pytest.mark.slow
def test_architectures_benchmark_runs_a_network_and_reports_a_refusal(tmp_path: Path) -> None:
    page = tmp_path / "architectures.md"
    figures = run_benchmark(
        "bench_architectures.py", tmp_path / "architectures.json",
        "--archs", "squeezenet1_0", "shufflenet_v2_x0_5", "--no-latency", f"--markdown={page}",
    )  # fmt: skip
    squeezenet, shufflenet = figures["rows"]
    assert squeezenet["pruning_ok"] and squeezenet["prune_qat_ok"] and squeezenet["dtype"] == "int8"
    assert squeezenet["macs_ratio"] < 0.5 and squeezenet["params_ratio"] < 0.5
    assert squeezenet["quantize_ops"] > 0
    assert all(squeezenet[key] for key in ("in_memory_repeatable", "reload_equal", "reload_repeatable"))
    assert squeezenet["bytes_ratio"] == pytest.approx(squeezenet["int8_bytes"] / squeezenet["fp32_bytes"])
    assert squeezenet["bytes_ratio"] < 0.3
    # ShuffleNet's channel shuffle is refused before any training, with the package's own message.
    assert shufflenet["refused"] and not shufflenet["pruning_ok"] and not shufflenet["prune_qat_ok"]
    assert shufflenet["refusal_message"].startswith("StructuredPruning cannot prune")
    assert shufflenet["refusal_seconds"] < 30
    text = page.read_text()
    assert "| squeezenet1_0" in text and "| shufflenet_v2_x0_5" in text
    assert shufflenet["refusal_message"] in text
