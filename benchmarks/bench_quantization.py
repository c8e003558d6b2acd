"""Benchmark: fp32 vs post-training int8 vs QAT int8 vs pruned+QAT int8, on the embedded digits data.

Same ``ImageClassifier("small_cnn")``, seed, data order and epoch budget for the trained runs (AdamW, cosine
schedule). PTQ quantizes the trained fp32 model with the same PT2E x86 backend and calibration only (torchao
``prepare_pt2e`` + ``convert_pt2e``, 8 training batches). QAT inserts fake quantization for the last
``--qat-epochs`` epochs with :class:`QuantizationAwareTraining`; pruned+QAT first removes ``--ratio`` of the
channels with :class:`StructuredPruning`, then runs the same QAT. Every model is saved as an artifact and
measured *from the reloaded artifact*: test accuracy, file bytes, MACs per sample, and median CPU latency at
batch 1 and 64, eager and ``compile_artifact``-compiled (all models timed in interleaved rounds, so load
changes hit them alike).

Run::

    .venv/bin/python benchmarks/bench_quantization.py --out benchmarks/results/bench_quantization.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import add_out_argument, benchmark_trainer, run_config, write_result
from torch import Tensor, nn

from lightning_hybridcomp.artifacts import (
    compile_artifact,
    load_artifact,
    save_artifact,
)
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.models import ImageClassifier
from lightning_hybridcomp.profiling import format_table, measure_latency, serialized_size
from lightning_hybridcomp.programs import export_with_dynamic_batch


def _datamodule(args: argparse.Namespace) -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, image_size=args.image_size, seed=args.seed)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _train(args: argparse.Namespace, callbacks: list[pl.Callback]) -> tuple[ImageClassifier, float]:
    """Train from the same seed (same initial weights and batches); return the model and the fit seconds."""
    pl.seed_everything(args.seed, verbose=False)
    model = ImageClassifier(
        "small_cnn", num_classes=10, in_channels=1, image_size=args.image_size, width=args.width
    )
    trainer = benchmark_trainer(args.epochs, callbacks, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, _datamodule(args))
    return model, time.perf_counter() - start


def _post_training_int8(fp32: nn.Module, dm: DigitsDataModule, batches: int) -> nn.Module:
    """torchao's PT2E post-training flow with the same x86 quantizer (not in QAT mode)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    example = next(iter(dm.train_dataloader()))[0]
    program = export_with_dynamic_batch(copy.deepcopy(fp32).eval(), example[:2])
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for index, (x, _) in enumerate(dm.train_dataloader()):
            if index >= batches:
                break
            prepared(x)
    return convert_pt2e(prepared)


def _evaluate(module: nn.Module, dm: DigitsDataModule) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy (finer-grained than accuracy on 270 test images)."""
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            logits = module(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            total += len(y)
    return correct / total, loss / total


def _latencies(
    models: dict[str, dict[str, nn.Module]], inputs: dict[int, Tensor], rounds: int, repeats: int
) -> dict:
    """Median ms per (model, mode, batch), timed in interleaved rounds."""
    parts = {
        (name, mode, batch): (module, x)
        for name, modes in models.items()
        for mode, module in modes.items()
        for batch, x in inputs.items()
    }
    for module, x in parts.values():  # warm-up (and compilation) first
        measure_latency(module, x, warmup=3, repeats=1)
    samples: dict[tuple[str, str, int], list[float]] = {key: [] for key in parts}
    for _ in range(rounds):
        # Every part in every round, so that load changes on the machine hit all of them alike.
        for key, (module, x) in parts.items():
            samples[key].extend(measure_latency(module, x, warmup=0, repeats=1) for _ in range(repeats))
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--qat-epochs", type=int, default=3, help="last epochs trained with fake quantization"
    )
    parser.add_argument("--width", type=int, default=32, help="channels of the first SmallCNN stage")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels pruned before QAT")
    parser.add_argument(
        "--prune-steps", type=int, default=2, help="pruning steps, one per epoch from epoch 1"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (training and timing)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and round")
    add_out_argument(parser, "benchmarks/results/bench_quantization.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qat_start = args.epochs - args.qat_epochs
    if args.prune_steps >= qat_start:
        parser.error("--prune-steps must leave at least one epoch between the last pruning step and QAT")
    artifacts = Path(tempfile.mkdtemp(prefix="bench_quantization_"))
    dm = _datamodule(args)
    example = next(iter(dm.test_dataloader()))[0][:4]

    fp32, fp32_seconds = _train(args, [])
    fp32_net = fp32.net.eval()
    qat = QuantizationAwareTraining(start_epoch=qat_start, verbose=False)
    _, qat_seconds = _train(args, [qat])
    pruning = StructuredPruning(
        pruning_ratio=args.ratio, iterative_steps=args.prune_steps, start_epoch=1, verbose=False
    )
    pruned_qat = QuantizationAwareTraining(start_epoch=qat_start, verbose=False)
    _, pruned_seconds = _train(args, [pruning, pruned_qat])
    start = time.perf_counter()
    ptq = _post_training_int8(fp32_net, dm, batches=8)
    ptq_seconds = time.perf_counter() - start

    metadata = {
        "fp32": save_artifact(fp32_net, artifacts / "fp32.pt2", example, steps=("fp32",)),
        "PTQ int8": save_artifact(
            ptq, artifacts / "ptq.pt2", example, steps=("ptq:x86_pt2e",), architecture="SmallCNN"
        ),
        "QAT int8": qat.save_artifact(artifacts / "qat.pt2", example),
        "pruned+QAT int8": pruned_qat.save_artifact(artifacts / "pruned_qat.pt2", example),
    }
    files = {"fp32": "fp32", "PTQ int8": "ptq", "QAT int8": "qat", "pruned+QAT int8": "pruned_qat"}
    loaded = {name: load_artifact(artifacts / f"{stem}.pt2").module for name, stem in files.items()}
    evaluation = {name: _evaluate(module, dm) for name, module in loaded.items()}

    compile_seconds: dict[str, float] = {}
    models: dict[str, dict[str, nn.Module]] = {}
    inputs = {1: example[:1].contiguous(), 64: example[:1].repeat(64, 1, 1, 1)}
    for name, module in loaded.items():
        compiled = compile_artifact(load_artifact(artifacts / f"{files[name]}.pt2").module)
        start = time.perf_counter()
        for x in inputs.values():
            compiled(x)  # one compilation per batch size
        compile_seconds[name] = time.perf_counter() - start
        models[name] = {"eager": module, "compiled": compiled}
    latency = _latencies(models, inputs, args.rounds, args.repeats)

    fp32_state = serialized_size(fp32_net)
    fit_seconds = {
        "fp32": fp32_seconds,
        "PTQ int8": ptq_seconds,
        "QAT int8": qat_seconds,
        "pruned+QAT int8": pruned_seconds,
    }
    runs: list[dict[str, Any]] = []
    for name, meta in metadata.items():
        runs.append(
            {
                "model": name,
                "test_accuracy": evaluation[name][0],
                "test_cross_entropy": evaluation[name][1],
                "artifact_bytes": meta.size_bytes,
                "artifact_ratio_to_fp32_artifact": meta.size_bytes / metadata["fp32"].size_bytes,
                "artifact_ratio_to_fp32_state_dict": meta.size_bytes / fp32_state,
                "macs": meta.macs,
                "params": meta.params,
                "dtype": meta.dtype,
                "steps": list(meta.steps),
                "latency_ms": {
                    f"{mode}_b{batch}": latency[(name, mode, batch)]
                    for mode in ("eager", "compiled")
                    for batch in inputs
                },
                "compile_seconds": compile_seconds[name],
                "fit_or_convert_seconds": fit_seconds[name],
            }
        )
    base = runs[0]["latency_ms"]
    table = format_table(
        [
            {
                "model": run["model"],
                "test acc": f"{100 * run['test_accuracy']:.2f}%",
                "test CE": f"{run['test_cross_entropy']:.4f}",
                "artifact bytes": run["artifact_bytes"],
                "x fp32 artifact": f"{run['artifact_ratio_to_fp32_artifact']:.3f}",
                "MACs": run["macs"],
                "eager b1 ms": f"{run['latency_ms']['eager_b1']:.3f}",
                "eager b64 ms": f"{run['latency_ms']['eager_b64']:.2f}",
                "compiled b1 ms": f"{run['latency_ms']['compiled_b1']:.3f}",
                "compiled b64 ms": f"{run['latency_ms']['compiled_b64']:.2f}",
                "compiled b64 x fp32": f"{run['latency_ms']['compiled_b64'] / base['compiled_b64']:.2f}",
            }
            for run in runs
        ]
    )
    lines = table.splitlines()
    config = run_config(args, fp32_state_dict_bytes=fp32_state)
    print("\n".join(lines))
    result = {"config": config, "runs": runs, "table": lines}
    print(json.dumps(result, indent=2))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
