from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lightning_hybridcomp.profiling import (
    ModelProfile,
    count_macs,
    count_macs_and_params,
    format_table,
    measure_latency,
    profile_model,
    serialized_size,
)
from tests._reference import reference_macs, reference_params


def _tiny_convnet() -> nn.Module:
    # conv 1->4 (3x3, no bias) on 8x8 -> 6x6; flatten 144 -> linear 10 (with bias)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_macs_and_params_match_hand_computed_values() -> None:
    profile = profile_model(_tiny_convnet(), torch.randn(3, 1, 8, 8))
    conv_macs = 4 * 1 * 3 * 3 * 6 * 6  # out channels x in channels x kernel x output pixels
    linear_macs = 144 * 10  # activations and bias additions are not multiply-accumulates
    assert profile.macs == conv_macs + linear_macs
    assert profile.params == 4 * 9 + 144 * 10 + 10


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 6, 6), 8 * 3 * 9 * 36),
        (nn.Conv2d(4, 8, 3, stride=2, groups=2), (1, 4, 9, 9), 8 * 2 * 9 * 16),  # grouped: in/groups fan-in
        (nn.Conv2d(6, 6, 5, padding=2, groups=6), (1, 6, 7, 7), 6 * 1 * 25 * 49),  # depthwise
        (nn.Conv1d(2, 3, 4), (1, 2, 10), 3 * 2 * 4 * 7),
        (nn.Linear(16, 10), (1, 16), 160),
        (nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU()), (1, 8), 32),  # BN, ReLU: no MACs
    ],
)
def test_count_macs_matches_hand_computed_values(
    layer: nn.Module, shape: tuple[int, ...], expected: int
) -> None:
    example = torch.randn(*shape)
    assert count_macs(layer, example) == expected == reference_macs(layer, example)


def test_count_macs_is_the_same_for_a_module_its_program_and_its_int8_conversion() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 36, 10),
    ).eval()
    example = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(program.module(), quantizer)
    prepared(example)
    int8 = convert_pt2e(prepared)
    assert any("quantize_per_tensor" in str(n.target) for n in int8.graph.nodes)
    expected = reference_macs(net, example[:1])
    assert expected == 8 * 3 * 9 * 64 + 8 * 1 * 9 * 36 + 288 * 10
    assert count_macs(net, example[:1]) == count_macs(program, example[:1]) == count_macs(int8, example[:1])
    assert count_macs(int8, example[:1]) == expected


def test_count_macs_counts_torchao_int8_matmuls() -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    example = torch.randn(1, 64)
    dense = count_macs(net, example)
    quantize_(net, Int8DynamicActivationInt8WeightConfig())
    assert dense == 64 * 32 + 32 * 8 == count_macs(net, example)


@pytest.mark.parametrize(
    "factory", [_tiny_convnet, lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))]
)
def test_profile_agrees_with_the_layer_by_layer_reference(factory) -> None:
    model = factory()
    example = torch.randn(1, 1 if isinstance(model[0], nn.Conv2d) and model[0].in_channels == 1 else 3, 8, 8)
    expected = (reference_macs(model, example), reference_params(model))
    profile = profile_model(model, example)
    assert (profile.macs, profile.params) == expected
    assert count_macs_and_params(model, example) == expected


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
