"""The main job end to end on a miniature configuration (tiny model, few batches)."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_hybridcomp.artifacts import load_artifact
from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import PipelineError, parse_pipeline_config
from tests._helpers import MINI_PIPELINE as MINI
from tests._helpers import done_marker_times, pipeline_command


def _write_config(tmp_path: Path, **changes) -> Path:
    raw = json.loads(json.dumps(MINI))
    raw.update(changes)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        pipeline_command(config, run_dir, *extra), capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("pipeline")
    experts = json.loads(json.dumps(MINI["experts"]))
    experts[1]["emphasis"] = {"classes": [3, 8], "weight": 3.0}  # one expert with a data emphasis
    config = _write_config(tmp, experts=experts, evaluation={**MINI["evaluation"], "edge": True})
    run_dir = tmp / "run"
    result = _run(config, run_dir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return config, run_dir, result


def test_pipeline_writes_every_output(finished_run) -> None:
    _, run_dir, result = finished_run
    for name in ("report.md", "results.json", "pareto.png", "config.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "baseline" / "model.pt2").is_file()
    for expert in ("half", "third"):
        assert (run_dir / "experts" / expert / "expert.pt2").is_file()
    for k in (1, 2):
        assert (run_dir / "moe" / f"k{k}" / "moe.ckpt").is_file()
    assert list((run_dir / "logs").rglob("metrics.csv"))
    out = result.stdout + result.stderr
    assert "=== Phase 1/6: baseline" in out and "=== Phase 2/6: expert 1/2 'half'" in out
    assert "left in this phase" in out
    assert "| moe-k2 " in out


def test_results_match_the_files(finished_run) -> None:
    _, run_dir, _ = finished_run
    results = json.loads((run_dir / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert set(models) == {"baseline", "half", "third", "moe-k1", "moe-k2"}
    for name, path in [
        ("baseline", run_dir / "baseline" / "model.pt2"),
        ("half", run_dir / "experts" / "half" / "expert.pt2"),
        ("third", run_dir / "experts" / "third" / "expert.pt2"),
    ]:
        loaded = load_artifact(path)
        assert models[name]["bytes"] == path.stat().st_size
        assert models[name]["macs"] == loaded.metadata.macs
        assert models[name]["params"] == loaded.metadata.params
    assert load_artifact(run_dir / "experts" / "half" / "expert.pt2").metadata.dtype == "int8"
    assert load_artifact(run_dir / "experts" / "half" / "expert.pt2").metadata.steps == (
        "prune:l1:0.5",
        "qat:x86_pt2e",
    )
    assert load_artifact(run_dir / "experts" / "third" / "expert.pt2").metadata.steps == ("prune:l1:0.3",)
    # pruning really shrank the experts; MoE cost lies between the cheapest expert and the sum of all
    assert models["half"]["macs"] < 0.5 * models["baseline"]["macs"]
    assert models["third"]["macs"] < models["baseline"]["macs"]
    for k in (1, 2):
        moe = models[f"moe-k{k}"]
        assert min(models["half"]["macs"], models["third"]["macs"]) < moe["macs"]
        assert (
            moe["macs"] < models["half"]["macs"] + models["third"]["macs"] + 0.5 * models["baseline"]["macs"]
        )
        assert moe["bytes"] >= models["half"]["bytes"] + models["third"]["bytes"]
        assert moe["ratios"]["macs"] == pytest.approx(moe["macs"] / models["baseline"]["macs"])
    for m in models.values():
        assert 0.1 < m["accuracy"] <= 1.0 and m["latency_b1_ms"] > 0 and m["latency_b64_ms"] > 0


def test_top_k_phases_that_train_alike_share_one_training(finished_run) -> None:
    """k = 1 and k = 2 both train at top_k = 2: the k = 2 phase routes the k = 1 phase's MoE, untrained again."""
    from lightning_hybridcomp.moe import MoELightningModule, load_moe

    _, run_dir, result = finished_run
    done = json.loads((run_dir / "moe" / "k2" / "done.json").read_text())
    assert done["trained_by"] == "moe/k1"
    expert = json.loads((run_dir / "experts" / "third" / "done.json").read_text())
    assert expert["inputs"]["expert"]["emphasis"] == {"classes": [3, 8], "weight": 3.0}
    assert not (run_dir / "moe" / "k2" / "checkpoints").exists()
    assert "Phase 5/6: MoE top-2, the moe/k1 training" in result.stdout + result.stderr
    one, two = (load_moe(run_dir / "moe" / f"k{k}" / "moe.ckpt") for k in (1, 2))
    assert (one.top_k, one.eval_top_k, two.top_k, two.eval_top_k) == (2, 1, 2, 2)
    assert one.state_dict().keys() == two.state_dict().keys()
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    lightning = MoELightningModule.load_from_checkpoint(run_dir / "moe" / "k2" / "moe.ckpt").eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(lightning(x), two(x))
        # Routed at its own k: the same gate and experts, another mixture.
        assert not torch.equal(one(x), two(x))
    models = {m["name"]: m for m in json.loads((run_dir / "results.json").read_text())["models"]}
    assert models["moe-k1"]["macs"] < models["moe-k2"]["macs"]


def test_edge_column_comes_from_real_programs(finished_run) -> None:
    from lightning_hybridcomp.edge import load_executorch

    _, run_dir, _ = finished_run
    models = {m["name"]: m for m in json.loads((run_dir / "results.json").read_text())["models"]}
    x = torch.zeros(1, 1, 8, 8)
    for name in ("baseline", "third"):  # fp32 programs, lowered whole
        path = run_dir / "evaluation" / "edge" / f"{name}.pte"
        program = load_executorch(path)  # checks the file against its side-car's hash
        model = models[name]
        assert model["pte_bytes"] == path.stat().st_size == program.metadata.size_bytes
        assert model["edge_latency_b1_ms"] > 0 and program(x).shape == (1, 10)
        # The program predicts what the PyTorch model predicts.
        assert abs(model["extra"]["edge_accuracy"] - model["accuracy"]) < 0.02
    assert models["third"]["ratios"]["edge_latency_b1_ms"] == pytest.approx(
        models["third"]["edge_latency_b1_ms"] / models["baseline"]["edge_latency_b1_ms"]
    )
    # The x86_pt2e expert (and every MoE holding it) cannot be lowered whole: said, not timed half-delegated.
    for name in ("half", "moe-k1", "moe-k2"):
        assert models[name]["edge_latency_b1_ms"] is None and models[name]["pte_bytes"] is None
        assert "outside the delegate" in models[name]["extra"]["edge_skipped"]
        assert not (run_dir / "evaluation" / "edge" / f"{name}.pte").exists()
    report = (run_dir / "report.md").read_text()
    assert "edge ms @1" in report and "No edge figures for half, moe-k1, moe-k2" in report


def test_pareto_plot_is_a_valid_png(finished_run) -> None:
    _, run_dir, _ = finished_run
    png = (run_dir / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1650, 450)  # MACs, bytes and ExecuTorch latency panels


def test_dispatch_benchmark_times_the_parts_of_the_finished_runs_moes(finished_run, tmp_path) -> None:
    """``benchmarks/bench_moe_dispatch.py`` on this run (here, not in tests/benchmarks: it reads a finished run)."""
    from tests.benchmarks._run import run_benchmark

    config, run_dir, _ = finished_run
    figures = run_benchmark(
        "bench_moe_dispatch.py", tmp_path / "dispatch.json",
        f"--config={config}", f"--run-dir={run_dir}", "--batch=24", "--rounds=2", "--warmup=1",
    )  # fmt: skip
    ms = figures["median_ms"]
    assert {"baseline", "expert half (whole batch)", "expert third (whole batch)"} <= set(ms)
    for k in (1, 2):
        moe = figures["moe"][f"moe-k{k}"]
        sizes = moe["sub_batches"]
        assert moe["top_k"] == k and sum(sizes) == 24 * k  # every image's k experts, one call each
        rows = moe["padded_rows"]
        assert rows["unpadded"] == 24 * k <= rows["bucket_size"] <= rows["power of two"]
        for part in (
            "",
            " | power-of-two buckets, eager gate",
            " | gate (compiled)",
            " | experts on sub-batches",
        ):
            assert ms[f"moe-k{k}{part}"] > 0
        assert figures["x_baseline"][f"moe-k{k}"] == pytest.approx(ms[f"moe-k{k}"] / ms["baseline"])


def test_rerun_skips_finished_phases(finished_run) -> None:
    config, run_dir, _ = finished_run
    before = done_marker_times(run_dir)
    result = _run(config, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished earlier, skipped") == 6
    assert done_marker_times(run_dir) == before
    assert "| moe-k1 " in result.stdout


def test_other_config_in_the_same_run_dir_redoes_what_it_changes(finished_run, tmp_path) -> None:
    """Results of two configurations are never mixed: a phase whose inputs changed is redone, not reused."""
    _, run_dir, _ = finished_run
    raw = json.loads(json.dumps(MINI))
    raw.update(run_dir=str(run_dir), seed=7)
    before = done_marker_times(run_dir)
    plan = Pipeline(parse_pipeline_config(raw), say=lambda _: None).plan()
    assert [p.action for p in plan] == ["redo"] * 6
    assert plan[0].reason == "its configuration changed: seed"
    assert done_marker_times(run_dir) == before


@pytest.mark.parametrize("cut_last_checkpoint", [False, True], ids=["intact", "cut"])
def test_killed_run_resumes_and_completes_the_phase(tmp_path, cut_last_checkpoint) -> None:
    """A run killed in phase 1 resumes from the phase's last checkpoint, or restarts the phase if it was cut.

    The resumed run finishes that phase alone (``--only``); whole runs to the report are the fixture's.
    """
    config = _write_config(tmp_path)
    run_dir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe nobody reads: it cannot fill up
        process = subprocess.Popen(pipeline_command(config, run_dir), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    marker = run_dir / "experts" / "half" / "checkpoints" / "last.ckpt"
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "phase 1 never wrote a checkpoint"
    process.send_signal(signal.SIGKILL)
    process.wait()
    baseline_done = (run_dir / "baseline" / "done.json").stat().st_mtime
    assert not (run_dir / "experts" / "half" / "done.json").exists()
    if cut_last_checkpoint:  # damaged on disk (Lightning itself writes checkpoints atomically)
        marker.write_bytes(marker.read_bytes()[:1000])
    result = _run(config, run_dir, "--only", "experts/half")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    restarted = "this phase starts again from its first epoch" in result.stdout
    assert restarted == cut_last_checkpoint
    assert ("resuming from" in result.stdout) != cut_last_checkpoint
    assert (run_dir / "baseline" / "done.json").stat().st_mtime == baseline_done
    assert (run_dir / "experts" / "half" / "done.json").is_file()
    assert load_artifact(run_dir / "experts" / "half" / "expert.pt2").metadata.dtype == "int8"


def test_full_disk_during_phase_1_keeps_the_baseline(tmp_path, monkeypatch) -> None:
    import lightning_hybridcomp.pipeline as pipeline_module

    raw = json.loads(json.dumps(MINI))
    raw.update(
        run_dir=str(tmp_path / "run"), experts=[*MINI["experts"][1:], {**MINI["experts"][1], "name": "b"}]
    )
    raw["moe"] = {"top_k": [1], "max_epochs": 1}
    config = parse_pipeline_config(raw)
    real_save = pipeline_module.save_artifact

    def full_disk(model, path, *args, **kwargs):
        if "experts" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "save_artifact", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Pipeline(config, say=lambda _: None).run()
    run_dir = tmp_path / "run"
    assert (run_dir / "baseline" / "done.json").is_file()
    assert load_artifact(run_dir / "baseline" / "model.pt2").metadata.num_classes == 10
    assert not (run_dir / "experts" / "third" / "done.json").exists()
    monkeypatch.setattr(pipeline_module, "save_artifact", real_save)
    models = Pipeline(config, say=lambda _: None).run()
    assert {m["name"] for m in models} == {"baseline", "third", "b", "moe-k1"}


def test_starting_checkpoint_of_another_model_is_refused(tmp_path) -> None:
    from lightning_hybridcomp.models import ImageClassifier

    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": ImageClassifier("resnet20", image_size=8).state_dict()}, ckpt)
    raw = json.loads(json.dumps(MINI))
    raw["run_dir"] = str(tmp_path / "run")
    raw["baseline"]["checkpoint"] = str(ckpt)
    with pytest.raises(ValueError, match="does not match the configured model"):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None).run()


def test_user_checkpoint_is_a_starting_point(tmp_path) -> None:
    from lightning_hybridcomp.models import ImageClassifier

    model = ImageClassifier("small_cnn", width=8, image_size=8)
    ckpt = tmp_path / "mine.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    raw = json.loads(json.dumps(MINI))
    raw.update(
        run_dir=str(tmp_path / "run"), experts=MINI["experts"][1:], moe={"top_k": [1], "max_epochs": 1}
    )
    raw["baseline"].update(checkpoint=str(ckpt), max_epochs=0)
    raw["experts"] = [MINI["experts"][1], {**MINI["experts"][1], "name": "b"}]
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    pipeline._prepare_run_dir()
    pipeline._run_baseline()
    saved = torch.load(tmp_path / "run" / "baseline" / "weights.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_non_pipeline_folder_is_refused(tmp_path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    raw = json.loads(json.dumps(MINI))
    raw["run_dir"] = str(tmp_path)
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    with pytest.raises(PipelineError, match="not empty and holds no pipeline run"):
        pipeline.plan()  # what --dry-run prints: the same refusal as the run's
    with pytest.raises(PipelineError, match="not empty and holds no pipeline run"):
        pipeline.run()
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert Pipeline(parse_pipeline_config(raw), force=True, say=lambda _: None).plan()  # --force may


def test_force_redoes_everything_but_keeps_foreign_files(tmp_path) -> None:
    run_dir = tmp_path / "run"
    for phase in ("baseline", "evaluation"):
        (run_dir / phase).mkdir(parents=True)
        (run_dir / phase / "done.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    raw = json.loads(json.dumps(MINI))
    raw["run_dir"] = str(run_dir)
    pipeline = Pipeline(parse_pipeline_config(raw), force=True, say=lambda _: None)
    pipeline._prepare_run_dir()
    assert not (run_dir / "baseline").exists()
    assert not (run_dir / "evaluation").exists()  # else the report of the old run would be kept
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert json.loads((run_dir / "config.json").read_text())["fingerprint"] == pipeline.config.fingerprint()


def test_unknown_callback_argument_is_refused_before_training(tmp_path) -> None:
    raw = json.loads(json.dumps(MINI))
    raw["run_dir"] = str(tmp_path / "run")
    raw["experts"][0]["pruning"] = {"ratio": 0.5}
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['ratio'\] in `experts\[0\].pruning`"):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("emphasis", "match"),
    [
        ({"classes": [3], "seed": 2}, r"experts\[1\].emphasis: .*hold `classes` and optionally `weight`"),
        ({"classes": [], "weight": 2.0}, r"experts\[1\].emphasis.classes.*non-empty list"),
        ({"classes": [3], "weight": -1}, r"experts\[1\].emphasis.weight.*above 0, got -1"),
        ([3, 8], r"experts\[1\].emphasis.*mapping of arguments"),
    ],
)
def test_bad_emphasis_is_refused_before_training(tmp_path, emphasis, match) -> None:
    raw = json.loads(json.dumps(MINI))
    raw["run_dir"] = str(tmp_path / "run")
    raw["experts"][1]["emphasis"] = emphasis
    with pytest.raises(ValueError, match=match):
        Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_tuned_moe_fine_tunes_the_experts_fp32_twins(tmp_path: Path) -> None:
    """A "tuned" MoE trains the experts' fp32 twins in fake-quant form and ends in int8; the frozen one stays."""
    from lightning_hybridcomp.moe import load_moe

    raw = json.loads(json.dumps(MINI))
    for expert in raw["experts"]:
        expert["quantization"] = {"backend": "x86_pt2e"}
    raw.update(
        run_dir=str(tmp_path / "run"), moe={"top_k": [2], "max_epochs": 1, "variants": ["frozen", "tuned"]}
    )
    Pipeline(parse_pipeline_config(raw), say=lambda _: None).run()
    run_dir = tmp_path / "run"
    for expert in raw["experts"]:
        twin = load_artifact(run_dir / "experts" / expert["name"] / "expert-float.pt2")
        assert twin.metadata.dtype == "float32" and twin.metadata.steps == (
            "prune:l1:" + str(expert["pruning"]["pruning_ratio"]),
        )
    frozen, tuned = (load_moe(run_dir / "moe" / label / "moe.ckpt") for label in ("k2", "k2-tuned"))
    assert frozen.expert_stage == "float" and tuned.expert_stage == "converted"
    assert all(r.quantized for r in frozen.expert_records + tuned.expert_records)
    # The tuned experts learnt on their routed samples: other int8 weights than the experts' own artifacts.
    assert [r.fingerprint for r in tuned.expert_records] != [r.fingerprint for r in frozen.expert_records]
    rows = {row["name"]: row for row in json.loads((run_dir / "results.json").read_text())["models"]}
    assert (
        rows["moe-k2-tuned"]["extra"]["variant"] == "tuned" and rows["moe-k2"]["extra"]["variant"] == "frozen"
    )
    # Dropping the tuned variant keeps every finished phase: the frozen MoE's fingerprint does not change.
    raw["moe"]["variants"] = ["frozen"]
    plan = {p.spec.key: p.action for p in Pipeline(parse_pipeline_config(raw), say=lambda _: None).plan()}
    assert plan["moe/k2"] == "skip" and "moe/k2-tuned" not in plan


def test_latencies_are_timed_side_by_side_in_rounds(tmp_path) -> None:
    from lightning_hybridcomp.report import ResultRow

    raw = {**json.loads(json.dumps(MINI)), "run_dir": str(tmp_path / "run")}
    pipeline = Pipeline(parse_pipeline_config(raw), say=lambda _: None)
    calls: list[tuple[str, int]] = []
    batches: list[torch.Tensor] = []

    def model(name: str):
        return lambda x: calls.append((name, len(x))) or batches.append(x)

    rows = [ResultRow(name, "expert", 0.5, 1, 1.0, 1) for name in ("a", "b", "c")]
    pipeline._add_latencies(rows, [model(r.name) for r in rows])
    # Timed on the first test images, not on copies of one (a MoE routes copies all alike).
    test_images = torch.cat([x for x, _ in pipeline._test_batches])  # independently of _test_images
    assert torch.equal(batches[-1], test_images[:64]) and not torch.equal(batches[-1][0], batches[-1][1])
    repeats, warmup = MINI["evaluation"]["repeats"], MINI["evaluation"]["warmup"]
    for size in (1, 64):
        timed = [name for name, n in calls if n == size][3 * (warmup + 1) :]  # after every warm-up call
        assert timed == ["a", "b", "c"] * repeats  # every model once per round, not model after model
    assert all(r.latency_b1_ms > 0 and r.latency_b64_ms > 0 for r in rows)
