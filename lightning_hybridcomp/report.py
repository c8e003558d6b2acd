"""The pipeline's report: one table of figures as Markdown, JSON and a Pareto plot.

Pure functions over measured rows; nothing here trains or measures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_hybridcomp._io import atomic_path, write_bytes_atomic
from lightning_hybridcomp.profiling import figure_ratios, format_table

__all__ = ["ResultRow", "pareto_front", "write_report"]

_FIGURES = (
    "accuracy",
    "params",
    "macs",
    "bytes",
    "latency_b1_ms",
    "latency_b64_ms",
    "edge_latency_b1_ms",
    "pte_bytes",
)


@dataclass
class ResultRow:
    """The measured figures of one model of a pipeline run.

    Attributes:
        name: model name shown in the table (``baseline``, the expert names, ``moe-k2``, ...).
        kind: ``"baseline"``, ``"expert"`` or ``"moe"``.
        accuracy: test accuracy in [0, 1].
        params: parameter elements (for an MoE: the gate plus all experts).
        macs: MACs per sample (for an MoE: the expected MACs given the measured routing).
        bytes: bytes on disk of the deployable files (for an MoE: the gate plus all experts).
        latency_b1_ms: median CPU latency at batch size 1.
        latency_b64_ms: median CPU latency at batch size 64.
        extra: anything else worth recording (steps applied, expert loads, ...).
        edge_latency_b1_ms: median latency at batch size 1 of the model's ExecuTorch ``.pte`` (XNNPACK).
        pte_bytes: bytes of that ``.pte`` (for an MoE: one program holding the gate and every expert).
    """

    name: str
    kind: str
    accuracy: float
    params: int
    macs: float
    bytes: int
    latency_b1_ms: float | None = None
    latency_b64_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    edge_latency_b1_ms: float | None = None
    pte_bytes: int | None = None


def _ratios(row: ResultRow, baseline: ResultRow) -> dict[str, float | None]:
    return figure_ratios(row, baseline, _FIGURES[1:])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (lower cost, higher accuracy), sorted by cost.

    Example::

        >>> pareto_front([(10, 0.9), (5, 0.8), (6, 0.7), (20, 0.95)])
        [1, 0, 3]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plot(rows: Sequence[ResultRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"baseline": "black", "expert": "tab:blue", "moe": "tab:red"}
    markers = {"baseline": "*", "expert": "o", "moe": "D"}
    panels = [("macs", "MACs per sample"), ("bytes", "bytes on disk")]
    if _has_edge(rows):
        panels.append(("edge_latency_b1_ms", "ExecuTorch ms at batch 1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), dpi=100)
    for ax, (key, label) in zip(axes, panels):
        points = [(float(getattr(r, key) or 0.0), 100 * r.accuracy) for r in rows]
        for i, (row, (x, y)) in enumerate(zip(rows, points)):
            ax.scatter(
                x, y, c=colours.get(row.kind, "grey"), marker=markers.get(row.kind, "o"), s=60, zorder=3
            )
            # Alternate label sides so that neighbours at equal accuracy stay readable.
            offset = (5, 5 if i % 2 else -11)
            ax.annotate(row.name, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", c="grey", lw=1, zorder=2)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Accuracy against cost: baseline (star), experts (circles), MoE (diamonds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _has_edge(rows: Sequence[ResultRow]) -> bool:
    return any(r.edge_latency_b1_ms is not None for r in rows)


def report_table(rows: Sequence[ResultRow]) -> str:
    """The report's Markdown table: every figure, and each as a ratio to the baseline row.

    The ExecuTorch columns (``edge ms @1``, ``.pte bytes``) appear when any row has edge figures.
    """
    baseline = next((r for r in rows if r.kind == "baseline"), rows[0])
    table = []
    for row in rows:
        ratios = _ratios(row, baseline)
        edge = {}
        if _has_edge(rows):
            edge = {
                "edge ms @1": row.edge_latency_b1_ms,
                "x edge ms @1": ratios["edge_latency_b1_ms"],
                ".pte bytes": row.pte_bytes,
            }
        table.append(
            {
                "model": row.name,
                "test acc (%)": round(100 * row.accuracy, 2),
                "params": row.params,
                "x params": ratios["params"],
                "MACs/sample": round(row.macs),
                "x MACs": ratios["macs"],
                "bytes": row.bytes,
                "x bytes": ratios["bytes"],
                "ms @1": row.latency_b1_ms,
                "x ms @1": ratios["latency_b1_ms"],
                "ms @64": row.latency_b64_ms,
                "x ms @64": ratios["latency_b64_ms"],
                **edge,
            }
        )
    return format_table(table)


def write_report(
    run_dir: str | os.PathLike[str],
    rows: Sequence[ResultRow],
    *,
    header: str = "",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``results.json`` and ``pareto.png`` into ``run_dir``.

    Each file is written to a temporary name first and renamed, so an interrupted write never leaves a
    half-written report behind.

    Raises:
        ValueError: if ``rows`` is empty.
    """
    if not rows:
        raise ValueError("Expected at least one result row to report, got none.")
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    baseline = next((r for r in rows if r.kind == "baseline"), rows[0])
    results = {
        "metadata": metadata or {},
        "baseline": baseline.name,
        "models": [{**asdict(r), "ratios": _ratios(r, baseline)} for r in rows],
    }
    paths = {"report": out / "report.md", "results": out / "results.json", "pareto": out / "pareto.png"}
    write_bytes_atomic(paths["results"], json.dumps(results, indent=2).encode())
    text = "\n".join(
        [
            "# hybridcomp pipeline report",
            "",
            header,
            "",
            report_table(rows),
            "",
            "Ratios are to the baseline. Latency is the median CPU forward time at batch 1 and 64, every model",
            "timed once per round in the same rounds; *edge ms @1* is the batch-1 latency of the model's",
            "ExecuTorch program.",
            "",
            "![accuracy against cost](pareto.png)",
            "",
        ]
    )
    write_bytes_atomic(paths["report"], text.encode())
    _plot(rows, paths["pareto"])
    return paths
