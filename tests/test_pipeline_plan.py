"""Phase fingerprints as users iterate on a run: a changed, added or removed expert redoes only what reads it.

One small finished run (two fp32 experts, the MoE at k = 1) is copied for every test, so each test starts
from the same files and compares them byte for byte afterwards.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_hybridcomp.pipeline import Pipeline
from lightning_hybridcomp.pipeline_config import PipelineError, parse_pipeline_config
from lightning_hybridcomp.pipeline_plan import phase_specs, plan_phases
from tests._helpers import MINI_PIPELINE, REPO, pipeline_command


def _small(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """The miniature run at its smallest: one epoch per phase, two batches, fp32 experts, k = 1."""
    raw = copy.deepcopy(MINI_PIPELINE)
    raw["run_dir"] = str(run_dir)
    raw["baseline"]["max_epochs"] = 1
    for expert in raw["experts"]:
        expert["max_epochs"] = 1
        expert.pop("quantization", None)
    raw["moe"] = {"top_k": [1], "max_epochs": 1}
    raw["evaluation"].update(latency_batch_sizes=[1], repeats=1, warmup=0)
    raw["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    raw.update(changes)
    return raw


def _run(raw: dict[str, Any], **options: Any) -> tuple[list[dict[str, Any]], str]:
    lines: list[str] = []
    models = Pipeline(parse_pipeline_config(raw), say=lines.append, **options).run()
    return models, "\n".join(lines)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plan_line(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if line.split()[1:2] == [key])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plan") / "run"
    _run(_small(run_dir))
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


def test_changed_expert_redoes_only_it_the_moe_and_the_evaluation(run_copy) -> None:
    kept = {name: _files(run_copy / name) for name in ("baseline", "experts/third")}
    before = {name: _files(run_copy / name) for name in ("experts/half", "moe/k1", "evaluation")}
    raw = _small(run_copy)
    raw["experts"][0]["pruning"]["pruning_ratio"] = 0.4
    models, out = _run(raw)
    assert "skip    baseline" in out and "finished earlier" in _plan_line(out, "experts/third")
    assert "redo" in _plan_line(out, "experts/half")
    assert "experts[0].pruning.pruning_ratio" in _plan_line(out, "experts/half")
    assert "experts/half" in _plan_line(out, "moe/k1") and "redo" in _plan_line(out, "evaluation")
    for name, files in kept.items():
        assert _files(run_copy / name) == files, name  # byte for byte, done markers included
    for name, files in before.items():
        assert _files(run_copy / name)["done.json"] != files["done.json"], name
    half = {m["name"]: m for m in models}["half"]
    assert half["extra"]["steps"] == ["prune:l1:0.4"]


def test_added_expert_trains_alone_and_a_removed_one_keeps_its_files(run_copy) -> None:
    kept = {name: _files(run_copy / name) for name in ("baseline", "experts/half", "experts/third")}
    raw = _small(run_copy)
    raw["experts"].append(
        {**raw["experts"][1], "name": "quarter", "pruning": {"pruning_ratio": 0.25, "iterative_steps": 1}}
    )
    models, out = _run(raw)
    assert "run     experts/quarter" in out and "not run yet" in out
    assert out.count("finished earlier, skipped") == 3  # the baseline and the two experts it had
    assert {m["name"] for m in models} == {"baseline", "half", "third", "quarter", "moe-k1"}
    for name, files in kept.items():
        assert _files(run_copy / name) == files, name
    assert len({m["name"]: m for m in models}["moe-k1"]["extra"]["expert_load"]) == 3  # routes all three

    quarter = _files(run_copy / "experts" / "quarter")
    raw["experts"] = [raw["experts"][1], raw["experts"][2]]  # "half" removed
    models, out = _run(raw)
    assert out.count("finished earlier, skipped") == 3
    assert {m["name"] for m in models} == {"baseline", "third", "quarter", "moe-k1"}
    assert _files(run_copy / "experts" / "half") == kept["experts/half"]  # still there, untouched
    assert _files(run_copy / "experts" / "quarter") == quarter
    restored = plan_phases(run_copy, phase_specs(parse_pipeline_config(_small(run_copy))))
    assert {p.spec.key: p.action for p in restored}["experts/half"] == "skip"


def test_distilled_moe_redoes_the_moe_only_and_depends_on_the_baseline(run_copy) -> None:
    kept = {name: _files(run_copy / name) for name in ("baseline", "experts/half", "experts/third")}
    raw = _small(run_copy)
    raw["moe"]["distillation"] = {"alpha": 0.5, "temperature": 2.0}
    _, out = _run(raw)
    assert out.count("finished earlier, skipped") == 3
    assert "redo" in _plan_line(out, "moe/k1") and "moe.distillation" in _plan_line(out, "moe/k1")
    for name, files in kept.items():
        assert _files(run_copy / name) == files, name
    latest = sorted((run_copy / "logs" / "moe-k1").glob("version_*"))[-1]  # the redone phase's log
    header = (latest / "metrics.csv").read_text().splitlines()[0]
    assert "distillation/soft_target_loss" in header.split(",")  # the MoE trained on the soft targets
    moe = {s.key: s for s in phase_specs(parse_pipeline_config(raw))}["moe/k1"]
    assert moe.upstream[0] == "baseline"  # the teacher: a new baseline redoes the distilled MoE
    plain = {s.key: s for s in phase_specs(parse_pipeline_config(_small(run_copy)))}["moe/k1"]
    assert "baseline" not in plain.upstream and "teacher" not in plain.inputs


def test_only_processes_share_one_run_dir_and_the_moe_uses_both(tmp_path) -> None:
    run_dir = tmp_path / "run"
    raw = _small(run_dir)
    with pytest.raises(PipelineError, match=r"`--only experts/half` reads phases that are not finished"):
        Pipeline(parse_pipeline_config(raw), only=["experts/half"], say=lambda _: None).plan()
    assert not run_dir.exists()  # planning reads only
    assert _run(raw, only=["baseline"])[0] == []
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    jobs = [
        subprocess.Popen(
            pipeline_command(config, run_dir, "--only", f"experts/{name}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "OMP_NUM_THREADS": "1"},
        )
        for name in ("half", "third")
    ]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert all("finished earlier, skipped" not in o for o in outputs)  # each trained its own expert only
    experts = {name: _files(run_dir / "experts" / name) for name in ("half", "third")}
    assert not (run_dir / "moe").exists()
    models, out = _run(raw)
    assert out.count("finished earlier, skipped") == 3
    assert {m["name"] for m in models} == {"baseline", "half", "third", "moe-k1"}
    for name, files in experts.items():
        assert _files(run_dir / "experts" / name) == files, name
    assert len({m["name"]: m for m in models}["moe-k1"]["extra"]["expert_load"]) == 2  # routes both
    assert json.loads((run_dir / "config.json").read_text())["format"] == 2


def test_run_dir_of_the_earlier_format_is_migrated(run_copy) -> None:
    """A run directory with one fingerprint for the whole run: every phase is recognised, none is redone."""
    config = parse_pipeline_config(_small(run_copy))
    (run_copy / "config.json").write_text(
        json.dumps({"fingerprint": config.fingerprint(), "config": config.to_dict()})
    )
    for marker in run_copy.rglob("done.json"):
        done = json.loads(marker.read_text())
        marker.write_text(json.dumps({k: v for k, v in done.items() if k not in ("fingerprint", "inputs")}))
    for record in run_copy.rglob("phase.json"):
        record.unlink()
    models, out = _run(_small(run_copy))
    assert out.count("finished earlier, skipped") == 5
    assert len(models) == 4
    assert all("fingerprint" in json.loads(m.read_text()) for m in run_copy.rglob("done.json"))


def test_dry_run_prints_the_plan_and_changes_nothing(run_copy, tmp_path, capsys) -> None:
    from lightning_hybridcomp.cli import main

    before = _files(run_copy)
    config = tmp_path / "seed7.yaml"
    config.write_text(yaml.safe_dump(_small(run_copy, seed=7)))
    main(["pipeline", "--config", str(config), "--run_dir", str(run_copy), "--dry-run"])
    out = capsys.readouterr().out
    assert "dry run, nothing was changed" in out
    assert "its configuration changed: seed" in _plan_line(out, "baseline")
    for key in ("experts/half", "experts/third", "moe/k1", "evaluation"):
        assert _plan_line(out, key).split()[0] == "redo", key
    assert "=== Phase" not in out
    assert _files(run_copy) == before
