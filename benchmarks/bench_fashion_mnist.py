"""Benchmark: the whole method on Fashion-MNIST beside the anchors a user would pick instead.

Runs ``hybridcomp pipeline`` on ``examples/pipeline_fashion_mnist.yaml`` (baseline, pruned int8 experts, the
MoE at k = 1 and k = 2, measured on the 10,000 test images; resumable in ``--run-dir``), then trains from the
same baseline weights, on the same data and the same fine-tuning budget as one expert:

* Lightning's ``ModelPruning`` (L1 unstructured masks) at the experts' mean parameter sparsity;
* a plain torch-pruning prune-and-fine-tune loop (``MetaPruner``, L2 group importance) to the experts' mean
  MACs;
* post-training int8 of the baseline (PT2E, x86 inductor quantizer, 16 calibration batches).

Every row gets accuracy, drop, MACs, params, bytes and the training epochs it consumed (the baseline's
included); latency comes from the pipeline's evaluation (compiled, batch 1 and 64). The table, a JSON
file and the Pareto plot are written to ``--out`` and its folder. When the data is missing it is
installed with ``apt-get install -y dataset-fashion-mnist`` (Debian) or downloaded through torchvision.

    python benchmarks/bench_fashion_mnist.py --out benchmarks/results/bench_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from _common import add_out_argument, benchmark_trainer, run_config, write_result
from lightning.pytorch.callbacks import ModelPruning
from torch import Tensor, nn

from lightning_hybridcomp._lightning import inputs_from_batch
from lightning_hybridcomp.artifacts import save_artifact
from lightning_hybridcomp.data import FashionMNISTDataModule
from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import load_pipeline_config
from lightning_hybridcomp.profiling import count_macs_and_params
from lightning_hybridcomp.programs import export_with_dynamic_batch
from lightning_hybridcomp.report import ResultRow, report_table, write_report

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def ensure_data(data_dir: str) -> str:
    """A folder holding the four Fashion-MNIST files: ``data_dir``, Debian's package, or a download."""
    if not FashionMNISTDataModule(data_dir).missing_files():
        return data_dir
    if data_dir == DEBIAN_DIR and shutil.which("apt-get"):
        print("Installing dataset-fashion-mnist with apt-get ...")
        subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=False)
        if not FashionMNISTDataModule(data_dir).missing_files():
            return data_dir
        data_dir = "data/"
    print(f"Downloading Fashion-MNIST into {data_dir} through torchvision ...")
    FashionMNISTDataModule(data_dir, download=True).prepare_data()
    return data_dir


def _accuracy(forward: Any, batches: list[tuple[Tensor, Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((forward(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return correct / total


def _bytes(module: nn.Module, example: Tensor, steps: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt2"
        save_artifact(module, path, example, steps=steps)
        return path.stat().st_size


def _model_pruning(pipeline: Pipeline, sparsity: float, epochs: int, trainer_flags: dict[str, Any]) -> Any:
    model = pipeline.baseline_model()
    model.load_state_dict(torch.load(pipeline.run_dir / "baseline" / "weights.pt", weights_only=True))
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # The whole sparsity at the end of the first epoch, then fine-tuning with the masks held.
    pruning = ModelPruning(
        "l1_unstructured",
        parameters_to_prune=layers,
        amount=lambda epoch: sparsity if epoch == 0 else 0.0,
        use_global_unstructured=True,
        make_pruning_permanent=True,
        verbose=0,
    )
    benchmark_trainer(epochs, [pruning], **trainer_flags).fit(model, datamodule=pipeline.datamodule)
    return model.eval()


def _torch_pruning_loop(
    pipeline: Pipeline, target_macs: float, epochs: int, limit: float | int, example: Tensor
) -> nn.Module:
    """Prune the baseline's channels with torch-pruning to ``target_macs`` in one step, then fine-tune (Adam)."""
    model = pipeline.baseline_model()
    model.load_state_dict(torch.load(pipeline.run_dir / "baseline" / "weights.pt", weights_only=True))
    net = model.net
    base_macs, _ = count_macs_and_params(net.eval(), example)
    low, high = 0.0, 0.95
    pruned = net
    for _ in range(12):  # bisection on the channel ratio that reaches the target MACs
        ratio = (low + high) / 2
        candidate = copy.deepcopy(net)
        ignored = [m for m in candidate.modules() if isinstance(m, nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(
            candidate,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
        )
        pruner.step()
        macs, _ = count_macs_and_params(candidate.eval(), example)
        pruned = candidate
        if abs(macs - target_macs) / target_macs < 0.02:
            break
        low, high = (ratio, high) if macs > target_macs else (low, ratio)
    optimizer = torch.optim.Adam(pruned.parameters(), lr=1e-3)
    loader = pipeline.datamodule.train_dataloader()
    steps = int(limit * len(loader)) if isinstance(limit, float) else int(limit)
    for _ in range(epochs):
        pruned.train()
        for index, batch in enumerate(loader):
            if index >= steps:
                break
            loss = F.cross_entropy(pruned(inputs_from_batch(batch)), batch[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print(f"torch-pruning loop: {base_macs:,} -> {count_macs_and_params(pruned.eval(), example)[0]:,} MACs")
    return pruned.eval()


def _post_training_int8(pipeline: Pipeline, batches: int) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = pipeline.baseline_model()
    model.load_state_dict(torch.load(pipeline.run_dir / "baseline" / "weights.pt", weights_only=True))
    example = inputs_from_batch(next(iter(pipeline.datamodule.train_dataloader())))
    program = export_with_dynamic_batch(model.net.eval(), example[:2])
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for index, batch in enumerate(pipeline.datamodule.train_dataloader()):
            if index >= batches:
                break
            prepared(inputs_from_batch(batch))
    return convert_pt2e(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "pipeline_fashion_mnist.yaml")
    parser.add_argument("--run-dir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=DEBIAN_DIR)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set baseline.max_epochs=1 (YAML values)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-anchors",
        dest="anchors",
        action="store_false",
        help="only the pipeline's rows (a later run with anchors reuses the finished pipeline)",
    )
    add_out_argument(parser, "benchmarks/results/bench_fashion_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()

    import yaml

    raw = yaml.safe_load(args.config.read_text())
    raw["run_dir"] = args.run_dir
    raw["data"]["init_args"]["data_dir"] = ensure_data(args.data_dir)
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {}) if not part.isdigit() else node[int(part)]
        if leaf.isdigit():
            node[int(leaf)] = yaml.safe_load(value)
        else:
            node[leaf] = yaml.safe_load(value)
    config_path = Path(args.run_dir).with_suffix(".yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(raw))
    config = load_pipeline_config(config_path)
    pipeline = Pipeline(config)
    pipeline.run()
    rows = [ResultRow(**{k: v for k, v in m.items() if k != "ratios"}) for m in _read_models(pipeline)]

    # Epochs each row consumed, the baseline's included.
    base_epochs = config.baseline.max_epochs
    expert_epochs = {e.name: e.max_epochs for e in config.experts}
    for row in rows:
        if row.kind == "baseline":
            row.extra["epochs"] = base_epochs
        elif row.kind == "expert":
            row.extra["epochs"] = base_epochs + expert_epochs[row.name]
        else:
            row.extra["epochs"] = base_epochs + sum(expert_epochs.values()) + config.moe.max_epochs
    baseline = next(r for r in rows if r.kind == "baseline")
    experts = [r for r in rows if r.kind == "expert"]
    best = max(experts, key=lambda r: r.accuracy)
    rows.append(
        ResultRow(**{**vars(best), "name": f"best single expert ({best.name})", "kind": "expert-best"})
    )

    if args.anchors:
        # Trained from the same baseline weights, on the same data, with one expert's fine-tuning budget.
        anchor_epochs = max(expert_epochs.values())
        limit = config.trainer.get("limit_train_batches", 1.0)
        trainer_flags = {"limit_train_batches": limit, "limit_val_batches": 0, "num_sanity_val_steps": 0}
        batches = pipeline._test_batches
        example = batches[0][0][:1]
        mean_macs = sum(r.macs for r in experts) / len(experts)
        sparsity = 1 - sum(r.params for r in experts) / len(experts) / baseline.params
        anchor_rows: list[ResultRow] = []

        masked = _model_pruning(pipeline, sparsity, anchor_epochs, trainer_flags)
        macs, params = count_macs_and_params(masked.net, example)
        anchor_rows.append(
            ResultRow(
                f"ModelPruning l1 {sparsity:.0%} masked",
                "anchor",
                _accuracy(masked.net, batches),
                params,
                float(macs),
                _bytes(masked.net, example, []),
                extra={"epochs": base_epochs + anchor_epochs, "sparsity": sparsity},
            )
        )
        pruned = _torch_pruning_loop(pipeline, mean_macs, anchor_epochs, limit, example)
        macs, params = count_macs_and_params(pruned, example)
        anchor_rows.append(
            ResultRow(
                "torch-pruning loop (fp32)",
                "anchor",
                _accuracy(pruned, batches),
                params,
                float(macs),
                _bytes(pruned, example, ["prune:l2"]),
                extra={"epochs": base_epochs + anchor_epochs},
            )
        )
        ptq = _post_training_int8(pipeline, batches=16)
        anchor_rows.append(
            ResultRow(
                "post-training int8",
                "anchor",
                _accuracy(ptq, batches),
                baseline.params,
                baseline.macs,
                _bytes(ptq, example, ["ptq:x86_pt2e"]),
                extra={"epochs": base_epochs},
            )
        )
        rows.extend(anchor_rows)

    out_dir = args.out.parent
    write_report(out_dir / "fashion_mnist_report", rows, header="Fashion-MNIST test split", metadata={})
    table = report_table(rows)
    print(table)
    print("\nepochs consumed: " + ", ".join(f"{r.name} {r.extra.get('epochs')}" for r in rows))
    result = {
        "config": run_config(args, pipeline_fingerprint=config.fingerprint()),
        "seconds": round(time.monotonic() - start, 1),
        "rows": [{**vars(r), "drop_pt": round(100 * (baseline.accuracy - r.accuracy), 2)} for r in rows],
    }
    write_result(args.out, result)


def _read_models(pipeline: Pipeline) -> list[dict[str, Any]]:
    import json

    return list(json.loads((pipeline.run_dir / "results.json").read_text())["models"])


if __name__ == "__main__":
    main()
