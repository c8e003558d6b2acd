"""Benchmark: the compiled MoEs of several finished pipeline runs side by side, against one baseline.

Runs that share a baseline and experts and differ in their MoE settings (``moe.options.gate_input_size``,
a gate, a balance coefficient) cannot be compared by their own evaluations: each times its models in
rounds of its own, on a shared and noisy machine. This script times the first run's compiled baseline and
every run's MoEs (``compile_experts_()``; experts quantized with ``x86_pt2e`` compile with inductor) in the
same interleaved rounds, on the pipeline's latency batch (the first test images), and reports each
MoE's median and its ratio to the baseline's, with its test accuracy from the run's ``results.json``.

Run::

    python benchmarks/bench_moe_runs.py --config runs/fashion_x86.yaml --config runs/fashion_x86_g14.yaml \\
        --out benchmarks/results/bench_moe_runs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_out_argument, add_timing_arguments, run_config, write_result
from torch import Tensor

from lightning_hybridcomp.artifacts import compile_artifact, load_artifact
from lightning_hybridcomp.moe import load_moe
from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import load_pipeline_config
from lightning_hybridcomp.profiling import format_table, interleaved_latencies


def _accuracies(run_dir: Path) -> dict[str, float]:
    """Each model's test accuracy from the run's ``results.json`` (empty before its evaluation)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    models = results["models"] if isinstance(results, dict) else results
    return {m["name"]: m["accuracy"] for m in models}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, action="append", required=True, help="a finished run's pipeline YAML (repeat)"
    )
    parser.add_argument("--batch", type=int, action="append", help="batch sizes to time (default: 64 and 1)")
    add_timing_arguments(parser, rounds=40, warmup=5)
    add_out_argument(parser, "benchmarks/results/bench_moe_runs.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    configs = [load_pipeline_config(path) for path in args.config]
    first = Pipeline(configs[0], say=lambda _: None)
    # Every model loaded and compiled once: a compiled program compiles anew for each batch size it meets.
    first_dir = Path(configs[0].run_dir)
    models: dict[str, Callable[[Tensor], Any]] = {
        "baseline": compile_artifact(load_artifact(first_dir / "baseline" / "model.pt2").module)
    }
    accuracy = {k: v for k, v in _accuracies(first_dir).items() if k == "baseline"}
    for config in configs:
        run_dir = Path(config.run_dir)
        measured = _accuracies(run_dir)
        for run in config.moe.runs():
            name = f"{run_dir.name} {run.name}"
            models[name] = load_moe(run_dir / run.key / "moe.ckpt").eval().compile_experts_()
            if run.name in measured:
                accuracy[name] = measured[run.name]
    rows: list[dict[str, Any]] = []
    medians: dict[str, dict[str, float]] = {}
    for batch in args.batch or [64, 1]:
        images = first._latency_batch(batch)
        parts = {name: (model, images) for name, model in models.items()}
        with torch.no_grad():
            timings = interleaved_latencies(parts, rounds=args.rounds, warmup=args.warmup)
        medians[str(batch)] = {name: statistics.median(values) for name, values in timings.items()}
        base = medians[str(batch)]["baseline"]
        for name, ms in medians[str(batch)].items():
            acc = accuracy.get(name)
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "ms": round(ms, 3),
                    "x baseline": round(ms / base, 3),
                    "test acc (%)": "" if acc is None else round(100 * acc, 2),
                }
            )
    print(format_table(rows))
    write_result(
        args.out,
        {
            "config": run_config(args),
            "median_ms": medians,
            "rows": rows,
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
