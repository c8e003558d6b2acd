"""Benchmark: 17 torchvision classifiers through StructuredPruning -> QuantizationAwareTraining -> artifact.

Each network is built as a new user would (``num_classes=10``, random init, no download) and trained on
random 3x32x32 images by a generic LightningModule holding it as ``self.model`` (cross-entropy, SGD), with
``StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=0)`` then
``QuantizationAwareTraining("x86_pt2e")`` in one ``Trainer.fit``. The int8 network is saved with
``qat.save_artifact`` and reloaded. Recorded per network: whether pruning and prune+QAT worked (or the
package's refusal and how long it took), MACs/params ratios after pruning, the artifact's dtype and
quantize ops, bit-for-bit determinism of the in-memory and reloaded int8 program, artifact bytes against
the fp32 artifact of the unpruned network, and the ``compile_artifact`` latency of int8 against fp32
(median of interleaved calls). Every network runs in its own subprocess, one after the other, with a
timeout, so that a crash or a hang costs one row.

``--accuracy`` adds a real-data check: torchvision ResNet-18 on the embedded digits at 32x32, fp32 against
the same run with QAT in its last epochs.

Run::

    .venv/bin/python benchmarks/bench_architectures.py --accuracy --out /tmp/bench_architectures.json \\
        --markdown docs/architectures.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARCHITECTURES = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "densenet121",
    "regnet_y_400mf",
    "mnasnet0_5",
    "googlenet",
    "convnext_tiny",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
    "swin_t",
    "vit_b_16",
)
IMAGE_SIZE = 32
REFUSALS = ("StructuredPruning cannot prune", "QuantizationAwareTraining cannot quantize")


# --------------------------------------------------------------------------- one network (child process)


def _build(arch: str) -> Any:
    import torchvision.models as tvm

    kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
    if arch == "vit_b_16":
        kwargs["image_size"] = IMAGE_SIZE
    if arch == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    return tvm.get_model(arch, **kwargs)


def _user_module(net: Any) -> Any:
    """The LightningModule a new user writes around a torchvision network."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    class UserModule(pl.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return UserModule(net)


def _failure(err: BaseException) -> str:
    """Exception type and the first line of its message (the first ~200 characters of a refusal)."""
    text = " ".join(str(err).split()) if str(err).startswith(REFUSALS) else str(err).strip().split("\n")[0]
    text = text[:200] if text.startswith(REFUSALS) else text[:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fit(
    net: Any, callbacks: list[Any], epochs: int, batches: int, batch_size: int
) -> tuple[float, BaseException | None]:
    """``Trainer.fit`` on random 3x32x32 data; the seconds it took and the exception, if any."""
    import torch
    from _common import benchmark_trainer
    from torch.utils.data import DataLoader, TensorDataset

    samples = batches * batch_size
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        torch.randint(0, 10, (samples,), generator=generator),
    )
    trainer = benchmark_trainer(epochs, callbacks, num_sanity_val_steps=0)
    start = time.perf_counter()
    try:
        trainer.fit(_user_module(net), DataLoader(data, batch_size=batch_size, shuffle=True))
    except Exception as err:
        return time.perf_counter() - start, err
    return time.perf_counter() - start, None


def _interleaved_latency(fp32: Any, int8: Any, x: Any, rounds: int) -> tuple[float, float]:
    """Median ms of fp32 and int8, called alternately (fp32, int8, fp32, ...) so load changes hit both."""
    from lightning_hybridcomp.profiling import measure_latency

    samples: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(rounds):
        samples["fp32"].append(measure_latency(fp32, x, warmup=0, repeats=1))
        samples["int8"].append(measure_latency(int8, x, warmup=0, repeats=1))
    return statistics.median(samples["fp32"]), statistics.median(samples["int8"])


def _run_architecture(args: argparse.Namespace) -> None:
    """Fill ``args.row_file`` with the figures of one network, rewriting it after every stage."""
    import lightning.pytorch as pl
    import torch

    row: dict[str, Any] = {"arch": args.worker}

    def record(**figures: Any) -> None:
        row.update(figures)
        # Replaced whole, so that the parent polling the stage never reads half a file.
        partial = Path(f"{args.row_file}.partial")
        partial.write_text(json.dumps(row))
        os.replace(partial, args.row_file)

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    # Inside the parent's folder, which is removed even when this process is killed.
    with tempfile.TemporaryDirectory(dir=Path(args.row_file).parent) as folder:
        try:
            _measure_architecture(args, Path(folder), record)
        except Exception as err:  # anything after training: saving, reloading, comparing
            record(**{f"{row.get('stage', 'start')}_failure": _failure(err)})


def _measure_architecture(args: argparse.Namespace, folder: Path, record: Any) -> None:
    import torch

    from lightning_hybridcomp.artifacts import load_artifact, save_artifact
    from lightning_hybridcomp.callbacks.pruning import StructuredPruning
    from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining

    net = _build(args.worker)
    example = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    fp32 = None
    try:
        fp32 = save_artifact(copy.deepcopy(net).eval(), folder / "fp32.pt2", example, steps=("fp32",))
        record(fp32_bytes=fp32.size_bytes, fp32_macs=fp32.macs, fp32_params=fp32.params)
    except Exception as err:  # the table still says what pruning and QAT make of the network
        record(fp32_artifact_failure=_failure(err))

    record(stage="fit")
    pruning = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=0, verbose=False)
    qat = QuantizationAwareTraining("x86_pt2e", verbose=False)
    fit_seconds, error = _fit(net, [pruning, qat], 3, args.batches, args.batch_size)
    summary = pruning.step_summaries[-1] if pruning.step_summaries else None
    refused = error is not None and isinstance(error, ValueError) and str(error).startswith(REFUSALS)
    record(
        fit_seconds=fit_seconds,
        pruning_steps=len(pruning.step_summaries),
        macs_ratio=summary["macs_ratio"] if summary else None,
        params_ratio=summary["params_ratio"] if summary else None,
        pruning_ok=len(pruning.step_summaries) == 2,
        prune_qat_ok=error is None,
        refused=refused,
        refusal_seconds=fit_seconds if refused else None,
        fit_failure=None if error is None else _failure(error),
        refusal_message=" ".join(str(error).split()) if refused else None,
    )
    if error is not None:
        if refused and str(error).startswith(REFUSALS[1]):
            # QAT refused before pruning ran: whether pruning alone works is a row figure of its own.
            record(stage="pruning_alone")
            alone = StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=0, verbose=False)
            _, pruning_error = _fit(_build(args.worker), [alone], 2, args.batches, args.batch_size)
            last = alone.step_summaries[-1] if alone.step_summaries else None
            record(
                pruning_ok=pruning_error is None and len(alone.step_summaries) == 2,
                macs_ratio=last["macs_ratio"] if last else None,
                params_ratio=last["params_ratio"] if last else None,
                pruning_alone_failure=None if pruning_error is None else _failure(pruning_error),
            )
        return

    record(stage="artifact")
    int8 = qat.save_artifact(folder / "int8.pt2", example)
    loaded = load_artifact(folder / "int8.pt2")
    in_memory = qat.quantized_network
    assert in_memory is not None
    in_memory.eval()
    with torch.no_grad():
        first, second = in_memory(example), in_memory(example)
        reloaded, reloaded_again = loaded.module(example), loaded.module(example)
    record(
        dtype=int8.dtype,
        int8_bytes=int8.size_bytes,
        bytes_ratio=None if fp32 is None else int8.size_bytes / fp32.size_bytes,
        quantize_ops=sum(
            count for op, count in int8.extra.get("ops", {}).items() if op.startswith("quantize_per")
        ),
        in_memory_repeatable=torch.equal(first, second),
        reload_equal=torch.equal(first, reloaded),
        reload_repeatable=torch.equal(reloaded, reloaded_again),
    )
    if not args.no_latency and fp32 is not None:
        record(stage="compile")
        _record_latency(args, folder, loaded.module, example, record)


def _record_latency(args: argparse.Namespace, folder: Path, int8: Any, example: Any, record: Any) -> None:
    """Compiled int8 against compiled fp32 of the unpruned network; a compile failure is one line."""
    from lightning_hybridcomp.artifacts import compile_artifact, load_artifact

    inputs = {batch: example[:1].repeat(batch, 1, 1, 1) for batch in args.latency_batches}
    compiled, failures = {}, []
    for name, module in (("fp32", load_artifact(folder / "fp32.pt2").module), ("int8", int8)):
        start = time.perf_counter()
        compiled[name] = compile_artifact(module)
        try:
            for x in inputs.values():
                compiled[name](x)  # compiles, under no_grad (compile_artifact's wrapper)
        except Exception as err:  # the other program is still tried, so the line says which one fails
            failures.append(f"{name} at batch {len(x)}: {_failure(err)}")
        record(**{f"compile_seconds_{name}": time.perf_counter() - start})
    if failures:
        record(compile_failure="; ".join(failures))
        return
    for batch, x in inputs.items():
        fp32_ms, int8_ms = _interleaved_latency(compiled["fp32"], compiled["int8"], x, args.rounds)
        record(
            **{
                f"fp32_ms_b{batch}": fp32_ms,
                f"int8_ms_b{batch}": int8_ms,
                f"latency_ratio_b{batch}": int8_ms / fp32_ms,
            }
        )


# --------------------------------------------------------------------------- the table (parent process)


def _run_in_subprocess(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """One network in a child process; a crash or a timeout is a row of its own."""
    with tempfile.TemporaryDirectory(prefix="bench_arch_") as tmp:
        row_file, log_file = Path(tmp) / "row.json", Path(tmp) / "log.txt"
        command = [sys.executable, __file__, "--worker", arch, "--row-file", str(row_file)]
        command += [f"--rounds={args.rounds}", f"--threads={args.threads}", f"--batches={args.batches}"]
        command += [f"--batch-size={args.batch_size}", "--latency-batches", *map(str, args.latency_batches)]
        command += ["--no-latency"] if args.no_latency else []
        # A fresh inductor cache: every run compiles as a new user's first run does.
        env = {
            **os.environ,
            "PYTHONWARNINGS": "ignore",
            "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
        }
        start = time.perf_counter()
        with log_file.open("w") as log:
            # Its own session, so that a timeout also ends inductor's compile workers.
            child = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
            timeout = _wait_or_time_out(child, row_file, args)
        wall = time.perf_counter() - start
        row = json.loads(row_file.read_text()) if row_file.exists() else {"arch": arch}
        row["wall_seconds"] = wall
        returncode = child.returncode
        if timeout is not None:
            row["process_failure"] = timeout
        elif returncode != 0:
            lines = [line for line in log_file.read_text().splitlines() if line.strip()]
            row["process_failure"] = (
                f"crashed (exit {returncode}) after stage {row.get('stage', 'none')}: "
                + (lines[-1][:300] if lines else "no output")
            )
        return row


def _wait_or_time_out(child: subprocess.Popen[bytes], row_file: Path, args: argparse.Namespace) -> str | None:
    """Wait for the child; kill its session past ``--timeout`` or when its fit outlasts ``--fit-timeout``."""
    start = time.perf_counter()
    fit_start = None
    while True:
        try:
            child.wait(timeout=1.0)
            return None
        except subprocess.TimeoutExpired:
            pass
        now = time.perf_counter()
        stage = json.loads(row_file.read_text()).get("stage") if row_file.exists() else None
        if stage == "fit" and fit_start is None:
            fit_start = now
        if now - start > args.timeout:
            reason = f"timeout after {args.timeout:.0f} s (last stage reached: {stage or 'none'})"
        elif fit_start is not None and stage == "fit" and now - fit_start > args.fit_timeout:
            reason = f"timeout: the prune+QAT fit did not end within {args.fit_timeout:.0f} s"
        else:
            continue
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return reason


def _yes_no(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _ratio(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table_rows(rows: list[dict[str, Any]], latency_batches: list[int]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        failed = row.get("compile_failure") and "compile failed"
        latency = {
            f"compiled b{batch} x fp32": failed or _ratio(row.get(f"latency_ratio_b{batch}"), 2)
            for batch in latency_batches
        }
        out.append(
            {
                "architecture": row["arch"],
                "pruning ok": _yes_no(row.get("pruning_ok")),
                "MACs x": _ratio(row.get("macs_ratio")),
                "params x": _ratio(row.get("params_ratio")),
                "prune+QAT ok": _yes_no(row.get("prune_qat_ok")),
                "dtype": row.get("dtype", "-"),
                "quantize ops": row.get("quantize_ops", "-"),
                "int8 repeatable": _yes_no(row.get("in_memory_repeatable")),
                "reload == in-memory": _yes_no(row.get("reload_equal")),
                "reload repeatable": _yes_no(row.get("reload_repeatable")),
                "bytes x fp32": _ratio(row.get("bytes_ratio")),
                **latency,
                "wall s": f"{row['wall_seconds']:.0f}",
            }
        )
    return out


def _latency_rows(rows: list[dict[str, Any]], latency_batches: list[int]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        figures: dict[str, Any] = {"architecture": row["arch"]}
        for batch in latency_batches:
            figures[f"fp32 b{batch} ms"] = _ratio(row.get(f"fp32_ms_b{batch}"), 2)
            figures[f"int8 b{batch} ms"] = _ratio(row.get(f"int8_ms_b{batch}"), 2)
        figures["fp32 compile s"] = _ratio(row.get("compile_seconds_fp32"), 0)
        figures["int8 compile s"] = _ratio(row.get("compile_seconds_int8"), 0)
        out.append(figures)
    return out


FAILURE_KEYS = (
    ("process_failure", "process"),
    ("fp32_artifact_failure", "fp32 artifact of the unpruned network"),
    ("start_failure", "building the network"),
    ("fit_failure", "prune+QAT fit"),
    ("pruning_alone_failure", "pruning alone"),
    ("artifact_failure", "int8 artifact"),
    ("compile_failure", "compile"),
)


def _failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        for key, what in FAILURE_KEYS:
            if row.get(key):
                after = (
                    f", refused after {row['refusal_seconds']:.1f} s"
                    if key == "fit_failure" and row.get("refused")
                    else ""
                )
                lines.append(f"- **{row['arch']}** ({what}{after}): `{row[key]}`")
    return lines


# --------------------------------------------------------------------------- accuracy on real data


def _accuracy_check(args: argparse.Namespace) -> dict[str, Any]:
    """torchvision ResNet-18 on the embedded digits at 32x32: fp32 against QAT in the last epochs."""
    import lightning.pytorch as pl
    import torch
    from _common import benchmark_trainer

    from lightning_hybridcomp.artifacts import load_artifact
    from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
    from lightning_hybridcomp.data import DigitsDataModule
    from lightning_hybridcomp.models import ImageClassifier

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"epochs": args.accuracy_epochs, "qat_epochs": args.accuracy_qat_epochs}
    for name in ("fp32", "QAT int8"):
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, image_size=IMAGE_SIZE, seed=0)
        # ImageClassifier adapts torchvision's first convolution to the digits' one channel.
        model = ImageClassifier("resnet18", num_classes=10, in_channels=1, image_size=IMAGE_SIZE, lr=1e-3)
        callbacks = []
        if name == "QAT int8":
            start_epoch = args.accuracy_epochs - args.accuracy_qat_epochs
            callbacks = [QuantizationAwareTraining("x86_pt2e", start_epoch=start_epoch, verbose=False)]
        trainer = benchmark_trainer(args.accuracy_epochs, callbacks, num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(model, dm)
        fit_seconds = time.perf_counter() - start
        accuracy = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
        result[name] = {"test_accuracy": accuracy, "fit_seconds": fit_seconds}
        if callbacks:
            with tempfile.TemporaryDirectory() as tmp:
                meta = callbacks[0].save_artifact(Path(tmp) / "resnet18_int8.pt2")
                loaded = load_artifact(Path(tmp) / "resnet18_int8.pt2").module
                correct = total = 0
                with torch.no_grad():
                    for x, y in dm.test_dataloader():
                        correct += int((loaded(x).argmax(1) == y).sum())
                        total += len(y)
            result[name].update(dtype=meta.dtype, artifact_test_accuracy=correct / total, test_images=total)
    return result


# --------------------------------------------------------------------------- the page


def _markdown(
    args: argparse.Namespace,
    command: str,
    rows: list[dict[str, Any]],
    accuracy: dict[str, Any] | None,
    seconds: dict[str, float],
) -> str:
    from lightning_hybridcomp.profiling import format_table

    latency_note = (
        "Latency was not timed (`--no-latency`)."
        if args.no_latency
        else "*compiled bN x fp32* is the median latency at batch N of the int8 artifact over the fp32 artifact of"
        f" the unpruned network, both through `compile_artifact`, from {args.rounds} interleaved calls (fp32, int8,"
        f" fp32, ...) after compilation, {args.threads} torch thread(s) for both."
    )
    parts = [
        "# Torchvision architectures",
        "",
        'Which torchvision classifiers go through `StructuredPruning` -> `QuantizationAwareTraining("x86_pt2e")`'
        " -> `save_artifact` / `load_artifact` as they come, built as a new user would (`num_classes=10`, random"
        " init, no weights download; `vit_b_16` with `image_size=32`, `googlenet` with `aux_logits=False,"
        " init_weights=True`) and trained on random 3x32x32 images by a generic LightningModule that holds the"
        " network as `self.model` (cross-entropy, SGD). One `Trainer.fit` of 3 epochs with"
        " `StructuredPruning(pruning_ratio=0.5, iterative_steps=2, start_epoch=0)` and"
        ' `QuantizationAwareTraining("x86_pt2e")` (fake quantization starts after the last pruning step), then'
        " `qat.save_artifact(...)` and `load_artifact(...)`. Each network runs in its own process, one at a time.",
        "",
        "Produced by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Wall time of that run: {seconds['table'] / 60:.1f} min for the table"
        + (f", {seconds['accuracy'] / 60:.1f} min for the accuracy check." if accuracy is not None else "."),
        "",
        "## Results",
        "",
        format_table(_table_rows(rows, [] if args.no_latency else args.latency_batches)),
        "",
        "Columns: *MACs x* / *params x* are the pruned network's MACs and parameters over the unpruned ones"
        " (`StructuredPruning.step_summaries[-1]`); *quantize ops* counts the quantize operators of the int8"
        ' program (`metadata.extra["ops"]`); *int8 repeatable* is two calls of the in-memory int8 network on'
        " the same input giving equal outputs bit for bit (`torch.equal`), *reload == in-memory* the reloaded"
        " artifact against the in-memory int8 network, *reload repeatable* two calls of the reloaded program;"
        " *bytes x fp32* is the int8 artifact's bytes over the fp32 artifact of the unpruned network. "
        + latency_note,
    ]
    timed = [row for row in rows if any(f"fp32_ms_b{batch}" in row for batch in args.latency_batches)]
    if timed and not args.no_latency:
        parts += [
            "",
            "### Compiled latency, absolute",
            "",
            format_table(_latency_rows(timed, args.latency_batches)),
        ]
    failures = _failure_lines(rows)
    if failures:
        parts += ["", "## Failures and refusals, as reported", "", *failures]
    refusals = [row for row in rows if row.get("refusal_message")]
    if refusals:
        parts += ["", "### The refusals in full (the package's hint included)", ""]
        parts += [f"- **{row['arch']}**: {row['refusal_message']}" for row in refusals]
    if accuracy is not None:
        fp32, int8 = accuracy["fp32"], accuracy["QAT int8"]
        parts += [
            "",
            "## Accuracy on real data: ResNet-18 on the embedded digits",
            "",
            f'torchvision `resnet18` (`ImageClassifier("resnet18", in_channels=1, image_size=32)`, first'
            f" convolution adapted to one channel) on `DigitsDataModule(image_size=32)`, {accuracy['epochs']}"
            f" epochs, AdamW lr 1e-3 with a cosine schedule, seed 0; the QAT run inserts fake quantization"
            f" (x86_pt2e) for the last {accuracy['qat_epochs']} epochs, without pruning.",
            "",
            format_table(
                [
                    {
                        "model": "fp32",
                        "test accuracy": f"{100 * fp32['test_accuracy']:.2f}%",
                        "fit s": f"{fp32['fit_seconds']:.0f}",
                    },
                    {
                        "model": f"QAT {int8['dtype']}",
                        "test accuracy": f"{100 * int8['test_accuracy']:.2f}%",
                        "fit s": f"{int8['fit_seconds']:.0f}",
                    },
                    {
                        "model": f"QAT {int8['dtype']}, reloaded artifact",
                        "test accuracy": f"{100 * int8['artifact_test_accuracy']:.2f}%",
                        "fit s": "-",
                    },
                ]
            ),
            "",
            f"Test split: {int8['test_images']} images.",
        ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- entry point


def main() -> None:
    from _common import add_out_argument, run_config, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archs", nargs="*", choices=ARCHITECTURES, default=list(ARCHITECTURES), metavar="ARCH",
        help="networks to run (default: all 17; none with a bare --archs)",
    )  # fmt: skip
    parser.add_argument("--no-latency", action="store_true", help="skip the compiled latency timing")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed calls per model and batch")
    parser.add_argument("--latency-batches", type=int, nargs="+", choices=(1, 16), default=[16])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (training and timing)")
    parser.add_argument("--batches", type=int, default=2, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per network")
    parser.add_argument(
        "--fit-timeout", type=float, default=180.0, help="seconds for the prune+QAT fit of one network"
    )
    parser.add_argument(
        "--accuracy", action="store_true", help="also run the ResNet-18 digits accuracy check"
    )
    parser.add_argument("--accuracy-epochs", type=int, default=6)
    parser.add_argument("--accuracy-qat-epochs", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="write the docs page to this file")
    parser.add_argument("--worker", choices=ARCHITECTURES, help=argparse.SUPPRESS)
    parser.add_argument("--row-file", help=argparse.SUPPRESS)
    add_out_argument(parser, "benchmarks/results/bench_architectures.json")
    args = parser.parse_args()
    if args.worker:
        _run_architecture(args)
        return

    start = time.perf_counter()
    rows = []
    for arch in args.archs:
        row = _run_in_subprocess(arch, args)
        rows.append(row)
        failures = [row[key] for key, _ in FAILURE_KEYS if row.get(key)]
        print(f"{arch}: {'; '.join(failures) or 'ok'} ({row['wall_seconds']:.0f} s)", flush=True)
    seconds = {"table": time.perf_counter() - start}
    accuracy = _accuracy_check(args) if args.accuracy else None
    seconds["accuracy"] = time.perf_counter() - start - seconds["table"]

    from lightning_hybridcomp.profiling import format_table

    table = format_table(_table_rows(rows, [] if args.no_latency else args.latency_batches)) if rows else ""
    print("\n" + table)
    print("\n".join(_failure_lines(rows)))
    if accuracy is not None:
        print(json.dumps(accuracy, indent=2))
    print(
        f"\nWall time: {seconds['table']:.0f} s for the table, {seconds['accuracy']:.0f} s for the accuracy check"
    )
    command = "python benchmarks/bench_architectures.py " + " ".join(sys.argv[1:])
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            _markdown(args, command.replace("python", ".venv/bin/python", 1), rows, accuracy, seconds)
        )
        print(f"Wrote {args.markdown}")
    config = run_config(args, table_seconds=seconds["table"], accuracy_seconds=seconds["accuracy"])
    result = {"config": config, "rows": rows, "accuracy": accuracy, "table": table.splitlines()}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
