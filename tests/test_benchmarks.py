"""The benchmark scripts run end to end on a miniature budget, and their JSON agrees with itself.

The recorded figures in ``benchmarks/results`` come from the full budgets in the docs; these runs only
guard that the scripts keep working and measure what they claim (structure removed vs masked, int8 vs
fp32 bytes, MoE cost between its experts, a torchvision network through prune+QAT beside a refused one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(script: str, out: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Wrote {out}" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_pruning_benchmark_removes_what_model_pruning_masks(tmp_path: Path) -> None:
    figures = _run_benchmark(
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


@pytest.mark.slow
def test_quantization_benchmark_shrinks_artifacts_to_int8(tmp_path: Path) -> None:
    figures = _run_benchmark(
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


@pytest.mark.slow
def test_moe_benchmark_costs_lie_between_gate_and_experts(tmp_path: Path) -> None:
    figures = _run_benchmark(
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


@pytest.mark.slow
def test_architectures_benchmark_runs_a_network_and_reports_a_refusal(tmp_path: Path) -> None:
    page = tmp_path / "architectures.md"
    figures = _run_benchmark(
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


def _write_fashion_fixture(folder: Path, n_train: int = 320, n_test: int = 64) -> None:
    """Four small IDX files in Fashion-MNIST's names: class-dependent brightness, so models can learn."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
            header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


@pytest.mark.slow
def test_fashion_mnist_benchmark_puts_the_method_beside_its_anchors(tmp_path: Path) -> None:
    _write_fashion_fixture(tmp_path / "fashion")
    figures = _run_benchmark(
        "bench_fashion_mnist.py", tmp_path / "fashion.json",
        f"--data-dir={tmp_path / 'fashion'}", f"--run-dir={tmp_path / 'run'}",
        "--set=data.init_args.val_size=64", "--set=data.init_args.batch_size=32",
        "--set=baseline.max_epochs=1", "--set=moe.max_epochs=1", "--set=trainer.limit_train_batches=2",
        "--set=experts=[" + ", ".join(
            f"{{name: e{i}, pruning: {{pruning_ratio: 0.7, target: macs, iterative_steps: 1, importance: {imp}}},"
            f" quantization: {{backend: x86_pt2e}}, max_epochs: 2, seed: {i}}}"
            for i, imp in enumerate(("l2", "fpgm"))
        ) + "]",
        "--set=trainer.limit_val_batches=1", "--set=evaluation.compile=false", "--set=evaluation.edge=false",
        "--set=evaluation.repeats=1", "--set=evaluation.warmup=0", "--set=evaluation.latency_batch_sizes=[1]",
    )  # fmt: skip
    rows = {row["name"]: row for row in figures["rows"]}
    names = set(rows)
    assert {"baseline", "moe-k1", "moe-k2", "post-training int8", "torch-pruning loop (fp32)"} <= names
    assert any(n.startswith("ModelPruning") for n in names) and any(
        n.startswith("best single") for n in names
    )
    base = rows["baseline"]
    experts = [r for r in figures["rows"] if r["kind"] == "expert"]
    assert len(experts) == 2
    mean_macs = sum(r["macs"] for r in experts) / 2
    assert rows["torch-pruning loop (fp32)"]["macs"] == pytest.approx(mean_macs, rel=0.1)
    masked = next(r for n, r in rows.items() if n.startswith("ModelPruning"))
    assert masked["macs"] == base["macs"]  # masks remove no MACs
    assert rows["post-training int8"]["bytes"] < base["bytes"]
    assert rows["moe-k2"]["extra"]["epochs"] == 1 + sum(r["extra"]["epochs"] - 1 for r in experts) + 1
    for row in figures["rows"]:
        assert row["drop_pt"] == pytest.approx(round(100 * (base["accuracy"] - row["accuracy"]), 2))
    assert (tmp_path / "fashion_mnist_report" / "pareto.png").is_file()


@pytest.mark.slow
def test_edge_benchmark_puts_every_runtime_side_by_side(tmp_path: Path) -> None:
    figures = _run_benchmark(
        "bench_edge.py", tmp_path / "edge.json",
        "--networks", "digits", "--train-epochs=1", "--tune-batches=2", "--rounds=2", "--warmup=1",
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
