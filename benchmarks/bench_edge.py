"""Benchmark: the same compressed networks in torch eager, compile_artifact (inductor) and ExecuTorch (XNNPACK).

Two networks, side by side in one run: the package's SmallCNN trained on the embedded digits (16x16), and
the CIFAR-style ``resnet20`` at 3x32x32 with random weights and random data (latency, bytes and MACs do not
depend on the weights). For each: torch eager fp32; ``compile_artifact`` fp32 and int8 (``x86_pt2e`` QAT);
ExecuTorch fp32, int8, pruned fp32 and pruned int8 (pruned with ``StructuredPruning`` to at most
``--target-macs`` of the MACs; int8 from ExecuTorch's XNNPACKQuantizer, post-training calibration on 256
inputs); and the MoE of ``--moe-experts`` (four) pruned int8 experts behind a ``GateNetwork`` in one multi-method ``.pte``,
routed on the host at k = 1 and 2. Latency is the median of ``--rounds`` interleaved rounds at batch 1 and
32, every model at the same thread count (torch and ExecuTorch's XNNPACK pool set alike; run under
``taskset -c 0`` to pin them to one core). Bytes are the file each runtime loads (``.pt2`` or ``.pte``).

Run::

    flock /tmp/hybridcomp-bench.lock taskset -c 0 .venv/bin/python benchmarks/bench_edge.py \\
        --out benchmarks/results/bench_edge.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import add_out_argument, benchmark_trainer, run_config, write_result
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybridcomp.artifacts import compile_artifact, load_artifact, save_artifact
from lightning_hybridcomp.callbacks.pruning import StructuredPruning
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.data import DigitsDataModule
from lightning_hybridcomp.edge import export_executorch, load_executorch, set_edge_threads, xnnpack_ptq
from lightning_hybridcomp.models import ImageClassifier
from lightning_hybridcomp.moe import MoELightningModule
from lightning_hybridcomp.profiling import count_macs, format_table, interleaved_latencies
from lightning_hybridcomp.programs import export_for_artifact

BATCHES = (1, 32)


def _fit(
    model: pl.LightningModule, loader: Any, epochs: int, callbacks: list[pl.Callback], batches: int | None
) -> None:
    limits = {} if batches is None else {"limit_train_batches": batches}
    trainer = benchmark_trainer(epochs, callbacks, limit_val_batches=0, num_sanity_val_steps=0, **limits)
    trainer.fit(model, loader)


def _accuracy(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, chunk: int) -> float:
    with torch.no_grad():
        predictions = torch.cat([fn(part).argmax(dim=-1) for part in x.split(chunk)])
    return float((predictions == y).double().mean())


def _family(
    name: str,
    make: Callable[[], ImageClassifier],
    train: Any,
    test: tuple[Tensor, Tensor] | None,
    calibration: Tensor,
    args: argparse.Namespace,
    folder: Path,
) -> list[dict[str, Any]]:
    """Every runtime and compression of one network, measured side by side."""
    pl.seed_everything(0)
    fp32 = make()
    if args.train_epochs:
        _fit(fp32, train, args.train_epochs, [], None)
    fp32.eval()
    example = calibration[:1]

    pruned = make()
    pruned.load_state_dict(fp32.state_dict())
    pruning = StructuredPruning(
        pruning_ratio=1 - args.target_macs, target="macs", iterative_steps=1, verbose=False
    )
    _fit(pruned, train, 1, [pruning], args.tune_batches)
    pruned.eval()

    x86 = make()
    x86.load_state_dict(fp32.state_dict())
    qat = QuantizationAwareTraining(backend="x86_pt2e", verbose=False)
    _fit(x86, train, 1, [qat], args.tune_batches)
    qat.save_artifact(folder / f"{name}-x86-int8.pt2")
    save_artifact(fp32, folder / f"{name}-fp32.pt2", example)

    files: dict[str, Path] = {
        "compile_artifact fp32": folder / f"{name}-fp32.pt2",
        "compile_artifact int8 (x86_pt2e)": folder / f"{name}-x86-int8.pt2",
    }
    print(f"[{name}] lowering to ExecuTorch ...")
    for label, model, calib in (
        ("ExecuTorch fp32", fp32, None),
        ("ExecuTorch int8", fp32, calibration),
        ("ExecuTorch pruned fp32", pruned, None),
        ("ExecuTorch pruned int8", pruned, calibration),
    ):
        path = folder / f"{name}-{label.split(' ', 1)[1].replace(' ', '-')}.pte"
        export_executorch(model, path, example_inputs=example, max_batch=max(BATCHES), calibration=calib)
        files[label] = path
    # As an exported program: the MoE takes int8 experts as artifacts or programs.
    pruned_int8 = export_for_artifact(xnnpack_ptq(pruned, example, calibration), example)
    moe = MoELightningModule(
        [pruned_int8] * args.moe_experts, top_k=2, input_shape=list(example.shape[1:])
    ).eval()
    export_executorch(moe, folder / f"{name}-moe.pte", max_batch=max(BATCHES))
    files["ExecuTorch MoE"] = folder / f"{name}-moe.pte"

    runners: dict[str, Callable[[Tensor], Tensor]] = {"torch eager fp32": fp32}
    for label in ("compile_artifact fp32", "compile_artifact int8 (x86_pt2e)"):
        runners[label] = compile_artifact(load_artifact(files[label]).module)
    for label in ("ExecuTorch fp32", "ExecuTorch int8", "ExecuTorch pruned fp32", "ExecuTorch pruned int8"):
        runners[label] = load_executorch(files[label])
    for k in (1, 2):
        runner = load_executorch(files["ExecuTorch MoE"])
        runner.top_k = k  # type: ignore[attr-defined]
        runners[f"ExecuTorch MoE k={k}"] = runner

    latencies: dict[str, dict[int, float]] = {label: {} for label in runners}
    for batch in BATCHES:
        inputs = calibration[:1].expand(batch, *example.shape[1:]).contiguous()
        timings = interleaved_latencies(
            {label: (fn, inputs) for label, fn in runners.items()}, rounds=args.rounds, warmup=args.warmup
        )
        for label, values in timings.items():
            latencies[label][batch] = statistics.median(values)

    macs = {
        "fp32": count_macs(fp32, example),
        "pruned": count_macs(pruned, example),
    }
    moe_meta = load_executorch(files["ExecuTorch MoE"]).metadata
    reference = latencies["ExecuTorch fp32"][1]
    eager = latencies["torch eager fp32"][1]
    rows = []
    for label in runners:
        file = files.get(label.split(" k=")[0])
        is_pruned = "pruned" in label
        if label.startswith("ExecuTorch MoE"):
            k = int(label[-1])
            row_macs = moe_meta.extra["gate_macs"] + k * macs["pruned"]
        else:
            row_macs = macs["pruned" if is_pruned else "fp32"]
        row = {
            "network": name,
            "model": label,
            "ms @1": latencies[label][1],
            "x ET fp32 @1": latencies[label][1] / reference,
            "speed-up vs eager @1": eager / latencies[label][1],
            "ms @32": latencies[label][32],
            "bytes": file.stat().st_size if file is not None else None,
            "x ET fp32 bytes": None,
            "MACs": row_macs,
        }
        if file is not None:
            row["x ET fp32 bytes"] = file.stat().st_size / files["ExecuTorch fp32"].stat().st_size
        if test is not None:
            row["test acc"] = _accuracy(runners[label], *test, chunk=max(BATCHES))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "benchmarks/results/bench_edge.json")
    parser.add_argument("--threads", type=int, default=1, help="torch and XNNPACK threads for every model")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--train-epochs", type=int, default=4, help="digits training epochs (0: untrained)")
    parser.add_argument("--target-macs", type=float, default=0.25, help="MACs kept by pruning")
    parser.add_argument(
        "--tune-batches", type=int, default=8, help="fine-tuning batches of the pruning and x86 QAT runs"
    )
    parser.add_argument(
        "--networks", nargs="+", default=["digits", "resnet20"], choices=["digits", "resnet20"]
    )
    parser.add_argument("--moe-experts", type=int, default=4, help="experts of the MoE program (at least 2)")
    args = parser.parse_args()
    if args.moe_experts < 2:
        parser.error("--moe-experts must be at least 2")
    torch.set_num_threads(args.threads)
    set_edge_threads(args.threads)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "digits" in args.networks:
            dm = DigitsDataModule(batch_size=64, image_size=16, seed=0)
            dm.setup("fit")
            dm.setup("test")
            x_test = torch.cat([x for x, _ in dm.test_dataloader()])
            y_test = torch.cat([y for _, y in dm.test_dataloader()])
            calibration = torch.cat([x for x, _ in dm.train_dataloader()])[:256]
            rows += _family(
                "digits 1x16x16",
                lambda: ImageClassifier(backbone="small_cnn", num_classes=10, in_channels=1, image_size=16),
                dm,
                (x_test, y_test),
                calibration,
                args,
                folder,
            )
        if "resnet20" in args.networks:
            generator = torch.Generator().manual_seed(0)
            images = torch.randn(256, 3, 32, 32, generator=generator)
            labels = torch.randint(0, 10, (256,), generator=generator)
            loader = DataLoader(TensorDataset(images, labels), batch_size=32)
            no_training = argparse.Namespace(**{**vars(args), "train_epochs": 0})
            rows += _family(
                "resnet20 3x32x32",
                lambda: ImageClassifier(backbone="resnet20", num_classes=10, in_channels=3, image_size=32),
                loader,
                None,
                images,
                no_training,
                folder,
            )
    print(format_table(rows, title=f"ExecuTorch vs torch, {args.threads} thread(s)"))
    write_result(args.out, {"config": run_config(args), "rows": rows})


if __name__ == "__main__":
    main()
