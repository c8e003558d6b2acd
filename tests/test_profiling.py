from __future__ import annotations

import io

import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_hybridcomp.profiling import (
    ModelProfile,
    count_macs_and_params,
    format_table,
    measure_latency,
    profile_model,
    serialized_size,
)


def _tiny_convnet() -> nn.Module:
    # conv 1->4 (3x3, no bias) on 8x8 -> 6x6; flatten 144 -> linear 10 (with bias)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_macs_and_params_match_hand_computed_values() -> None:
    profile = profile_model(_tiny_convnet(), torch.randn(3, 1, 8, 8))
    conv_macs = 4 * 1 * 3 * 3 * 6 * 6  # out channels x in channels x kernel x output pixels
    relu_ops = 4 * 6 * 6  # torch-pruning counts one op per activation element
    linear_macs = 144 * 10 + 10  # and the bias add as one MAC per output
    assert profile.macs == conv_macs + relu_ops + linear_macs
    assert profile.params == 4 * 9 + 144 * 10 + 10


@pytest.mark.parametrize(
    "factory", [_tiny_convnet, lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))]
)
def test_profile_agrees_with_torch_pruning(factory) -> None:
    model = factory()
    example = torch.randn(1, 1 if isinstance(model[0], nn.Conv2d) and model[0].in_channels == 1 else 3, 8, 8)
    macs, params = tp.utils.count_ops_and_params(model, example)
    profile = profile_model(model, example)
    assert (profile.macs, profile.params) == (int(macs), int(params))
    assert count_macs_and_params(model, example) == (int(macs), int(params))


def test_macs_are_per_sample_and_mode_is_kept() -> None:
    model = _tiny_convnet().train()
    one = profile_model(model, torch.randn(1, 1, 8, 8))
    many = profile_model(model, torch.randn(16, 1, 8, 8), latency_batch_size=4, repeats=2)
    assert one.macs == many.macs
    assert model.training
    assert many.latency_ms is not None and many.latency_ms > 0 and many.latency_batch_size == 4


def test_size_bytes_matches_the_file_written(tmp_path) -> None:
    model = _tiny_convnet()
    # torch.save names the records inside its zip after the file's stem; "archive" is what a buffer gets.
    path = tmp_path / "archive.pt"
    torch.save(model.state_dict(), path)
    assert profile_model(model, torch.randn(1, 1, 8, 8)).size_bytes == path.stat().st_size
    assert serialized_size(model.state_dict()) == path.stat().st_size
    other = tmp_path / "model.pt"
    torch.save(model.state_dict(), other)
    assert abs(serialized_size(model) - other.stat().st_size) < 64


def test_ratios_to_reference() -> None:
    base = ModelProfile(params=100, macs=1000, size_bytes=400, latency_ms=2.0)
    small = ModelProfile(params=25, macs=300, size_bytes=100, latency_ms=None)
    assert small.ratios_to(base) == {"params": 0.25, "macs": 0.3, "size_bytes": 0.25, "latency_ms": None}
    assert small.to_dict()["macs"] == 300


def test_measure_latency_counts_calls() -> None:
    calls = []
    measure_latency(lambda x: calls.append(x), torch.zeros(1), warmup=2, repeats=5)
    assert len(calls) == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"example_inputs": torch.zeros(0, 1, 8, 8)}, "example_inputs"),
        ({"example_inputs": torch.zeros(1, 1, 8, 8), "latency_batch_size": 0}, "latency_batch_size"),
    ],
)
def test_profile_rejects_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        profile_model(_tiny_convnet(), **kwargs)


def test_measure_latency_rejects_bad_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda x: x, torch.zeros(1), repeats=0)


def test_format_table_aligns_columns() -> None:
    table = format_table([{"a": 1, "b": 0.5}, {"a": 1234567, "c": None}], title="t")
    lines = table.splitlines()
    assert lines[0] == "### t"
    assert lines[2].startswith("| a ") and "| c |" in lines[2]
    assert "1,234,567" in table and "| -" in table
    assert len({len(line) for line in lines[2:]}) == 1


def test_serialized_size_of_buffer_not_position() -> None:
    # torch.save into a BytesIO leaves the position at the end; size is read from the buffer.
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(10)}, buffer)
    assert serialized_size({"w": torch.zeros(10)}) == buffer.getbuffer().nbytes
