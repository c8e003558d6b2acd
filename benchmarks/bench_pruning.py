"""Benchmark: no pruning vs Lightning's ``ModelPruning`` vs ``StructuredPruning``, on the embedded digits data.

The same SmallCNN (a VGG-style CNN at 32x32 inputs), seed, data order and epoch budget for all three runs.
``ModelPruning`` masks 50% of the filters of every convolution (L1 structured masks, same schedule);
``StructuredPruning`` removes 50% of the channels of every layer but the classifier. Reported per model:
test accuracy, parameters (non-zero ones as well, for the masked model), MACs per sample (torch-pruning's
counter), ``state_dict`` bytes, median CPU latency at batch 1 and 64 (all models timed in one interleaved
loop, so load changes hit them alike) and the wall time spent in pruning steps.

Run::

    .venv/bin/python benchmarks/bench_pruning.py --out benchmarks/results/bench_pruning.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from _common import add_out_argument, benchmark_trainer, run_config, write_result
from lightning.pytorch.callbacks import ModelPruning
from torch import Tensor, nn

from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.models import ImageClassifier
from lightning_hybridcomp.profiling import (
    count_macs_and_params,
    format_table,
    measure_latency,
    serialized_size,
)


class TimedModelPruning(ModelPruning):
    """``ModelPruning`` that records the wall time of its pruning calls."""

    seconds = 0.0

    def apply_pruning(self, amount: Any) -> None:
        start = time.perf_counter()
        super().apply_pruning(amount)
        self.seconds += time.perf_counter() - start


_RATIO_COLUMNS = (
    ("MACs", "macs"),
    ("params", "params"),
    ("bytes", "size_bytes"),
    ("lat b1", "latency_ms_b1"),
    ("lat b64", "latency_ms_b64"),
)


def _schedule_amounts(ratio: float, steps: int) -> list[float]:
    """Per-step amounts relative to the channels still unmasked, reaching ``ratio`` linearly in ``steps``."""
    kept = [1.0 - ratio * k / steps for k in range(steps + 1)]
    return [1.0 - kept[k] / kept[k - 1] for k in range(1, steps + 1)]


def _train(
    args: argparse.Namespace, callbacks_for: Callable[[nn.Module], list[pl.Callback]]
) -> tuple[ImageClassifier, float, list[pl.Callback]]:
    """Train from the same seed (same initial weights, same batches); return model, test accuracy, callbacks."""
    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, image_size=args.image_size, seed=args.seed)
    model = ImageClassifier(
        "small_cnn", num_classes=10, in_channels=1, image_size=args.image_size, width=args.width
    )
    callbacks = callbacks_for(model.net)
    trainer = benchmark_trainer(args.epochs, callbacks)
    trainer.fit(model, dm)
    accuracy = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    return model, accuracy, callbacks


def _interleaved_latency(models: dict[str, nn.Module], batch: Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per forward pass, timing the models round-robin in one loop."""
    for model in models.values():
        measure_latency(model, batch, warmup=3, repeats=1)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            # One call per model per round, so that load changes on the machine hit every model alike.
            timings[name].append(measure_latency(model, batch, warmup=0, repeats=1))
    return {name: statistics.median(values) for name, values in timings.items()}


def _zero_filters(net: nn.Module) -> float:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    zero = sum(int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in convs)
    return zero / sum(m.out_channels for m in convs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=32, help="channels of the first SmallCNN stage")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels pruned")
    parser.add_argument("--steps", type=int, default=3, help="pruning steps, one per epoch from epoch 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (training and timing)")
    parser.add_argument(
        "--repeats", type=int, default=50, help="timed forward passes per model and batch size"
    )
    add_out_argument(parser, "benchmarks/results/bench_pruning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}

    model, accuracy, _ = _train(args, lambda net: [])
    models["unpruned"], runs["unpruned"] = model.net, {"accuracy": accuracy, "pruning_seconds": 0.0}

    amounts = _schedule_amounts(args.ratio, args.steps)

    def masking_for(net: nn.Module) -> list[pl.Callback]:
        return [
            TimedModelPruning(
                "ln_structured",
                # The convolutions' filters, as StructuredPruning removes them (the classifier stays whole).
                parameters_to_prune=[(m, "weight") for m in net.modules() if isinstance(m, nn.Conv2d)],
                pruning_norm=1,
                pruning_dim=0,
                # Masks at the end of epochs 0..steps-1, where StructuredPruning prunes (start of 1..steps).
                amount=lambda epoch: amounts[epoch] if epoch < len(amounts) else 0.0,
                use_global_unstructured=False,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        ]

    model, accuracy, callbacks = _train(args, masking_for)
    masking = callbacks[0]
    assert isinstance(masking, TimedModelPruning)
    models["ModelPruning"] = model.net
    runs["ModelPruning"] = {
        "accuracy": accuracy,
        "pruning_seconds": masking.seconds,
        "zero_filter_fraction": _zero_filters(model.net),
    }

    def pruning_for(net: nn.Module) -> list[pl.Callback]:
        return [
            StructuredPruning(
                pruning_ratio=args.ratio, iterative_steps=args.steps, start_epoch=1, verbose=False
            )
        ]

    model, accuracy, callbacks = _train(args, pruning_for)
    pruning = callbacks[0]
    assert isinstance(pruning, StructuredPruning)
    models["StructuredPruning"] = model.net
    runs["StructuredPruning"] = {
        "accuracy": accuracy,
        "pruning_seconds": sum(s["seconds"] for s in pruning.step_summaries),
    }

    example = torch.randn(1, 1, args.image_size, args.image_size)
    for name, net in models.items():
        net.eval()
        macs, params = count_macs_and_params(net, example)
        nonzero = int(sum(int((p != 0).sum()) for p in net.parameters()))
        runs[name].update(macs=macs, params=params, nonzero_params=nonzero, size_bytes=serialized_size(net))
    for batch_size in (1, 64):
        batch = torch.randn(batch_size, 1, args.image_size, args.image_size)
        for name, ms in _interleaved_latency(models, batch, args.repeats).items():
            runs[name][f"latency_ms_b{batch_size}"] = ms

    base = runs["unpruned"]
    for run in runs.values():
        run["ratios"] = {key: run[key] / base[key] for _, key in _RATIO_COLUMNS}
        run["accuracy_drop_points"] = 100 * (base["accuracy"] - run["accuracy"])

    figures = format_table(
        [
            {
                "model": name,
                "test acc": f"{run['accuracy']:.4f}",
                "params": run["params"],
                "non-zero": run["nonzero_params"],
                "MACs": run["macs"],
                "bytes": run["size_bytes"],
                "lat b1 ms": f"{run['latency_ms_b1']:.3f}",
                "lat b64 ms": f"{run['latency_ms_b64']:.2f}",
                "prune s": f"{run['pruning_seconds']:.3f}",
            }
            for name, run in runs.items()
        ]
    )
    ratios = format_table(
        [
            {
                "model": name,
                **{label: f"{run['ratios'][key]:.3f}" for label, key in _RATIO_COLUMNS},
                "acc drop": f"{run['accuracy_drop_points']:.2f}pt",
            }
            for name, run in runs.items()
        ],
        title="ratio to unpruned",
    )
    lines = [*figures.splitlines(), "", *ratios.splitlines()]
    print("\n".join(lines))

    config = run_config(args, model="SmallCNN", dataset="embedded digits (upsampled)")
    write_result(args.out, {"config": config, "runs": runs, "table": lines})


if __name__ == "__main__":
    main()
