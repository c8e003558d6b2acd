"""ExecuTorch programs: lowering exported programs to XNNPACK, the ``.pte`` file and its side-car, running one.

The toolkit behind :func:`lightning_hybridcomp.edge.export_executorch` and the Mixture of Experts' multi-method
program: every program is lowered whole to the XNNPACK delegate (or refused), written atomically, and read
back through ``executorch.runtime`` with its input checked against what was exported.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_hybridcomp._executorch import require_executorch
from lightning_hybridcomp._io import write_bytes_atomic
from lightning_hybridcomp._validation import expect_int
from lightning_hybridcomp.artifacts import InputCheck

__all__ = [
    "DEFAULT_MAX_BATCH",
    "SUFFIX",
    "EdgeMetadata",
    "ExecuTorchProgram",
    "LoweringError",
    "UndelegatedOperatorsError",
    "edge_example",
    "lower_to_xnnpack",
    "read_program",
    "set_edge_threads",
    "sidecar_path",
    "write_program",
]

#: The suffix of ExecuTorch program files.
SUFFIX = ".pte"
#: The batch bound programs are exported with unless told otherwise.
DEFAULT_MAX_BATCH = 32
FORMAT_VERSION = 1
_FEATURE = "Exporting to ExecuTorch"
# Graph plumbing that stays outside any delegate by design: it computes nothing.
_PLUMBING = {"executorch_call_delegate", "getitem", "sym_size", "sym_numel", "sym_stride"}


class LoweringError(ValueError):
    """ExecuTorch cannot build a program for the network at all; the message gives its reason."""


class UndelegatedOperatorsError(ValueError):
    """A network XNNPACK cannot lower entirely; the message names the operators that would stay outside."""


@dataclass(frozen=True)
class EdgeMetadata:
    """What a ``.pte`` program is, stored next to it as ``<name>.pte.json``.

    Attributes:
        format_version: version of this side-car's layout.
        kind: ``"classifier"`` (one ``forward`` method) or ``"moe"`` (a ``gate`` and ``expert_<i>`` methods).
        architecture: name of the network.
        methods: the program's method names.
        input_shape: shape of one input sample, without the batch dimension.
        input_dtype: dtype of the input, e.g. ``"float32"``.
        num_classes: width of the logits.
        max_batch: the largest batch the program runs: its memory is planned for this many samples.
        dtype: ``"int8"`` when the conv/linear weights are int8, else ``"float32"``.
        macs: multiply-accumulates per sample (``profiling.count_macs``; for a MoE: the gate plus every
            expert, see ``extra``).
        params: stored weight elements.
        size_bytes: bytes of the ``.pte`` file.
        sha256: hash of the ``.pte`` file, checked when it is loaded.
        steps: compression steps applied, e.g. ``("prune:l1:0.5", "qat:xnnpack")``.
        quantizer: ``"XNNPACKQuantizer"`` (QAT or PTQ for the edge), ``"X86InductorQuantizer"`` or ``None``.
        undelegated: per method, operators that run outside the XNNPACK delegate and how often (empty
            unless the export allowed them).
        extra: free-form JSON-able information (a MoE's ``top_k``, expert figures).
    """

    format_version: int
    kind: str
    architecture: str
    methods: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    max_batch: int
    dtype: str
    macs: int
    params: int
    size_bytes: int = 0
    sha256: str = ""
    steps: tuple[str, ...] = ()
    quantizer: str | None = None
    undelegated: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EdgeMetadata:
        raw = json.loads(text)
        return cls(
            format_version=int(raw["format_version"]),
            kind=str(raw["kind"]),
            architecture=str(raw["architecture"]),
            methods=tuple(str(m) for m in raw["methods"]),
            input_shape=tuple(int(s) for s in raw["input_shape"]),
            input_dtype=str(raw["input_dtype"]),
            num_classes=int(raw["num_classes"]),
            max_batch=int(raw["max_batch"]),
            dtype=str(raw["dtype"]),
            macs=int(raw["macs"]),
            params=int(raw["params"]),
            size_bytes=int(raw["size_bytes"]),
            sha256=str(raw["sha256"]),
            steps=tuple(str(s) for s in raw.get("steps", ())),
            quantizer=None if raw.get("quantizer") is None else str(raw["quantizer"]),
            undelegated={str(k): dict(v) for k, v in dict(raw.get("undelegated", {})).items()},
            extra=dict(raw.get("extra", {})),
        )


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the side-car of the program ``path`` lives: ``model.pte`` -> ``model.pte.json``."""
    file = Path(path)
    return file.with_name(file.name + ".json")


def check_suffix(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if file.suffix != SUFFIX:
        raise ValueError(
            f"Expected `path` to end in {SUFFIX!r}, the suffix of ExecuTorch programs, got {str(file)!r}; name it"
            f" {file.with_suffix(SUFFIX).name!r}."
        )
    return file


def check_max_batch(max_batch: Any) -> int:
    expect_int(
        max_batch,
        "max_batch",
        low=1,
        hint="It is the largest batch the program runs (its memory is planned for it), e.g. 32.",
    )
    return int(max_batch)


#: Lowering re-traces the graph and buckets a symbolic batch: an example of fewer than 16 samples comes back
#: bounded at 15 whatever the ``Dim``'s maximum, one of exactly 16 with a bound of 16 comes back static.
_MIN_PLANNED_BATCH = 17


def edge_example(example: Tensor, max_batch: int) -> Tensor:
    """The example a program is exported with for ExecuTorch (its batch is also the ``Dim``'s maximum).

    ExecuTorch plans memory for the upper bound of the batch dimension that survives lowering, and lowering
    re-traces the graph: from an example of fewer than 16 samples the bound comes back as 15 whatever the
    ``Dim``'s maximum, and an example of 16 with a maximum of 16 becomes a static batch. From an example of
    ``max(max_batch, 17)`` samples and that maximum the bound survives; the input check then caps calls at
    ``max_batch``.
    """
    planned = max(max_batch, _MIN_PLANNED_BATCH)
    return example[:1].expand(planned, *example.shape[1:]).contiguous()


def delegable_graph_(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Rewrite operators XNNPACK refuses only for their spelling into equivalent ones it takes, in place.

    * ``flatten``/``view``/``reshape`` to ``[s0, 256]`` on the symbolic batch becomes ``view(x, [-1, 256])``:
      XNNPACK refuses a target shape holding a symbol and would leave the reshape, with a split of the
      delegate around it, in the portable kernels.
    * ``max_pool2d(..., ceil_mode=True)`` whose output is the same in floor mode (e.g. even sizes, 2x2
      windows) becomes floor mode: XNNPACK refuses ceil mode when any dimension is dynamic.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, Tensor) or value.dim() < 1:
            continue
        concrete = [isinstance(s, int) for s in value.shape]
        if node.target in _RESHAPES and concrete[1:] and all(concrete[1:]) and not concrete[0]:
            with graph.inserting_before(node):
                view = graph.call_function(aten.view.default, (node.args[0], [-1, *value.shape[1:]]))
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            graph.erase_node(node)
        elif node.target == aten.max_pool2d.default and len(node.args) >= 6 and node.args[5]:
            if _floor_mode_pool_shape(node) == tuple(value.shape[-2:]):
                node.args = (*node.args[:5], False)
    graph.eliminate_dead_code()
    program.graph_module.recompile()
    return program


_RESHAPES = (torch.ops.aten.flatten.using_ints, torch.ops.aten.view.default, torch.ops.aten.reshape.default)


def _floor_mode_pool_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Output height and width of a ``max_pool2d`` node in floor mode, or ``None`` if its input is not static."""
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not isinstance(value, Tensor) or not all(isinstance(s, int) for s in value.shape[-2:]):
        return None

    def pair(arg: Any, default: Any) -> tuple[int, int]:
        arg = default if arg is None or arg == [] else arg
        items = list(arg) if isinstance(arg, (list, tuple)) else [arg]
        return (int(items[0]), int(items[-1]))

    kernel = pair(node.args[1], 1)
    stride = pair(node.args[2], kernel)
    padding = pair(node.args[3], 0)
    dilation = pair(node.args[4], 1)
    return tuple(
        (int(value.shape[-2 + i]) + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )


def _undelegated(program: torch.export.ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        name = getattr(target, "__name__", str(target)).split(".")[0]
        if target is operator.getitem or name in _PLUMBING:
            continue
        op = getattr(target, "_op", target)  # an EdgeOpOverload wraps the aten operator
        label = str(getattr(op, "_name", op)).removeprefix("aten::")
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def lower_to_xnnpack(
    programs: Mapping[str, torch.export.ExportedProgram],
    *,
    max_batch: int,
    allow_undelegated: bool,
    where: str,
) -> tuple[bytes, dict[str, dict[str, int]]]:
    """Lower exported programs (one per method) to XNNPACK into one ``.pte``; refuse partial delegation.

    Args:
        programs: method name -> exported program (batch bounded, see :func:`edge_example`).
        max_batch: the batch bound the programs were exported with; checked against the memory plan.
        allow_undelegated: write the program even if operators stay outside the delegate (with a warning);
            by default such a network is refused.
        where: how messages call the network.

    Returns:
        The ``.pte`` bytes and, per method, the operators left outside the delegate.

    Raises:
        UndelegatedOperatorsError: (a ``ValueError``) naming the operators XNNPACK could not take.
        ImportError: without ExecuTorch installed (the message names the extra).
    """
    require_executorch(_FEATURE)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    prepared = {name: delegable_graph_(program) for name, program in programs.items()}
    try:
        edge = to_edge_transform_and_lower(dict(prepared), partitioner=[XnnpackPartitioner()])
    except Exception as err:  # ExecuTorch raises many types; the user needs the network and the reason
        detail = " ".join(str(err).split())[:800]
        raise LoweringError(
            f"Could not lower {where} to ExecuTorch's XNNPACK backend: {type(err).__name__}: {detail}"
        ) from err
    left = {name: ops for name in prepared if (ops := _undelegated(edge.exported_program(name)))}
    if left:
        listed = "; ".join(
            f"{name}: " + ", ".join(f"{op} x{count}" for op, count in ops.items())
            for name, ops in left.items()
        )
        message = (
            f"XNNPACK cannot lower all of {where}: these operators would run outside the delegate, on"
            f" ExecuTorch's portable reference kernels (single-threaded, unoptimised, and each one splits the"
            f" delegated graph, adding a copy in and out): {listed}."
        )
        if not allow_undelegated:
            raise UndelegatedOperatorsError(
                message
                + " Replace them with operators XNNPACK supports (convolutions, linear layers, pooling,"
                " element-wise activations), or pass `allow_undelegated=True` to write the program anyway."
            )
        warnings.warn(message + " Written anyway (`allow_undelegated=True`).", UserWarning, stacklevel=3)
    # Memory is planned for each tensor's upper bound (the default plans for the traced example's sizes).
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    try:
        data = bytes(edge.to_executorch(config).buffer)
    except RuntimeError as err:  # e.g. "Missing out variants": no portable kernel for an undelegated operator
        raise ValueError(
            f"ExecuTorch cannot build {where}: {' '.join(str(err).split())[:600]}. The operators left outside the"
            f" XNNPACK delegate ({left}) have no portable kernels in this ExecuTorch runtime."
        ) from err
    _check_planned_batch(data, list(prepared), max_batch, where)
    return data, left


def _check_planned_batch(data: bytes, methods: list[str], max_batch: int, where: str) -> None:
    """Refuse a program whose memory plan holds fewer samples than ``max_batch`` promises."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(data)
    for name in methods:
        planned = program.metadata(name).input_tensor_meta(0).sizes()[0]
        if planned < max_batch:
            raise RuntimeError(
                f"ExecuTorch planned the memory of {where} ({name}) for {planned} samples, fewer than"
                f" max_batch={max_batch}; export with max_batch={planned} or report this as a bug."
            )


def write_program(path: str | os.PathLike[str], data: bytes, metadata: EdgeMetadata) -> EdgeMetadata:
    """Write the ``.pte`` and its side-car, each atomically (program first); return the final metadata."""
    file = check_suffix(path)
    final = replace(metadata, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    write_bytes_atomic(file, data)
    write_bytes_atomic(sidecar_path(file), final.to_json().encode())
    return final


def _check_header(data: bytes, where: str) -> None:
    """A ``.pte`` is a flatbuffer with the identifier ``ET..`` and an extended header giving its length."""
    if len(data) < 8 or data[4:6] != b"ET":
        raise ValueError(
            f"{where} is not an ExecuTorch program (no 'ET' flatbuffer identifier in its header)."
        )
    if data[8:12] == b"eh00" and len(data) >= 40:
        length = int.from_bytes(data[12:16], "little")
        program_size = int.from_bytes(data[16:24], "little")
        segment_base = int.from_bytes(data[24:32], "little")
        segment_size = int.from_bytes(data[32:40], "little") if length > 24 else 0
        expected = segment_base + segment_size if segment_base else program_size
        if len(data) < expected:
            raise ValueError(
                f"{where} is truncated: its header says {expected} bytes, the file has {len(data)}. Copy or"
                " export it again."
            )


def read_program(
    path: str | os.PathLike[str], *, what: str = "ExecuTorch program"
) -> tuple[Any, EdgeMetadata]:
    """Check and load a ``.pte`` and its side-car: the runtime's ``Program`` and the metadata.

    Raises:
        ValueError: naming the file, if it is missing, not a ``.pte``, truncated, corrupt (its hash differs
            from the side-car's), without its side-car, or refused by the runtime.
    """
    file = check_suffix(path)
    where = f"The {what} {str(file)!r}"
    if not file.is_file():
        raise ValueError(
            f"Expected `path` to be an ExecuTorch program file, but {str(file)!r} does not exist."
        )
    data = file.read_bytes()
    _check_header(data, where)
    side = sidecar_path(file)
    if not side.is_file():
        raise ValueError(
            f"{where} has no side-car {side.name!r} beside it (input shape, classes, batch bound);"
            " `lightning_hybridcomp.edge.export_executorch` writes both."
        )
    try:
        metadata = EdgeMetadata.from_json(side.read_text())
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"The side-car {str(side)!r} is corrupt: {type(err).__name__}: {err}") from err
    if metadata.format_version > FORMAT_VERSION:
        raise ValueError(
            f"The side-car {str(side)!r} has format {metadata.format_version}; this version of lightning_hybridcomp"
            f" reads up to {FORMAT_VERSION}. Upgrade the package."
        )
    if hashlib.sha256(data).hexdigest() != metadata.sha256:
        raise ValueError(
            f"{where} is corrupt: its bytes differ from the ones its side-car recorded (sha256 mismatch). Export"
            " it again."
        )
    require_executorch("Loading an ExecuTorch program")
    from executorch.runtime import Runtime

    try:
        program = Runtime.get().load_program(data)
    except Exception as err:  # the runtime raises RuntimeError with an error code
        raise ValueError(f"{where} could not be loaded by the ExecuTorch runtime: {err}") from err
    missing = sorted(set(metadata.methods) - set(program.method_names))
    if missing:
        raise ValueError(f"{where} lacks the methods {missing} its side-car lists.")
    return program, metadata


class ExecuTorchProgram:
    """A ``.pte`` program loaded in the ExecuTorch runtime, callable like the network it was exported from.

    ``program(x)`` runs ``forward`` on a float tensor ``[batch, *input_shape]`` (batch 1 to
    :attr:`max_batch`) and returns the logits as a new ``torch.Tensor``; :meth:`run` calls any method by
    name. Every call checks its input first (dtype, sample shape, batch bound) and raises a ``ValueError``
    that names the expected shape. Runs are deterministic: the same input gives the same output bit for bit.

    Attributes:
        metadata: the side-car's :class:`EdgeMetadata`.
        path: the program file.
    """

    def __init__(self, program: Any, metadata: EdgeMetadata, path: Path) -> None:
        self.metadata = metadata
        self.path = path
        self._program = program
        self._methods = {name: program.load_method(name) for name in metadata.methods}
        dtype = getattr(torch, metadata.input_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"The side-car of {str(path)!r} records an unknown input dtype {metadata.input_dtype!r}."
            )
        self._check = InputCheck(
            f"The ExecuTorch program {str(path)!r} ({metadata.architecture})",
            tuple(metadata.input_shape),
            dtype,
            max_batch=metadata.max_batch,
        )
        self._size_for_max_batch(dtype)

    def _size_for_max_batch(self, dtype: torch.dtype) -> None:
        """Run every method once at :attr:`max_batch`, so that no later call grows the delegate's buffers.

        ExecuTorch 1.5.1's XNNPACK delegate returns wrong int8 outputs (logits off by 15-20) when a method
        that first ran at a batch of about 12 or more is then called at a larger batch (e.g. 16 then 17, 24
        then 32), and for some later calls after that; fp32 programs and growth from smaller first batches
        are unaffected. A run at the largest batch first leaves every later call within the sizes already
        set up, and its outputs then match the PT2E model at every batch (docs/edge.md).
        """
        example = torch.zeros(self.max_batch, *self.metadata.input_shape, dtype=dtype)
        for method in self._methods.values():
            method.execute([example])

    @property
    def max_batch(self) -> int:
        """The largest batch a call takes."""
        return self.metadata.max_batch

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def run(self, method: str, x: Tensor) -> Tensor:
        """Run ``method`` on ``x`` (checked first) and return its first output as a new tensor."""
        if method not in self._methods:
            raise ValueError(f"Expected `method` to be one of {self.methods}, got {method!r}.")
        self._check(None, (x,), {})  # type: ignore[arg-type]
        outputs = self._methods[method].execute([x.detach().contiguous()])
        # The runtime's output tensors live in its planned memory, which the next call overwrites.
        return outputs[0].clone()

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(self.metadata.methods[0], x)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"ExecuTorchProgram({str(self.path)!r}, {m.architecture}, {m.dtype}, input (batch<={m.max_batch},"
            f" {', '.join(map(str, m.input_shape))}), methods={list(m.methods)})"
        )


def set_edge_threads(threads: int) -> None:
    """Size ExecuTorch's XNNPACK thread pool; it does not follow ``torch.set_num_threads``.

    Raises:
        ValueError: for a count below one.
    """
    expect_int(threads, "threads", low=1)
    require_executorch("Setting ExecuTorch's thread count")
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def steps_quantizer(steps: Sequence[str]) -> str | None:
    """The PT2E quantizer a compression history implies: the last ``qat:`` or ``ptq:`` step's backend."""
    for step in reversed(list(steps)):
        kind, _, backend = step.partition(":")
        if kind in ("qat", "ptq"):
            return {"xnnpack": "XNNPACKQuantizer", "x86_pt2e": "X86InductorQuantizer"}.get(backend, backend)
    return None
