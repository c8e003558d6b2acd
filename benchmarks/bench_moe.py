"""Benchmark: a MoE over four pruned experts against the uncompressed model, on the embedded digits data.

Trains the uncompressed SmallCNN, prunes four copies with ``StructuredPruning`` (different ratios and
importance criteria, fine-tuned with different seeds), trains a top-2 gate over their checkpoints and
compares: the uncompressed model, the best single expert (chosen on validation), the dense average of all
experts, and the MoE routed at k = 1 and k = 2 (one gate, trained at k = 2). Accuracy is on the test
split; MACs are per sample (``profiling.count_macs``); bytes are ``state_dict`` bytes; latency is the
median CPU time for one batch of 64 in one run. Every model runs as the same kind of exported graph.

Run::

    .venv/bin/python benchmarks/bench_moe.py --out benchmarks/results/bench_moe.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import add_out_argument, benchmark_trainer, run_config, write_result
from torch import Tensor, nn

from lightning_hybridcomp.callbacks.pruning import StructuredPruning, load_pruned_model
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.models import ImageClassifier
from lightning_hybridcomp.moe.module import MoELightningModule
from lightning_hybridcomp.profiling import (
    count_macs_and_params,
    format_table,
    interleaved_latencies,
    measure_latency,
    serialized_size,
)
from lightning_hybridcomp.programs import export_with_dynamic_batch

# (pruning ratio, importance) per expert: different sizes and different views of which channels matter.
EXPERTS = [(0.5, "l2"), (0.6, "l1"), (0.7, "fpgm"), (0.8, "lamp")]


def _accuracy(fn: Any, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(dim=-1) == y).double().mean())


def _exported(model: nn.Module, example: Tensor) -> nn.Module:
    # Exported as the MoE exports its experts, so that the latencies compare like with like.
    return export_with_dynamic_batch(model.eval(), example).module()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "benchmarks/results/bench_moe.json")
    parser.add_argument("--workdir", default=None, help="folder for checkpoints (a temporary one by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--moe-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurements")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per latency (median reported)")
    args = parser.parse_args()
    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_moe_"))
    workdir.mkdir(parents=True, exist_ok=True)

    pl.seed_everything(args.seed)
    dm = DigitsDataModule(batch_size=64, image_size=16, seed=args.seed)
    dm.setup("fit")
    x_val, y_val = dm.val_set.tensors  # type: ignore[union-attr]
    x_test, y_test = dm.test_set.tensors  # type: ignore[union-attr]

    # 1. The uncompressed model.
    baseline = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=16, width=32, lr=3e-3)
    trainer = benchmark_trainer(args.baseline_epochs)
    trainer.fit(baseline, dm)
    trainer.save_checkpoint(workdir / "baseline.ckpt")
    baseline.eval()

    # 2. Four pruned experts, each fine-tuned from the baseline with its own seed.
    expert_paths = []
    for i, (ratio, importance) in enumerate(EXPERTS):
        pl.seed_everything(args.seed + 1 + i)
        model = ImageClassifier("small_cnn", num_classes=10, in_channels=1, image_size=16, width=32, lr=2e-3)
        model.load_state_dict(baseline.state_dict())
        pruning = StructuredPruning(
            pruning_ratio=ratio,
            iterative_steps=2,
            epochs_between_steps=2,
            importance=importance,
            verbose=False,
        )
        trainer = benchmark_trainer(args.expert_epochs, [pruning])
        trainer.fit(model, dm)
        path = workdir / f"expert{i}_{importance}_{ratio}.ckpt"
        trainer.save_checkpoint(path)
        expert_paths.append(str(path))

    # 3. The gate, trained at k = 2 over the checkpoints (rebuilt with load_pruned_model).
    pl.seed_everything(args.seed)
    moe = MoELightningModule(expert_paths, top_k=2, gate="cnn", gate_input_size=8, learning_rate=3e-3)
    trainer = benchmark_trainer(args.moe_epochs)
    trainer.fit(moe, dm)
    moe_stats = {}
    for k in (1, 2):
        moe.eval_top_k = k
        trainer.test(moe, dm, verbose=False)
        moe_stats[k] = dict(moe.routing_stats)
    moe.eval()

    # 4. Accuracy, MACs and bytes.
    example = x_test[:2]
    pruned = [load_pruned_model(p, ImageClassifier) for p in expert_paths]
    expert_bytes = [serialized_size(m) for m in pruned]
    base_macs = count_macs_and_params(baseline, example[:1])[0]
    val_accs = [_accuracy(e, x_val, y_val) for e in moe.experts]
    test_accs = [_accuracy(e, x_test, y_test) for e in moe.experts]
    best = max(range(len(EXPERTS)), key=lambda i: (val_accs[i], -moe.expert_macs[i]))

    def dense_average(x: Tensor) -> Tensor:
        return torch.stack([e(x).softmax(dim=-1) for e in moe.experts]).mean(dim=0)

    # 5. Latency on one batch of 64, all models as exported graphs, one thread by default.
    torch.set_num_threads(args.threads)
    batch = x_test[:64]
    base_graph = _exported(baseline, example)

    def latency(fn: Any, inputs: Tensor = batch) -> float:
        return measure_latency(fn, inputs, warmup=5, repeats=args.repeats)

    rows: list[dict[str, Any]] = []
    total_expert_bytes = sum(expert_bytes)
    gate_bytes = serialized_size(moe.gate)
    rows.append(
        {
            "model": "uncompressed SmallCNN(width=32)",
            "accuracy": _accuracy(baseline, x_test, y_test),
            "macs_per_sample": base_macs,
            "bytes": serialized_size(baseline.net),
            "latency_ms": latency(base_graph),
        }
    )
    rows.append(
        {
            "model": f"best single expert ({EXPERTS[best][1]}, ratio {EXPERTS[best][0]})",
            "accuracy": test_accs[best],
            "macs_per_sample": moe.expert_macs[best],
            "bytes": expert_bytes[best],
            "latency_ms": latency(moe.experts[best]),
        }
    )
    rows.append(
        {
            "model": f"dense average of {len(EXPERTS)} experts",
            "accuracy": _accuracy(dense_average, x_test, y_test),
            "macs_per_sample": sum(moe.expert_macs),
            "bytes": total_expert_bytes,
            "latency_ms": latency(dense_average),
        }
    )
    for k in (1, 2):
        moe.eval_top_k = k
        stats = moe_stats[k]
        with torch.no_grad():
            gating, _ = moe.route(batch)
        subsets = [batch[(gating.indices == i).any(dim=-1)] for i in range(len(EXPERTS))]
        # The MoE and its parts are timed in the same loop, so load changes on the machine hit them alike.
        parts = {"moe": (moe, batch), "gate": (moe.gate, batch)}
        parts.update({f"expert{i}": (moe.experts[i], sub) for i, sub in enumerate(subsets) if len(sub)})
        timings = interleaved_latencies(parts, rounds=args.repeats, warmup=5)
        experts_per_round = [
            sum(values) for values in zip(*(v for name, v in timings.items() if name.startswith("expert")))
        ]
        overhead_per_round = [
            m - g - e for m, g, e in zip(timings["moe"], timings["gate"], experts_per_round)
        ]
        moe_ms, gate_ms = statistics.median(timings["moe"]), statistics.median(timings["gate"])
        expert_ms = statistics.median(experts_per_round)
        overhead_ms = statistics.median(overhead_per_round)
        overhead_share = statistics.median(o / m for o, m in zip(overhead_per_round, timings["moe"]))
        rows.append(
            {
                "model": f"MoE k={k} (gate trained at k=2)",
                "accuracy": stats["test/acc"],
                "macs_per_sample": stats["moe/test/expected_macs"],
                "bytes": total_expert_bytes + gate_bytes,
                "latency_ms": moe_ms,
                "gate_ms": gate_ms,
                "selected_experts_ms": expert_ms,
                "routing_overhead_ms": overhead_ms,
                "routing_overhead_share": overhead_share,
                "expert_load": [stats[f"moe/test/expert_load/{i}"] for i in range(len(EXPERTS))],
                "dead_expert_share": stats["moe/test/dead_expert_share"],
            }
        )

    base = rows[0]
    for row in rows:
        row["macs_ratio"] = row["macs_per_sample"] / base["macs_per_sample"]
        row["accuracy_delta_pt"] = 100 * (row["accuracy"] - base["accuracy"])

    print(f"\nDigits 16x16, test split n={len(y_test)} (1 image = {100 / len(y_test):.2f} pt)")
    table = [
        {
            "model": row["model"],
            "test acc": f"{100 * row['accuracy']:.2f}%",
            "Δ pt": f"{row['accuracy_delta_pt']:+.2f}",
            "MACs/sample": f"{row['macs_per_sample']:,.0f}",
            "x base": f"{row['macs_ratio']:.3f}",
            "bytes": row["bytes"],
            "ms/64": f"{row['latency_ms']:.2f}",
            "overhead": (
                f"{100 * row['routing_overhead_share']:.1f}%" if "routing_overhead_share" in row else None
            ),
        }
        for row in rows
    ]
    print(format_table(table))
    print("\nExperts (val acc / test acc / MACs / bytes):")
    for i, (ratio, importance) in enumerate(EXPERTS):
        print(
            f"  {i}: {importance:<5} ratio {ratio:.2f}  {100 * val_accs[i]:.2f}% / {100 * test_accs[i]:.2f}%"
            f"  {moe.expert_macs[i]:>10,}  {expert_bytes[i]:>8,}"
        )
    print(f"  gate: {moe.gate_macs:,} MACs, {gate_bytes:,} bytes")
    k2 = rows[-1]
    aims = {
        "k2_accuracy_within_0.3pt": k2["accuracy_delta_pt"] >= -0.3,
        "k2_macs_at_most_0.5x": k2["macs_ratio"] <= 0.5,
        "k2_routing_overhead_below_15pct": k2["routing_overhead_share"] < 0.15,
    }
    print("\nAims (MoE k=2):", ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in aims.items()))
    elapsed = time.perf_counter() - started
    print(f"Total time {elapsed:.0f} s, latency threads {args.threads}")

    result = {
        "config": run_config(args, experts=EXPERTS, image_size=16, test_samples=len(y_test)),
        "rows": rows,
        "experts": [
            {
                "pruning_ratio": ratio,
                "importance": importance,
                "val_accuracy": val_accs[i],
                "test_accuracy": test_accs[i],
                "macs_per_sample": moe.expert_macs[i],
                "bytes": expert_bytes[i],
            }
            for i, (ratio, importance) in enumerate(EXPERTS)
        ],
        "gate": {"macs_per_sample": moe.gate_macs, "bytes": gate_bytes},
        "aims": aims,
        "elapsed_s": elapsed,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
