"""Runs one benchmark script on a miniature budget and reads the JSON it writes.

Each ``test_bench_*.py`` file runs one script this way: the run guards that the script keeps working and
measures what it claims; the recorded figures in ``benchmarks/results`` come from the full budgets in the
docs. One file per script, so that the two test workers share them out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, out: Path, *args: str) -> dict[str, Any]:
    """Run ``benchmarks/<script> --out <out> *args``; assert it succeeded and return its JSON."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"Wrote {out}" in result.stdout
    return json.loads(out.read_text())
