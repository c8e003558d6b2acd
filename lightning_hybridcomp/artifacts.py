"""Deployable compressed models: one self-contained file per model, readable without the training code.

An artifact is a ``torch.export`` program (graph + tensors, no pickled Python objects) with the model's
metadata stored next to it. It holds fp32 networks as well as the real int8 programs of
:class:`~lightning_hybridcomp.callbacks.quantization.QuantizationAwareTraining`.
"""

from __future__ import annotations

import copy
import io
import json
import os
import types
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.utils.flop_counter import FlopCounterMode

from lightning_hybridcomp._graph_passes import check_deterministic
from lightning_hybridcomp._io import write_bytes_atomic

__all__ = ["ArtifactMetadata", "LoadedArtifact", "compile_artifact", "load_artifact", "save_artifact"]

FORMAT_VERSION = 1
_METADATA_FILE = "hybridcomp.json"
# What torch.export.save writes, relative to the archive's root folder (plus the caller's metadata file).
# Anything else (pickled custom objects, legacy pickled weights, AOTInductor binaries) is refused.
_ALLOWED_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
    }
)
_ALLOWED_MEMBER_PREFIXES = ("data/weights/weight_", "data/constants/tensor_")
# Operators and the symbolic-shape functions torch.export itself serializes (torch.sym_int, sym_max, ...).
_SAFE_TARGET_PREFIXES = ("torch.ops.", "_operator.", "math.", "torch.sym_")
_INT_DTYPES = (torch.int8, torch.uint8)
_BN_OPS = {"batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
_TRAINING_ARG = {
    "batch_norm": 5,
    "dropout": 2,
    "feature_dropout": 2,
    "alpha_dropout": 2,
    "feature_alpha_dropout": 2,
}


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
        )


@dataclass
class LoadedArtifact:
    """An artifact read back by :func:`load_artifact`.

    Attributes:
        module: the program as a module in eval mode, callable on a batch of any size; ``.eval()`` and
            ``.train()`` work (they only switch batch-norm and dropout).
        metadata: what :func:`save_artifact` recorded.
        program: the underlying ``torch.export.ExportedProgram``.
    """

    module: nn.Module
    metadata: ArtifactMetadata
    program: torch.export.ExportedProgram


def save_artifact(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Tensor,
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
        path: destination file; ``.pt2`` is the conventional suffix. Parent folders are created.
        example_inputs: one batch of inputs of the shape the model expects (any batch size).
        steps: compression steps applied to the model, recorded in the metadata.
        extra: additional JSON-able information to record.
        architecture: name to record; defaults to the model's class name.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, ``example_inputs`` not a tensor, or ``extra``
            not JSON-able.
        ValueError: if the model cannot be exported; the message carries ``torch.export``'s reason.
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
    data, metadata = _build_artifact(
        model, example_inputs, steps=steps, extra=extra, architecture=architecture
    )
    write_bytes_atomic(path, data)
    return metadata


def _build_artifact(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    steps: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> tuple[bytes, ArtifactMetadata]:
    """The bytes of ``model``'s artifact and its metadata, without writing a file."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}.")
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
    macs = count_program_macs(program, example_inputs[:1])
    params, dtype = _program_params_and_dtype(program)
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

    Raises:
        ValueError: if the file is missing, truncated, corrupt, not an artifact of this package, or
            contains pickled objects; the message names the path.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_artifact(nn.Linear(3, 2), f"{tmp}/lin.pt2", torch.randn(4, 3))
        ...     art = load_artifact(f"{tmp}/lin.pt2")
        >>> art.metadata.num_classes, art.metadata.params, art.module(torch.randn(7, 3)).shape
        (2, 8, torch.Size([7, 2]))
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"Expected `path` to be an artifact file, but {str(file)!r} does not exist.")
    data = file.read_bytes()
    where = repr(str(file))
    text = _check_program_bytes(data, where, kind="artifact", metadata_file=_METADATA_FILE)
    assert text is not None  # for mypy: the check refuses an archive without the metadata file
    metadata = _read_metadata(text, where)
    program = _load_checked_program(data, f"the artifact {where}")
    module = program.module()
    make_exported_train_eval_(module)
    module.eval()
    for tensor in module.parameters():
        tensor.requires_grad_(False)
    return LoadedArtifact(module=module, metadata=_replace(metadata, size_bytes=len(data)), program=program)


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
            with a stride mismatch. ``True`` is fine for fp32 programs.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.

    Example::

        >>> fast = compile_artifact(nn.Linear(3, 2))  # compiles on the first call
        >>> fast(torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """
    _import_quantized_ops()
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, got {type(module).__name__}.")
    try:
        module.eval()
    except NotImplementedError:  # ``ExportedProgram.module()`` refuses .eval() until it can switch modes
        make_exported_train_eval_(module).eval()
    # A compiled inference module never changes mode; Dynamo should see the plain graph.
    remove_mode_sync_(module)
    compiled = torch.compile(module, dynamic=dynamic)
    return _FrozenInference(compiled)


class _FrozenInference(nn.Module):
    """Runs a compiled module without autograd and with inductor freezing, for every (re)compilation.

    ``torch.compile(..., options={"freezing": True})`` does not reach the step that turns weights into
    constants (the int8 convolutions then fail to prepack); patching the config around each call does,
    without switching freezing on for other compiled code in the process.
    """

    def __init__(self, compiled: Any) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


# --- exported graph helpers (shared with the QAT callback) -------------------------------------------


def export_for_artifact(model: nn.Module, example_inputs: Tensor) -> torch.export.ExportedProgram:
    """Export an eval-mode copy of ``model`` with a dynamic batch dimension and unused weights dropped."""
    model = _copy_model(model)
    if isinstance(model, GraphModule):
        make_exported_train_eval_(model)
        strip_unused_attributes_(model)
    model.eval()
    remove_mode_sync_(model)
    _unwrap_tensor_subclasses_(model)
    with torch.no_grad():
        return export_with_dynamic_batch(model, example_inputs)


class ExportError(ValueError):
    """``torch.export`` could not trace a network; the message carries its reason and a hint."""


def export_with_dynamic_batch(
    model: nn.Module, example_inputs: Tensor, *, name: str | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with dimension 0 dynamic; a one-sample example is repeated to two.

    Args:
        model: the network, exported in the mode it is in.
        example_inputs: one batch of inputs.
        name: how error messages call the model; its class name by default.

    Raises:
        ExportError: (a ``ValueError``) with torch.export's reason and a hint when the model cannot be
            exported.
    """
    if example_inputs.shape[0] < 2:
        # A batch of one would make export specialise the batch size to a constant.
        example_inputs = example_inputs.expand(2, *example_inputs.shape[1:]).clone()
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(model, (example_inputs,), dynamic_shapes=({0: batch},))
    except Exception as err:  # export raises UserError, Unsupported, GuardOnDataDependent, ...
        reason = str(err).strip().splitlines()
        raise ExportError(
            f"Could not export {name or type(model).__name__} with `torch.export` on inputs of shape"
            f" {tuple(example_inputs.shape)}: {type(err).__name__}: {' '.join(reason[:6])[:1500]}. Hint: the"
            " network's forward must take one tensor, avoid data-dependent Python control flow and not"
            " specialise on the batch size (e.g. `x.view(x.size(0), -1)` is fine, `x.view(64, -1)` is not)."
        ) from err


def make_exported_train_eval_(module: nn.Module, *, keep_eval_semantics: bool = False) -> nn.Module:
    """Let ``.train()``/``.eval()`` work on an exported module by switching batch-norm and dropout ops.

    Unlike ``torchao``'s ``allow_exported_model_train_eval`` this edits the ``training`` argument of the
    ops in place (torchao's pattern rewrite resets a dropout's ``p`` to 0.5), keeps ``module.training``
    truthful, and re-syncs at every call, because Lightning restores modes by assigning
    ``module.training`` directly. The sync wraps ``forward`` rather than using a forward pre-hook: a
    pre-hook runs after ``nn.Module`` fetched the old ``forward``, so the first call after a mode change
    would still run the previous graph (a training batch with eval-mode BatchNorm).

    Args:
        module: an exported module; anything else is returned unchanged.
        keep_eval_semantics: run the graph with eval semantics (BatchNorm on running statistics, no
            dropout) in both modes, so that ``.train()``/``.eval()`` only move the ``training`` flag. For
            frozen graphs inside a model that trains, such as the experts of a Mixture of Experts.
    """
    if not isinstance(module, GraphModule):
        return module
    # (Re)bound to this very module: a copy made by a graph pass may carry methods bound to the original.
    module.__dict__.setdefault("_hybridcomp_frozen_bn", False)
    module.__dict__["_hybridcomp_eval_only"] = keep_eval_semantics
    module.__dict__.pop("_hybridcomp_graph_mode", None)
    module.train = types.MethodType(_exported_train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_exported_eval, module)  # type: ignore[method-assign]
    module.forward = types.MethodType(_mode_synced_forward, module)  # type: ignore[method-assign]
    graph_training = None if keep_eval_semantics else _graph_training_flag(module)
    module.training = graph_training if graph_training is not None else module.training
    return module


def set_exported_bn_frozen_(module: GraphModule, frozen: bool) -> None:
    """Freeze (or unfreeze) batch-norm statistics of an exported module, also in train mode."""
    module._hybridcomp_frozen_bn = frozen  # type: ignore[assignment]
    _apply_exported_mode_(module, module.training)


def strip_unused_attributes_(module: GraphModule) -> int:
    """Delete parameters and buffers no ``get_attr`` node reads (e.g. fp32 weights left by convert_pt2e).

    Returns the number of tensor elements removed.
    """
    used = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed += tensor.numel()
    return removed


def serialize_program(
    program: torch.export.ExportedProgram, *, extra_files: Mapping[str, str] | None = None
) -> bytes:
    """``torch.export.save`` to bytes, leaving out the example inputs; ``program`` is not changed.

    Example inputs are stored as a pickle, which :func:`load_program_bytes` refuses: ``torch.export.load``
    may open it with ``weights_only=False``.
    """
    if program.example_inputs is not None:
        program = copy.copy(program)
        program.example_inputs = None  # type: ignore[assignment]
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=dict(extra_files) if extra_files else None)
    return buffer.getvalue()


def load_program_bytes(data: bytes, where: str) -> torch.export.ExportedProgram:
    """Deserialize a program written by :func:`serialize_program`, after checking nothing in it is a pickle.

    Only raw tensor payloads, JSON, the archive's bookkeeping files and graphs that call registered
    operators are accepted, so nothing is unpickled (``torch.export.load`` may fall back to
    ``weights_only=False``).

    Args:
        data: the serialized program.
        where: what the bytes are, for error messages, e.g. ``"the stored program of experts[0] (TinyCNN)"``.

    Raises:
        ValueError: naming ``where`` if the bytes are not a readable program or hold pickled objects,
            unexpected files or calls of non-operator functions.
    """
    _check_program_bytes(data, where, kind="exported program")
    return _load_checked_program(data, where)


def count_program_macs(program: torch.export.ExportedProgram | nn.Module, sample: Tensor) -> int:
    """Multiply-accumulates of convolutions and matrix products for ``sample`` (FLOP counter / 2)."""
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._int_mm: _int_mm_flop})
    with counter, torch.no_grad():
        module(sample)
    return int(counter.get_total_flops()) // 2


# --- private ------------------------------------------------------------------------------------------


def _int_mm_flop(
    a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    return 2 * int(a_shape[0]) * int(a_shape[1]) * int(b_shape[1])


def _exported_train(self: GraphModule, mode: bool = True) -> GraphModule:
    self.training = mode
    for child in self.children():
        child.train(mode)
    _apply_exported_mode_(self, mode)
    return self


def _exported_eval(self: GraphModule) -> GraphModule:
    return _exported_train(self, False)


def _mode_synced_forward(self: GraphModule, *args: Any, **kwargs: Any) -> Any:
    _apply_exported_mode_(self, self.training)
    # Looked up on the class after the sync, so a recompile of this very call takes effect.
    return type(self).forward(self, *args, **kwargs)


def remove_mode_sync_(module: nn.Module) -> None:
    """Drop the per-call mode sync (for export and ``torch.compile``, which should see the plain graph)."""
    if isinstance(module, GraphModule) and "forward" in module.__dict__:
        _apply_exported_mode_(module, module.training)
        del module.__dict__["forward"]


def _mode_nodes(module: GraphModule) -> Iterator[tuple[torch.fx.Node, int, bool]]:
    """(node, index of its ``training`` argument, is batch norm) for batch-norm and dropout ops."""
    for node in module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._opname
        index = _TRAINING_ARG.get(name)
        if index is not None and len(node.args) > index and isinstance(node.args[index], bool):
            yield node, index, name in _BN_OPS


def _graph_training_flag(module: GraphModule) -> bool | None:
    for node, index, _ in _mode_nodes(module):
        return bool(node.args[index])
    return None


def _apply_exported_mode_(module: GraphModule, training: bool) -> None:
    # A graph kept at eval semantics stays there in train mode too: only its `training` flag follows.
    graph_training = training and not module.__dict__.get("_hybridcomp_eval_only", False)
    frozen_bn = getattr(module, "_hybridcomp_frozen_bn", False)
    if module.__dict__.get("_hybridcomp_graph_mode") == (graph_training, frozen_bn):
        return
    module._hybridcomp_graph_mode = (graph_training, frozen_bn)  # type: ignore[assignment]
    changed = False
    for node, index, is_bn in _mode_nodes(module):
        value = graph_training and not (is_bn and frozen_bn)
        if node.args[index] != value:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
            changed = True
    if changed:
        module.recompile()


def _copy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:  # a module holding unpicklable state
        raise TypeError(f"Could not copy {type(model).__name__} for export: {err}") from err


def _unwrap_tensor_subclasses_(model: nn.Module) -> None:
    """Turn torchao's quantized weight tensors into plain tensors so export stores no pickled objects."""
    has_subclass = any(type(p) not in (Tensor, nn.Parameter) for p in model.parameters())
    if has_subclass:
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)


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


def _program_params_and_dtype(program: torch.export.ExportedProgram) -> tuple[int, str]:
    """Elements of stored weights (no qparams, no BN statistics) and whether the big ones are int8."""
    signature = program.graph_signature
    sources: dict[str, str] = {}
    sources.update(signature.inputs_to_parameters)
    sources.update(signature.inputs_to_buffers)
    sources.update(signature.inputs_to_lifted_tensor_constants)
    tensors: dict[str, Tensor] = {**program.state_dict, **program.constants}  # type: ignore[dict-item]
    params = 0
    int_elements = 0
    float_elements = 0
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in sources:
            continue
        tensor = tensors.get(sources[node.name])
        if not isinstance(tensor, Tensor) or not node.users:
            continue
        if all(_is_auxiliary_use(user, node) for user in node.users):
            continue
        params += tensor.numel()
        if tensor.dtype in _INT_DTYPES:
            int_elements += tensor.numel()
        elif tensor.is_floating_point():
            float_elements += tensor.numel()
    return params, "int8" if int_elements > float_elements else "float32"


def _is_auxiliary_use(user: torch.fx.Node, tensor: torch.fx.Node) -> bool:
    """Whether ``tensor`` enters ``user`` only as a quantization parameter or a BN running statistic."""
    if user.op != "call_function":
        return False
    target = str(user.target)
    positions = [i for i, a in enumerate(user.args) if a is tensor]
    if not positions:
        return False
    if "quantize" in target or "choose_qparams" in target:
        return min(positions) >= 1
    if isinstance(user.target, torch._ops.OpOverload) and user.target._opname in _BN_OPS:
        return min(positions) >= 3
    return False


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


def _check_program_bytes(
    data: bytes, where: str, *, kind: str, metadata_file: str | None = None
) -> str | None:
    """Refuse serialized programs that ``torch.export.load`` would unpickle, or that are not programs.

    Checked before anything is deserialized. With ``metadata_file`` (a file saved as ``extra_files``) that
    file is required, and its text is returned.

    Raises:
        ValueError: naming ``where``; ``kind`` is the noun for such data (``"artifact"``).
    """
    subject = where[:1].upper() + where[1:]
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(
            f"{subject} is not a lightning_hybridcomp {kind}: not a readable archive ({err}); it may be"
            " truncated or corrupt."
        ) from err
    allowed = _ALLOWED_MEMBERS | ({f"extra/{metadata_file}"} if metadata_file else set())
    with archive:
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise ValueError(f"{subject} is not a lightning_hybridcomp {kind}: unexpected archive layout.")
        root = roots.pop() + "/"
        members = {n[len(root) :] for n in names}
        if metadata_file and f"extra/{metadata_file}" not in members:
            raise ValueError(
                f"{subject} is not a lightning_hybridcomp {kind} (no {metadata_file} inside). Artifacts are"
                " written by `lightning_hybridcomp.artifacts.save_artifact`; a Lightning checkpoint or a"
                " `torch.save` file is a different format."
            )
        unexpected = sorted(
            m for m in members if m not in allowed and not m.startswith(_ALLOWED_MEMBER_PREFIXES)
        )
        if unexpected:
            raise ValueError(
                f"Refusing to load {where}: it contains members an {kind} never has ({unexpected[:5]}),"
                " e.g. pickled objects or compiled binaries."
            )
        try:
            metadata = archive.read(f"{root}extra/{metadata_file}").decode() if metadata_file else None
            configs = [
                json.loads(archive.read(root + name)).get("config", {})
                for name in (
                    "data/weights/model_weights_config.json",
                    "data/constants/model_constants_config.json",
                )
                if name in members
            ]
            sample_inputs = "data/sample_inputs/model.pt"
            pickled_inputs = sample_inputs in members and len(archive.read(root + sample_inputs)) > 0
            graph = json.loads(archive.read(root + "models/model.json"))
        except (KeyError, ValueError, zipfile.BadZipFile, OSError, EOFError, TypeError) as err:
            raise ValueError(
                f"{subject} is a corrupt or truncated {kind}: {type(err).__name__}: {err}"
            ) from err
    pickled = [
        fqn for config in configs for fqn, payload in config.items() if payload.get("use_pickle", False)
    ]
    if pickled or pickled_inputs:
        raise ValueError(
            f"Refusing to load {where}: it stores pickled objects ({pickled[:3] or 'example inputs'}), which"
            " lightning_hybridcomp never writes."
        )
    unsafe = sorted({t for t in _graph_targets(graph) if not t.startswith(_SAFE_TARGET_PREFIXES)})
    if unsafe:
        raise ValueError(f"Refusing to load {where}: its graph calls non-operator functions {unsafe[:5]}.")
    return metadata


def _load_checked_program(data: bytes, where: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of bytes :func:`_check_program_bytes` accepted."""
    _import_quantized_ops()
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as err:  # torch raises many types here; the user needs to know what and why
        raise ValueError(f"Could not load {where}: {type(err).__name__}: {err}") from err


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


def _graph_targets(obj: Any) -> Iterator[str]:
    """Every call target in a serialized graph, nested graphs included."""
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str) and "inputs" in obj:
            yield obj["target"]
        for value in obj.values():
            yield from _graph_targets(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _graph_targets(value)


def _import_quantized_ops() -> None:
    # Registers torchao's quantized ops for deserialization (int8 PT2E programs call its quantize and
    # dequantize ops) and the x86 int8 inductor lowerings; without the latter, compile silently runs fp32
    # convolutions.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def _replace(metadata: ArtifactMetadata, **changes: Any) -> ArtifactMetadata:
    values = asdict(metadata)
    values.update(changes)
    values["input_shape"] = tuple(values["input_shape"])
    values["steps"] = tuple(values["steps"])
    return ArtifactMetadata(**values)
