from __future__ import annotations

import importlib.util

import pytest

from lightning_hybridcomp.pipeline_config import (
    PipelineConfig,
    load_pipeline_config,
    parse_pipeline_config,
)


def test_defaults_are_the_embedded_run() -> None:
    config = parse_pipeline_config(None)
    assert config.data.class_path == "lightning_hybridcomp.data.DigitsDataModule"
    assert config.baseline.model.class_path == "lightning_hybridcomp.models.ImageClassifier"
    assert len(config.experts) >= 2 and config.moe.top_k == [1, 2]
    # XNNPACK int8 experts for the edge runtime when ExecuTorch is installed, else x86 int8 for inductor.
    edge = importlib.util.find_spec("executorch") is not None
    assert {e.quantization["backend"] for e in config.experts if e.quantization} == {
        "xnnpack" if edge else "x86_pt2e"
    }


def test_fingerprint_ignores_run_dir_only() -> None:
    a = parse_pipeline_config({"run_dir": "a"})
    b = parse_pipeline_config({"run_dir": "b"})
    c = parse_pipeline_config({"run_dir": "a", "seed": 1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_yaml_round_trip(tmp_path) -> None:
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PipelineConfig().to_dict()))
    assert load_pipeline_config(path).fingerprint() == PipelineConfig().fingerprint()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"epochs": 3},
            r"Unknown key\(s\) \['epochs'\] in the pipeline config. Valid keys: \['run_dir', 'seed', 'data'",
        ),
        ({"moe": {"topk": [1]}}, r"Unknown key\(s\) \['topk'\] in `moe`. Valid keys: \['top_k'"),
        ({"experts": []}, "`experts` to be a non-empty list"),
        ({"experts": [{"name": "a", "prune": {}}]}, r"Unknown key\(s\) \['prune'\] in `experts\[0\]`"),
        ({"experts": [{"pruning": {}}]}, r"Missing required key `experts\[0\].name`"),
        ({"experts": [{"name": "a"}, {"name": "a"}]}, "unique expert names"),
        ({"experts": [{"name": "../x"}]}, "plain folder name"),
        ({"data": {"class_path": "lightning_hybridcomp.data.NoSuchData"}}, "Unknown component 'NoSuchData'"),
        ({"data": {"class_path": "nopkg.Data"}}, "Cannot import module 'nopkg'"),
        ({"data": {"class_path": "lightning_hybridcomp.data.DigitsDataModule", "args": {}}}, r"\['args'\]"),
        ({"moe": {"top_k": [0]}}, "positive integers"),
        ({"moe": {"top_k": [9]}}, "at most the number of experts"),
        ({"baseline": {"max_epochs": 0}}, "baseline.max_epochs"),
        ({"evaluation": {"latency_batch_sizes": [0]}}, "latency_batch_sizes"),
        (
            {"moe": {"variants": ["warm"]}},
            r"`moe.variants` to be a list of distinct values from \['frozen', 'tuned'\]",
        ),
        ({"moe": {"variants": ["tuned", "tuned"]}}, "`moe.variants` to be a list of distinct values"),
        (
            {
                "moe": {"variants": ["frozen", "tuned"]},
                "experts": [{"name": "a", "quantization": {"backend": "x86_pt2e"}}, {"name": "b"}],
            },
            r"moe.variants: Expected every expert to have `quantization` with one PT2E backend .* \['x86_pt2e', None\]",
        ),
        (
            {
                "moe": {"variants": ["tuned"]},
                "experts": [{"name": n, "quantization": {"backend": "linear_int8"}} for n in "ab"],
            },
            "one PT2E backend",
        ),
    ],
)
def test_bad_configs_name_the_problem(raw, match) -> None:
    config = None
    with pytest.raises(ValueError, match=match):
        config = parse_pipeline_config(raw)
        # components are checked when they are resolved
        config.data.resolve(object, section="data")
    del config


def test_unknown_component_argument_lists_valid_ones() -> None:
    import lightning.pytorch as pl

    config = parse_pipeline_config(
        {"data": {"class_path": "lightning_hybridcomp.data.DigitsDataModule", "init_args": {"img": 3}}}
    )
    with pytest.raises(
        ValueError, match=r"Unknown key\(s\) \['img'\] in `data.init_args`. Valid keys: \['batch_size'"
    ):
        config.data.resolve(pl.LightningDataModule, section="data")


def test_missing_or_broken_yaml(tmp_path) -> None:
    with pytest.raises(ValueError, match="existing YAML file"):
        load_pipeline_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("experts: [\n")
    with pytest.raises(ValueError, match="Could not parse"):
        load_pipeline_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="to be a mapping"):
        load_pipeline_config(scalar)
