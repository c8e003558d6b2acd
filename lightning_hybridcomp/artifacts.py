"""Deployable compressed models: one self-contained file per model, readable without the training code.

An artifact is a ``torch.export`` program (graph + tensors, no pickled Python objects) with the model's
metadata stored next to it. It holds fp32 networks as well as the real int8 programs of
:class:`~lightning_hybridcomp.callbacks.quantization.QuantizationAwareTraining`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from lightning_hybridcomp._graph_passes import check_deterministic, signed_int8_activations
from lightning_hybridcomp._io import write_bytes_atomic
from lightning_hybridcomp._lightning import declared_example_input
from lightning_hybridcomp.profiling import count_macs
from lightning_hybridcomp.programs import (
    check_program_bytes,
    config_values,
    export_for_artifact,
    import_quantized_ops,
    load_checked_program,
    make_exported_train_eval_,
    program_params_and_dtype,
    remove_mode_sync_,
    serialize_program,
)

__all__ = [
    "ArtifactMetadata",
    "InputCheck",
    "LoadedArtifact",
    "build_artifact",
    "compile_artifact",
    "default_example",
    "load_artifact",
    "save_artifact",
]

FORMAT_VERSION = 1
_METADATA_FILE = "hybridcomp.json"
#: The one suffix of artifact files: :func:`save_artifact` and :func:`load_artifact` refuse others, so that
#: whatever dispatches on file names (the Mixture of Experts, the pipeline) agrees with what they accept.
SUFFIX = ".pt2"


@dataclass(frozen=True)
class ArtifactMetadata:
    """What an artifact is, stored inside the file as JSON.

    Attributes:
        format_version: version of this package's artifact layout.
        architecture: name of the network (its class name unless given).
        input_shape: shape of one input sample, without the batch dimension.
        num_classes: size of the last output dimension.
        dtype: ``"int8"`` when the weights of the multiply-accumulate layers are stored as 8-bit
            integers, else ``"float32"``.
        macs: multiply-accumulates of the convolutions and matrix products for one sample
            (``torch.utils.flop_counter`` FLOPs / 2; element-wise ops are not counted).
        params: elements of the stored weight tensors the program uses, without quantization scales,
            zero points and batch-norm running statistics.
        size_bytes: bytes of the artifact file.
        steps: compression steps applied, in order, e.g. ``("prune:l2:0.5", "qat:x86_pt2e")``.
        extra: free-form JSON-able information; ``extra["ops"]`` counts the program's operators.
        input_dtype: dtype of the input the program takes, e.g. ``"float32"`` (``"int64"`` for token
            ids); ``None`` only in metadata read from a file written before it was recorded, which
            :func:`load_artifact` fills in from the program.
    """

    format_version: int
    architecture: str
    input_shape: tuple[int, ...]
    num_classes: int
    dtype: str
    macs: int
    params: int
    size_bytes: int
    steps: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    input_dtype: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactMetadata:
        raw = json.loads(text)
        return cls(
            format_version=int(raw["format_version"]),
            architecture=str(raw["architecture"]),
            input_shape=tuple(int(s) for s in raw["input_shape"]),
            num_classes=int(raw["num_classes"]),
            dtype=str(raw["dtype"]),
            macs=int(raw["macs"]),
            params=int(raw["params"]),
            size_bytes=int(raw["size_bytes"]),
            steps=tuple(str(s) for s in raw.get("steps", ())),
            extra=dict(raw.get("extra", {})),
            input_dtype=None if raw.get("input_dtype") is None else str(raw["input_dtype"]),
        )


@dataclass
class LoadedArtifact:
    """An artifact read back by :func:`load_artifact`.

    Attributes:
        module: the program as a module in eval mode, callable on a batch of any size; ``.eval()`` and
            ``.train()`` work (they only switch batch-norm and dropout). It checks its input first: a
            tensor of another dtype or sample shape than ``metadata`` records raises a ``ValueError``
            naming both, anything but one tensor a ``TypeError``.
        metadata: what :func:`save_artifact` recorded.
        program: the underlying ``torch.export.ExportedProgram``.
    """

    module: nn.Module
    metadata: ArtifactMetadata
    program: torch.export.ExportedProgram


def save_artifact(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor | None = None,
    *,
    steps: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> ArtifactMetadata:
    """Write ``model`` as a self-contained artifact file and return its metadata.

    ``model`` may be a plain fp32 ``nn.Module``, a converted int8 ``GraphModule`` from the PT2E flow, or
    a module whose Linear/Embedding weights torchao quantized. It is exported in eval mode with a
    dynamic batch dimension, on a copy (``model`` is not changed). Weights the program does not use
    (the fp32 originals of quantized weights), node metadata and example inputs are left out, and the
    graph description is compressed, so the file size reflects the stored weights.

    Args:
        model: the network to save.
        path: destination file, ending in ``.pt2``. Parent folders are created.
        example_inputs: one batch of inputs of the shape and dtype the model expects (any batch size);
            defaults to the model's ``example_input_array`` (a LightningModule's) when that is a tensor or a one-item tuple.
        steps: compression steps applied to the model, recorded in the metadata.
        extra: additional JSON-able information to record.
        architecture: name to record; defaults to the model's class name.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``example_inputs`` not a tensor (or not given
            for a model without an ``example_input_array`` of one tensor), or ``extra`` not JSON-able.
        ValueError: if ``path`` does not end in ``.pt2``; if the model cannot be exported, with
            ``torch.export``'s reason.
            A ``NondeterministicProgramError`` (a ``ValueError``) if the exported program still draws
            random numbers (e.g. ``F.dropout(x, p)`` without ``training=self.training``); nothing is written.

    Example::

        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     meta = save_artifact(net, f"{tmp}/net.pt2", torch.randn(2, 1, 8, 8), steps=("fp32",))
        ...     loaded = load_artifact(f"{tmp}/net.pt2")
        ...     out = loaded.module(torch.randn(5, 1, 8, 8))
        >>> meta.input_shape, meta.num_classes, meta.dtype, meta.macs, out.shape
        ((1, 8, 8), 10, 'float32', 2736, torch.Size([5, 10]))
    """
    _check_suffix(path)
    data, metadata = build_artifact(
        model, example_inputs, steps=steps, extra=extra, architecture=architecture
    )
    write_bytes_atomic(path, data)
    return metadata


def build_artifact(
    model: nn.Module,
    example_inputs: Tensor | None = None,
    *,
    steps: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> tuple[bytes, ArtifactMetadata]:
    """The bytes of ``model``'s artifact and its metadata, without writing a file."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}.")
    if example_inputs is None:
        example_inputs = default_example(model)
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() == 0 or example_inputs.shape[0] == 0:
        raise TypeError(
            "Expected `example_inputs` to be a tensor with a batch dimension, got"
            f" {type(example_inputs).__name__} of shape {getattr(example_inputs, 'shape', None)}."
        )
    extra_dict = dict(extra or {})
    try:
        json.dumps(extra_dict)
    except (TypeError, ValueError) as err:
        raise TypeError(f"Expected `extra` to be JSON-able, got {extra_dict!r}: {err}") from err

    program = export_for_artifact(model, example_inputs)
    check_deterministic(program, f"The program of {architecture or _architecture_name(model)}")
    macs = count_macs(program, example_inputs[:1])
    params, dtype = program_params_and_dtype(program)
    outputs = next(n for n in program.graph.nodes if n.op == "output").args[0]
    first_out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    out_val = first_out.meta.get("val") if isinstance(first_out, torch.fx.Node) else None
    num_classes = int(out_val.shape[-1]) if isinstance(out_val, Tensor) and out_val.dim() > 1 else 0
    extra_dict.setdefault("ops", _op_summary(program))
    name = architecture or _architecture_name(model)
    _strip_node_metadata_(program)

    metadata = ArtifactMetadata(
        format_version=FORMAT_VERSION,
        architecture=name,
        input_shape=tuple(int(s) for s in example_inputs.shape[1:]),
        num_classes=num_classes,
        dtype=dtype,
        macs=macs,
        params=params,
        size_bytes=0,
        steps=tuple(str(s) for s in steps),
        extra=extra_dict,
        input_dtype=_dtype_name(example_inputs.dtype),
    )
    # The size is stored inside the file it measures: iterate until the digits stop changing.
    data = b""
    for _ in range(4):
        data = _serialize(program, metadata)
        if metadata.size_bytes == len(data):
            break
        metadata = _replace(metadata, size_bytes=len(data))
    return data, _replace(metadata, size_bytes=len(data))


def load_artifact(path: str | os.PathLike[str]) -> LoadedArtifact:
    """Read an artifact written by :func:`save_artifact`.

    Needs only ``torch`` and ``torchao`` (imported here, so that the int8 operators and their inductor
    lowerings exist), not the classes that trained the model. The file is checked before anything is
    deserialized: only plain tensor payloads, JSON and registered operators are accepted, so nothing is
    unpickled.

    The returned module checks what it is called with against the metadata (dtype, and the shape of one
    sample; the batch dimension is free) and raises a ``ValueError`` saying what it expected and what it
    got, where the program itself would fail with a bare error of ``torch.export``'s guards.

    Raises:
        ValueError: if the path does not end in ``.pt2``; if the file is missing, truncated, corrupt, not
            an artifact of this package, or contains pickled objects; the message names the path.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_artifact(nn.Linear(3, 2), f"{tmp}/lin.pt2", torch.randn(4, 3))
        ...     art = load_artifact(f"{tmp}/lin.pt2")
        >>> art.metadata.num_classes, art.metadata.params, art.module(torch.randn(7, 3)).shape
        (2, 8, torch.Size([7, 2]))
    """
    file = _check_suffix(path)
    if not file.is_file():
        raise ValueError(f"Expected `path` to be an artifact file, but {str(file)!r} does not exist.")
    data = file.read_bytes()
    where = repr(str(file))
    text = check_program_bytes(data, where, kind="artifact", metadata_file=_METADATA_FILE)
    assert text is not None  # for mypy: the check refuses an archive without the metadata file
    metadata = _read_metadata(text, where)
    program = load_checked_program(data, f"the artifact {where}")
    if metadata.input_dtype is None:
        metadata = _replace(metadata, input_dtype=_program_input_dtype(program))
    metadata = _replace(metadata, size_bytes=len(data))
    module = program.module()
    make_exported_train_eval_(module)
    module.eval()
    for tensor in module.parameters():
        tensor.requires_grad_(False)
    # A pre-hook rather than a wrapping module: the MoE, compile_artifact and count_macs read the graph.
    module.register_forward_pre_hook(
        InputCheck.of(metadata, f"The artifact {where}"), prepend=True, with_kwargs=True
    )
    return LoadedArtifact(module=module, metadata=metadata, program=program)


def compile_artifact(module: nn.Module, *, dynamic: bool = False) -> nn.Module:
    """``torch.compile`` a loaded (or converted) program for fast CPU inference.

    Inductor's ``freezing`` is what turns the PT2E int8 pattern into int8 kernels, and it only applies
    to inference graphs: the returned module therefore always runs under ``torch.no_grad()`` with
    freezing on, including its first (compiling) call.

    Args:
        module: typically :attr:`LoadedArtifact.module`; any ``nn.Module``, including the module of a
            plain ``torch.export`` program.
        dynamic: passed to ``torch.compile``. The default compiles once per batch size (about a second
            each for small nets): with a symbolic batch size, torch 2.14's int8 convolution lowering fails
            with a stride mismatch on single-channel inputs. ``True`` is fine for fp32 programs and for
            int8 programs of inputs with several channels.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.
        ValueError: for an int8 program with signed int8 activations (``QuantizationAwareTraining(backend=
            "xnnpack")``, the scheme of ExecuTorch's XNNPACK delegate): inductor's x86 int8 kernels take
            uint8 activations only. Run it with :func:`~lightning_hybridcomp.edge.load_executorch` or eagerly.

    Example::

        >>> fast = compile_artifact(nn.Linear(3, 2))  # compiles on the first call
        >>> fast(torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """
    import_quantized_ops()
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, got {type(module).__name__}.")
    if signed_int8_activations(module):
        raise ValueError(
            "This int8 program quantizes activations to signed int8 (XNNPACK's scheme, backend='xnnpack'),"
            " which inductor's x86 int8 kernels cannot run (they take uint8 activations): deploy it with"
            " `export_executorch`/`load_executorch`, run it eagerly, or quantize with backend='x86_pt2e' for"
            " the inductor path."
        )
    try:
        module.eval()
    except NotImplementedError:  # ``ExportedProgram.module()`` refuses .eval() until it can switch modes
        make_exported_train_eval_(module).eval()
    # A compiled inference module never changes mode; Dynamo should see the plain graph.
    remove_mode_sync_(module)
    compiled = torch.compile(module, dynamic=dynamic)
    return InferenceOnly(compiled, freezing=True)


class InferenceOnly(nn.Module):
    """Runs a compiled module without autograd; with ``freezing``, with inductor freezing at every (re)compilation.

    ``torch.compile(..., options={"freezing": True})`` does not reach the step that turns weights into
    constants (the int8 convolutions then fail to prepack); patching the config around each call does,
    without switching freezing on for other compiled code in the process. Without ``freezing`` the compiled
    code reads the module's current weights (a MoE's gate, which trains on).
    """

    def __init__(self, compiled: Any, *, freezing: bool = False) -> None:
        super().__init__()
        self.compiled = compiled
        self.freezing = freezing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        frozen = config_values(inductor_config, freezing=True) if self.freezing else contextlib.nullcontext()
        with torch.no_grad(), frozen:
            return self.compiled(*args, **kwargs)


# --- private ------------------------------------------------------------------------------------------


class InputCheck:
    """What a deployed program takes: one tensor of the recorded dtype and sample shape, a batch up to a bound.

    The forward pre-hook of a loaded artifact (any batch) and the input check of an ExecuTorch program
    (batch 1 to ``max_batch``). A plain class (not a closure) so that the module can still be copied and
    pickled like any other.
    """

    def __init__(
        self, where: str, sample_shape: tuple[int, ...], dtype: torch.dtype, max_batch: int | None = None
    ) -> None:
        self.where = where
        self.sample_shape = sample_shape
        self.dtype = dtype
        self.max_batch = max_batch

    @classmethod
    def of(cls, metadata: ArtifactMetadata, where: str) -> InputCheck:
        dtype = getattr(torch, str(metadata.input_dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where} is a corrupt artifact: unknown input dtype {metadata.input_dtype!r}.")
        return cls(f"{where} ({metadata.architecture})", tuple(metadata.input_shape), dtype)

    def expected(self) -> str:
        shape = ", ".join(["batch", *(str(s) for s in self.sample_shape)])
        bound = "" if self.max_batch is None else f" with batch from 1 to {self.max_batch}"
        return f"a {_dtype_name(self.dtype)} tensor of shape ({shape}){bound}"

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = (*args, *kwargs.values())
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            got = ", ".join(type(x).__name__ for x in inputs) or "nothing"
            raise TypeError(f"{self.where} takes one input, {self.expected()}; got {got}.")
        x = inputs[0]
        shape_ok = x.dim() == len(self.sample_shape) + 1 and tuple(x.shape[1:]) == self.sample_shape
        batch_ok = self.max_batch is None or (x.dim() > 0 and 1 <= x.shape[0] <= self.max_batch)
        if x.dtype == self.dtype and shape_ok and batch_ok:
            return None
        if x.dtype != self.dtype:
            hint = f" Convert it with `x.to(torch.{_dtype_name(self.dtype)})`"
            if not x.dtype.is_floating_point and self.dtype.is_floating_point:
                hint += ", scaled and normalised as the training data was"
            hint += "."
        elif x.dim() == len(self.sample_shape):
            hint = " It lacks the batch dimension: pass `x.unsqueeze(0)` for a single sample."
        elif shape_ok and self.max_batch is not None and x.shape[0] > self.max_batch:
            hint = (
                f" The program's memory is planned for at most {self.max_batch} samples: run"
                f" `x.split({self.max_batch})` batch by batch, or export again with a larger `max_batch`."
            )
        elif shape_ok:
            hint = " An empty batch has nothing to run."
        else:
            hint = " Only the batch dimension is free; the others were fixed when the artifact was saved."
        raise ValueError(
            f"{self.where} expects {self.expected()}, got a {_dtype_name(x.dtype)} tensor of shape"
            f" {tuple(x.shape)}.{hint}"
        )


def _check_suffix(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if file.suffix != SUFFIX:
        raise ValueError(
            f"Expected `path` to end in {SUFFIX!r}, the suffix of artifact files, got {str(file)!r}. An artifact"
            " is a torch.export program, not an ONNX or TorchScript file; name it"
            f" {file.with_suffix(SUFFIX).name!r}."
        )
    return file


def default_example(model: nn.Module) -> Tensor:
    """The model's ``example_input_array`` (see :func:`declared_example_input`); else a ``TypeError`` saying
    what to pass."""
    example = declared_example_input(model)
    if example is not None:
        return example
    raise TypeError(
        f"Expected `example_inputs` to be a tensor with a batch dimension: {type(model).__name__} has no"
        " `example_input_array` to"
        " default to. Pass one batch of the inputs the model takes, e.g."
        " `save_artifact(model, path, example_inputs=torch.randn(2, 1, 16, 16))`, or set"
        " `model.example_input_array` to one."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _program_input_dtype(program: torch.export.ExportedProgram) -> str:
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs and isinstance(node.meta.get("val"), Tensor):
            return _dtype_name(node.meta["val"].dtype)
    return "float32"


def _architecture_name(model: nn.Module) -> str:
    if isinstance(model, GraphModule):
        return str(getattr(model, "_hybridcomp_architecture", "GraphModule"))
    return type(model).__name__


def _op_summary(program: torch.export.ExportedProgram) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = node.target._opname
            if name.startswith(
                ("conv", "linear", "addmm", "mm", "_int_mm", "embedding", "quantize", "dequantize")
            ):
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _strip_node_metadata_(program: torch.export.ExportedProgram) -> None:
    # Stack traces and module stacks dominate the serialized graph; "val" is needed to deserialize.
    for node in program.graph.nodes:
        for key in list(node.meta):
            if key not in ("val", "tensor_meta"):
                del node.meta[key]
    program.example_inputs = None


def _serialize(program: torch.export.ExportedProgram, metadata: ArtifactMetadata) -> bytes:
    raw = serialize_program(program, extra_files={_METADATA_FILE: metadata.to_json()})
    # Recompress the JSON members (the graph description is ~10x smaller deflated); tensors stay stored.
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            compress = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info.filename), compress_type=compress)
    return out.getvalue()


def _read_metadata(text: str, where: str) -> ArtifactMetadata:
    try:
        metadata = ArtifactMetadata.from_json(text)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{where} is a corrupt or truncated artifact: {type(err).__name__}: {err}") from err
    if metadata.format_version > FORMAT_VERSION:
        raise ValueError(
            f"{where} has artifact format {metadata.format_version}; this version of lightning_hybridcomp reads"
            f" up to {FORMAT_VERSION}. Upgrade the package."
        )
    return metadata


def _replace(metadata: ArtifactMetadata, **changes: Any) -> ArtifactMetadata:
    values = asdict(metadata)
    values.update(changes)
    values["input_shape"] = tuple(values["input_shape"])
    values["steps"] = tuple(values["steps"])
    return ArtifactMetadata(**values)
