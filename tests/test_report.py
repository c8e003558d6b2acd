from __future__ import annotations

import json
import struct

import pytest

from lightning_hybridcomp.report import ResultRow, pareto_front, report_table, write_report


def _rows() -> list[ResultRow]:
    return [
        ResultRow("baseline", "baseline", 0.99, 100_000, 6e6, 400_000, 1.0, 8.0),
        ResultRow("small", "expert", 0.97, 25_000, 1.5e6, 50_000, 0.5, 2.0),
        ResultRow("moe-k2", "moe", 0.985, 60_000, 2.4e6, 110_000, 0.8, 4.0),
    ]


def test_pareto_front_against_brute_force() -> None:
    points = [(3.0, 0.5), (1.0, 0.4), (2.0, 0.6), (5.0, 0.55), (4.0, 0.9), (0.5, 0.1)]
    dominated = {
        i
        for i, (c, a) in enumerate(points)
        if any((c2 <= c and a2 >= a) and (c2, a2) != (c, a) for c2, a2 in points)
    }
    assert set(pareto_front(points)) == set(range(len(points))) - dominated
    assert pareto_front(points) == [5, 1, 2, 4]


def test_report_files_and_ratios(tmp_path) -> None:
    paths = write_report(tmp_path, _rows(), header="digits", metadata={"seed": 0})
    results = json.loads(paths["results"].read_text())
    assert results["baseline"] == "baseline"
    small = next(m for m in results["models"] if m["name"] == "small")
    assert small["ratios"]["macs"] == pytest.approx(0.25)
    assert small["ratios"]["bytes"] == pytest.approx(0.125)
    assert small["ratios"]["latency_b64_ms"] == pytest.approx(0.25)
    text = paths["report"].read_text()
    assert "| small " in text and "0.25" in text and "pareto.png" in text
    png = paths["pareto"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1100, 450)
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_table_has_every_column() -> None:
    header = report_table(_rows()).splitlines()[0]
    for column in ("test acc (%)", "params", "MACs/sample", "bytes", "ms @1", "ms @64", "x MACs", "x bytes"):
        assert column in header


def test_empty_report_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="at least one result row"):
        write_report(tmp_path, [])
