"""Benchmark: where a compiled MoE's batch time goes, and what its buckets and compiled gate save.

Reads a finished pipeline run (its YAML configuration; experts quantized with ``x86_pt2e``, so that they
compile with inductor) and times, side by side in interleaved rounds on the first ``--batch`` test images:

- the baseline, compiled (``compile_artifact``), and each expert alone on the whole batch;
- every MoE of the run as ``compile_experts_()`` makes it (experts padded to :func:`bucket_size`'s buckets
  of 1, 2, 3, 4, 6, 8, 12, ..., the gate compiled), and two older dispatches of the same experts for
  comparison: power-of-two buckets with an eager gate, and the new buckets with an eager gate;
- the parts of the MoE: the gate alone (eager and compiled; and, latency only, the same gate on the input
  pooled to half its size, ``gate_input_size``), the experts on their sub-batches, and the
  rest (top-k, gather and scatter, the mixture: the MoE's median minus the other two).

Ratios are to the baseline's median in the same rounds. Latency only: predictions are the pipeline's.

Run::

    python benchmarks/bench_moe_dispatch.py --config runs/fashion_mnist_x86.yaml \\
        --out benchmarks/results/bench_moe_dispatch.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_out_argument, add_timing_arguments, run_config, write_result
from torch import Tensor, nn

from lightning_hybridcomp.artifacts import InferenceOnly, compile_artifact, load_artifact
from lightning_hybridcomp.moe import load_moe
from lightning_hybridcomp.moe.dispatch import BucketedExpert, bucket_size, log_mixture, sparse_dispatch
from lightning_hybridcomp.moe.gate import GateNetwork, routing_mask, top_k_gate
from lightning_hybridcomp.moe.module import MoELightningModule
from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import load_pipeline_config
from lightning_hybridcomp.profiling import format_table, interleaved_latencies


def power_of_two(n: int) -> int:
    """The bucket rule before :func:`bucket_size`: the next power of two."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _dispatch_with(
    moe: MoELightningModule, runners: list[nn.Module], gate: Callable[[Tensor], Any], k: int
) -> Callable[[Tensor], Tensor]:
    """The MoE's eval forward with other expert runners and another gate."""

    def forward(x: Tensor) -> Tensor:
        gating = top_k_gate(gate(x)[0], k)
        return log_mixture(sparse_dispatch(x, gating, runners, moe.num_classes).probs)

    return forward


def _experts_on_sub_batches(runners: list[nn.Module], parts: list[Tensor]) -> Callable[[Tensor], None]:
    def run(_: Tensor) -> None:
        for runner, part in zip(runners, parts):
            if part.shape[0]:
                runner(part)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the finished run's pipeline YAML")
    parser.add_argument("--run-dir", default=None, help="the run's folder (default: the config's run_dir)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (the first test images)")
    add_timing_arguments(parser, rounds=30, warmup=3)
    add_out_argument(parser, "benchmarks/results/bench_moe_dispatch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    overrides = {"run_dir": args.run_dir} if args.run_dir else None
    config = load_pipeline_config(args.config, overrides)
    pipeline = Pipeline(config, say=lambda _: None)
    run_dir = Path(config.run_dir)
    images = pipeline._latency_batch(args.batch)

    parts: dict[str, tuple[Callable[[Tensor], Any], Tensor]] = {
        "baseline": (compile_artifact(load_artifact(run_dir / "baseline" / "model.pt2").module), images)
    }
    for spec in config.experts:
        loaded = load_artifact(run_dir / "experts" / spec.name / "expert.pt2")
        parts[f"expert {spec.name} (whole batch)"] = (compile_artifact(loaded.module), images)
    moes: dict[str, dict[str, Any]] = {}
    for run in config.moe.runs():
        moe = load_moe(run_dir / run.key / "moe.ckpt").eval().compile_experts_()
        k = moe.active_top_k
        compiled = [r.compiled for r in moe.expert_records]
        if not all(isinstance(c, BucketedExpert) for c in compiled):
            raise SystemExit(f"{run.name}: an expert did not compile (XNNPACK int8?); use x86_pt2e experts.")
        fine = [c for c in compiled if isinstance(c, BucketedExpert)]
        pow2 = [BucketedExpert(c.compiled, bucket=power_of_two) for c in fine]
        with torch.no_grad():
            gating, _ = moe.route(images)
        mask = routing_mask(gating.indices, moe.num_experts).bool()
        sub_batches = [images[mask[:, i]] for i in range(moe.num_experts)]
        sizes = [int(part.shape[0]) for part in sub_batches]
        name = run.name
        moes[name] = {
            "top_k": k,
            "sub_batches": sizes,
            "padded_rows": {
                "power of two": sum(power_of_two(n) for n in sizes if n),
                "bucket_size": sum(bucket_size(n) for n in sizes if n),
                "unpadded": sum(sizes),
            },
        }
        compiled_gate = moe._compiled_gate[0] if moe._compiled_gate else moe.gate
        parts[name] = (moe, images)
        parts[f"{name} | power-of-two buckets, eager gate"] = (_dispatch_with(moe, pow2, moe.gate, k), images)
        parts[f"{name} | bucket_size buckets, eager gate"] = (_dispatch_with(moe, fine, moe.gate, k), images)
        parts[f"{name} | gate (eager)"] = (moe.gate, images)
        parts[f"{name} | gate (compiled)"] = (compiled_gate, images)
        if isinstance(moe.gate, GateNetwork) and moe.gate.input_size is None:
            # Latency only (untrained weights): the same gate on the input average-pooled to half its size,
            # compiled as `compile_experts_()` compiles a gate.
            half = int(images.shape[-1]) // 2
            pooled = GateNetwork(moe.gate.in_channels, moe.num_experts, moe.gate.channels, input_size=half)
            parts[f"{name} | gate_input_size={half} gate (compiled)"] = (
                InferenceOnly(torch.compile(pooled.eval(), dynamic=True)),
                images,
            )
        parts[f"{name} | experts on sub-batches"] = (_experts_on_sub_batches(fine, sub_batches), images)

    timings = interleaved_latencies(parts, rounds=args.rounds, warmup=args.warmup)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    base = medians["baseline"]
    for name, figures in moes.items():
        rest = (
            medians[name] - medians[f"{name} | gate (compiled)"] - medians[f"{name} | experts on sub-batches"]
        )
        figures["rest_ms"] = rest

    rows = [
        {"part": name, f"ms @{args.batch}": round(ms, 2), "x baseline": round(ms / base, 3)}
        for name, ms in medians.items()
    ]
    print(format_table(rows))
    for name, figures in moes.items():
        print(
            f"{name}: sub-batches {figures['sub_batches']}, rows run {figures['padded_rows']},"
            f" rest {figures['rest_ms']:.2f} ms"
        )
    write_result(
        args.out,
        {
            "config": run_config(args),
            "median_ms": medians,
            "x_baseline": {name: ms / base for name, ms in medians.items()},
            "moe": moes,
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
