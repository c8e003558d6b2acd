"""What a model costs: parameters, MACs, bytes on disk and CPU latency, in one dataclass.

Used by the callbacks' logging, the benchmarks and the pipeline report, so every figure the package
prints is computed the same way.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ModelProfile",
    "count_macs",
    "count_macs_and_params",
    "count_params",
    "format_table",
    "interleaved_latencies",
    "measure_latency",
    "profile_model",
    "serialized_size",
]


@dataclass(frozen=True)
class ModelProfile:
    """Cost figures of one model on one example input.

    Attributes:
        params: number of parameter elements.
        macs: multiply-accumulates of one forward pass of the example input (:func:`count_macs`, so per
            sample when the example batch holds one sample).
        size_bytes: bytes of the model's ``state_dict`` as ``torch.save`` writes it.
        latency_ms: median forward latency in milliseconds, or ``None`` when not measured.
        latency_batch_size: batch size the latency was measured at.
    """

    params: int
    macs: int
    size_bytes: int
    latency_ms: float | None = None
    latency_batch_size: int | None = None

    def ratios_to(self, reference: ModelProfile) -> dict[str, float | None]:
        """This profile's figures divided by ``reference``'s (``None`` where either is missing or zero).

        Example::

            >>> small = ModelProfile(params=50, macs=25, size_bytes=400)
            >>> small.ratios_to(ModelProfile(params=100, macs=100, size_bytes=800))["macs"]
            0.25
        """
        return figure_ratios(self, reference, ("params", "macs", "size_bytes", "latency_ms"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def figure_ratios(row: Any, reference: Any, names: Sequence[str]) -> dict[str, float | None]:
    """``row``'s attributes ``names`` divided by ``reference``'s; ``None`` where either is missing or zero.

    Example::

        >>> figure_ratios(ModelProfile(50, 30, 400), ModelProfile(100, 0, 800), ["params", "macs"])
        {'params': 0.5, 'macs': None}
    """
    out: dict[str, float | None] = {}
    for name in names:
        value, ref = getattr(row, name), getattr(reference, name)
        out[name] = None if value is None or not ref else value / ref
    return out


def _as_tuple(example_inputs: Tensor | tuple[Any, ...]) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def count_macs(
    model: nn.Module | torch.export.ExportedProgram, example_inputs: Tensor | tuple[Any, ...]
) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs``: the package's one definition of MACs.

    Counted are the multiply-accumulates of convolutions (a grouped or depthwise convolution by its real
    fan-in, ``in_channels / groups``) and of matrix products (linear layers, ``matmul``/``bmm``, attention,
    and torchao's int8 ``_int_mm``); bias additions, normalisation, activations, pooling and element-wise
    operations are not MACs. This is PyTorch's FLOP counter divided by two, so an eager module, an exported
    program and its int8 conversion (whose convolutions run on dequantized weights in the graph) of the same
    network give the same figure. Pass one sample for MACs per sample. A module is counted in eval mode and
    left in its own mode.

    Example::

        >>> conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # 8 outputs x (4 / 2) inputs x 3 x 3 per pixel
        >>> count_macs(conv, torch.randn(1, 4, 5, 5)) == 8 * 2 * 3 * 3 * 5 * 5
        True
        >>> count_macs(nn.Linear(16, 10), torch.randn(1, 16))
        160
    """
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._int_mm: _int_mm_flop})
    # Exported graph modules refuse .train()/.eval() unless made switchable; they run as they are.
    switchable = not isinstance(module, torch.fx.GraphModule)
    was_training = module.training
    try:
        if switchable:
            module.eval()
        with counter, torch.no_grad():
            module(*_as_tuple(example_inputs))
    finally:
        if switchable:
            module.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Elements of the model's parameters, each shared parameter once."""
    return sum(p.numel() for p in model.parameters())


def count_macs_and_params(model: nn.Module, example_inputs: Tensor | tuple[Any, ...]) -> tuple[int, int]:
    """:func:`count_macs` and :func:`count_params` of ``model``."""
    return count_macs(model, example_inputs), count_params(model)


def _int_mm_flop(
    a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    return 2 * int(a_shape[0]) * int(a_shape[1]) * int(b_shape[1])


def serialized_size(obj: nn.Module | dict[str, Any]) -> int:
    """Bytes ``torch.save`` writes for a module's ``state_dict`` (or for a given mapping).

    Exactly the size of a file called ``archive.pt``; other file names change the records' names inside
    the zip container by a few bytes each.

    Example::

        >>> serialized_size(nn.Linear(256, 256)) > 256 * 256 * 4
        True
    """
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def measure_latency(
    fn: Callable[[Tensor], Any],
    inputs: Tensor,
    *,
    warmup: int = 3,
    repeats: int = 10,
) -> float:
    """Median wall-clock milliseconds of ``fn(inputs)`` under ``torch.no_grad()`` after ``warmup`` calls."""
    if warmup < 0 or repeats < 1:
        raise ValueError(
            f"Expected `warmup` >= 0 and `repeats` >= 1, got warmup={warmup}, repeats={repeats}."
        )
    timings = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(inputs)
        for _ in range(repeats):
            if inputs.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(inputs)
            if inputs.is_cuda:
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def interleaved_latencies(
    parts: dict[str, tuple[Callable[[Tensor], Any], Tensor]], *, rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Milliseconds of each ``fn(inputs)`` per round: every part timed once in each round, after a warm-up.

    Timing the models side by side in rounds (not model after model) spreads a shared machine's load
    swings over all of them alike; take the median of each list, or compare them round by round.

    Example::

        >>> times = interleaved_latencies({"a": (torch.relu, torch.randn(8))}, rounds=3, warmup=1)
        >>> len(times["a"])
        3
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"Expected `rounds` >= 1 and `warmup` >= 0, got rounds={rounds}, warmup={warmup}.")
    for fn, inputs in parts.values():
        measure_latency(fn, inputs, warmup=warmup, repeats=1)
    timings: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, (fn, inputs) in parts.items():
            timings[name].append(measure_latency(fn, inputs, warmup=0, repeats=1))
    return timings


def profile_model(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    latency_batch_size: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> ModelProfile:
    """Profile ``model`` on ``example_inputs``.

    MACs are counted on the first sample of ``example_inputs`` (per-sample cost). Latency is measured
    only when ``latency_batch_size`` is given, in eval mode on a batch of that size built by repeating
    the example, and the model's mode is restored afterwards.

    Args:
        model: any ``nn.Module`` (a LightningModule works; its ``forward`` is what is measured).
        example_inputs: one input batch of the shape the model expects.
        latency_batch_size: batch size for the latency measurement, or ``None`` to skip it.
        warmup: calls before timing starts.
        repeats: timed calls; the median is reported.

    Raises:
        ValueError: for an empty example or a non-positive batch size.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> p = profile_model(net, torch.randn(1, 1, 8, 8))
        >>> p.macs == 4 * 9 * 36 + 144 * 10, p.params == 36 + 1450  # a bias add is not a MAC
        (True, True)
    """
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() == 0 or example_inputs.shape[0] == 0:
        raise ValueError(
            "Expected `example_inputs` to be a tensor with a batch dimension of at least one sample, got"
            f" {type(example_inputs).__name__} of shape {getattr(example_inputs, 'shape', None)}."
        )
    if latency_batch_size is not None and latency_batch_size < 1:
        raise ValueError(
            f"Expected `latency_batch_size` to be a positive integer or None, got {latency_batch_size}."
        )
    macs, params = count_macs_and_params(model, example_inputs[:1])
    latency = None
    if latency_batch_size is not None:
        was_training = model.training
        model.eval()
        try:
            reps = [latency_batch_size] + [1] * (example_inputs.dim() - 1)
            batch = example_inputs[:1].repeat(*reps)
            latency = measure_latency(model, batch, warmup=warmup, repeats=repeats)
        finally:
            model.train(was_training)
    return ModelProfile(
        params=params,
        macs=macs,
        size_bytes=serialized_size(model),
        latency_ms=latency,
        latency_batch_size=latency_batch_size,
    )


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict[str, Any]], *, title: str | None = None) -> str:
    """Render rows of figures as a GitHub-flavoured Markdown table (columns in first-seen order).

    Example::

        >>> print(format_table([{"model": "fp32", "MACs": 1200000}, {"model": "int8", "MACs": 300000}]))
        | model | MACs      |
        |-------|-----------|
        | fp32  | 1,200,000 |
        | int8  | 300,000   |
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells),
    ]
    return "\n".join(([f"### {title}", ""] if title else []) + lines)
