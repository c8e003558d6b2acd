"""The MoE benchmark's costs lie between its gate and its experts.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


@pytest.mark.slow
def test_moe_benchmark_costs_lie_between_gate_and_experts(tmp_path: Path) -> None:
    figures = run_benchmark(
        "bench_moe.py", tmp_path / "moe.json",
        "--baseline-epochs=1", "--expert-epochs=3", "--moe-epochs=1", "--repeats=2",
    )  # fmt: skip
    rows = {row["model"].split(" (")[0]: row for row in figures["rows"]}
    assert {"MoE k=1", "MoE k=2", "dense average of 4 experts"} <= set(rows)
    experts = figures["experts"]
    assert len(experts) == 4
    gate = figures["gate"]["macs_per_sample"]
    expert_macs = [expert["macs_per_sample"] for expert in experts]
    for k in (1, 2):
        row = rows[f"MoE k={k}"]
        # Expected MACs per sample: the gate plus k experts, each weighted by its share of the assignments.
        assert sum(row["expert_load"]) == pytest.approx(1.0)
        expected = gate + k * sum(load * macs for load, macs in zip(row["expert_load"], expert_macs))
        assert row["macs_per_sample"] == pytest.approx(expected, rel=1e-6)
        assert row["macs_ratio"] < 1.0
    assert rows["MoE k=1"]["macs_per_sample"] < rows["MoE k=2"]["macs_per_sample"]
    assert rows["MoE k=2"]["macs_per_sample"] < rows["dense average of 4 experts"]["macs_per_sample"] + gate
