"""The Fashion-MNIST benchmark puts the method beside its anchors.

On a miniature budget (see ``tests/benchmarks/_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks._run import run_benchmark


def _write_fashion_fixture(folder: Path, n_train: int = 320, n_test: int = 64) -> None:
    """Four small IDX files in Fashion-MNIST's names: class-dependent brightness, so models can learn."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
            header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


@pytest.mark.slow
def test_fashion_mnist_benchmark_puts_the_method_beside_its_anchors(tmp_path: Path) -> None:
    _write_fashion_fixture(tmp_path / "fashion")
    figures = run_benchmark(
        "bench_fashion_mnist.py", tmp_path / "fashion.json",
        f"--data-dir={tmp_path / 'fashion'}", f"--run-dir={tmp_path / 'run'}",
        "--set=data.init_args.val_size=64", "--set=data.init_args.batch_size=32",
        "--set=baseline.max_epochs=1", "--set=moe.max_epochs=1", "--set=trainer.limit_train_batches=2",
        "--set=experts=[" + ", ".join(
            f"{{name: e{i}, pruning: {{pruning_ratio: 0.7, target: macs, iterative_steps: 1, importance: {imp}}},"
            f" quantization: {{backend: x86_pt2e}}, max_epochs: 2, seed: {i}}}"
            for i, imp in enumerate(("l2", "fpgm"))
        ) + "]",
        "--set=trainer.limit_val_batches=1", "--set=evaluation.compile=false", "--set=evaluation.edge=false",
        "--set=evaluation.repeats=1", "--set=evaluation.warmup=0", "--set=evaluation.latency_batch_sizes=[1]",
    )  # fmt: skip
    rows = {row["name"]: row for row in figures["rows"]}
    names = set(rows)
    assert {"baseline", "moe-k1", "moe-k2", "moe-k1-tuned", "moe-k2-tuned"} <= names
    assert {"post-training int8", "torch-pruning loop (fp32)"} <= names
    assert any(n.startswith("ModelPruning") for n in names) and any(
        n.startswith("best single") for n in names
    )
    base = rows["baseline"]
    experts = [r for r in figures["rows"] if r["kind"] == "expert"]
    assert len(experts) == 2
    mean_macs = sum(r["macs"] for r in experts) / 2
    assert rows["torch-pruning loop (fp32)"]["macs"] == pytest.approx(mean_macs, rel=0.1)
    masked = next(r for n, r in rows.items() if n.startswith("ModelPruning"))
    assert masked["macs"] == base["macs"]  # masks remove no MACs
    assert rows["post-training int8"]["bytes"] < base["bytes"]
    assert rows["moe-k2"]["extra"]["epochs"] == 1 + sum(r["extra"]["epochs"] - 1 for r in experts) + 1
    for row in figures["rows"]:
        assert row["drop_pt"] == pytest.approx(round(100 * (base["accuracy"] - row["accuracy"]), 2))
    assert (tmp_path / "fashion_mnist_report" / "pareto.png").is_file()
