"""The pipeline's edge column: every model of a run as an ExecuTorch ``.pte``, timed at batch 1 side by side.

Called by the evaluation phase with the files the earlier phases wrote; it writes the programs under
``evaluation/edge/`` and fills ``edge_latency_b1_ms`` and ``pte_bytes`` of each report row.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from lightning_hybridcomp._executorch import EDGE_INSTALL, executorch_available
from lightning_hybridcomp.edge import (
    UndelegatedOperatorsError,
    export_executorch,
    load_executorch,
    set_edge_threads,
)
from lightning_hybridcomp.edge_programs import LoweringError
from lightning_hybridcomp.profiling import interleaved_latencies
from lightning_hybridcomp.report import ResultRow

__all__ = ["add_edge_figures"]


def add_edge_figures(
    rows: Sequence[ResultRow],
    sources: Mapping[str, Path],
    folder: Path,
    *,
    test_batches: Sequence[tuple[Tensor, Tensor]],
    threads: int,
    rounds: int,
    warmup: int,
    say: Callable[[str], None],
) -> str:
    """Export each row's model (``sources[row.name]``: artifact or MoE checkpoint) and measure it on ExecuTorch.

    Latency is the median of ``rounds`` interleaved rounds at batch 1 with ``threads`` threads for torch and
    for ExecuTorch's XNNPACK pool alike; ``extra["edge_accuracy"]`` is the program's test accuracy. A model
    XNNPACK cannot lower whole (one quantized for another backend, e.g. ``x86_pt2e``) gets no edge figures:
    ``extra["edge_skipped"]`` holds the refusal naming its operators, and the returned note names it.

    Returns:
        A sentence for the report: what was measured, or why edge figures were skipped.
    """
    if not executorch_available():
        note = f"Edge figures skipped: ExecuTorch is not installed (`{EDGE_INSTALL}` adds them)."
        say(note)
        return note
    folder.mkdir(parents=True, exist_ok=True)
    programs = {}
    for row in rows:
        path = folder / f"{row.name}.pte"
        try:
            metadata = export_executorch(sources[row.name], path)
        except (UndelegatedOperatorsError, LoweringError) as err:
            # Half-delegated programs and programs ExecuTorch cannot build at all (e.g. linear_int8's
            # `_int_mm`) are not timed as edge programs; the report says why instead.
            row.extra["edge_skipped"] = str(err)
            continue
        programs[row.name] = load_executorch(path)
        row.pte_bytes = metadata.size_bytes
    set_edge_threads(threads)
    sample = test_batches[0][0][:1]
    timings = interleaved_latencies(
        {name: (program, sample) for name, program in programs.items()}, rounds=rounds, warmup=warmup
    )
    for row in rows:
        if row.name not in programs:
            continue
        program = programs[row.name]
        row.edge_latency_b1_ms = statistics.median(timings[row.name])
        correct = total = 0
        for x, y in test_batches:
            for chunk, labels in zip(x.split(program.max_batch), y.split(program.max_batch)):
                correct += int((program(chunk).argmax(dim=-1) == labels).sum())
                total += int(labels.numel())
        row.extra["edge_accuracy"] = correct / max(total, 1)
    skipped = [r.name for r in rows if "edge_skipped" in r.extra]
    note = (
        f"Edge: ExecuTorch {_executorch_version()} `.pte` programs on XNNPACK, batch-1 latency as the median of"
        f" {rounds} interleaved rounds at {threads} thread(s) for every model."
    )
    if skipped:
        note += (
            f" No edge figures for {', '.join(skipped)}: XNNPACK cannot lower them whole (an `x86_pt2e` int8"
            " linear layer has no XNNPACK kernel, `linear_int8`'s `_int_mm` is no ExecuTorch operator, and the"
            " runtime has no portable int8 kernels for what stays outside; each reason is in results.json,"
            " `extra.edge_skipped`). Quantize experts with `backend: xnnpack` for edge programs."
        )
    say(note)
    return note


def _executorch_version() -> str:
    try:
        from executorch.version import __version__

        return str(__version__)
    except ImportError:
        return "(unknown version)"
