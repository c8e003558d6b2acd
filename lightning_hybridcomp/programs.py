"""Exported programs: tracing with a dynamic batch, train/eval modes of exported graphs, safe serialization.

The toolkit the callbacks, the MoE and the artifact format share: ``torch.export`` with a readable error,
``.train()``/``.eval()`` for exported graphs, and program bytes that load without unpickling anything.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import types
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

__all__ = [
    "ExportError",
    "check_program_bytes",
    "config_values",
    "cpu_copy",
    "export_for_artifact",
    "export_with_dynamic_batch",
    "import_quantized_ops",
    "load_checked_program",
    "load_program_bytes",
    "make_exported_train_eval_",
    "program_params_and_dtype",
    "remove_mode_sync_",
    "serialize_program",
    "set_exported_bn_frozen_",
    "strip_unused_attributes_",
]

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


def export_for_artifact(
    model: nn.Module, example_inputs: Tensor, *, max_batch: int | None = None
) -> torch.export.ExportedProgram:
    """Export an eval-mode copy of ``model`` with a dynamic batch dimension and unused weights dropped.

    ``max_batch`` bounds the batch dimension (see :func:`export_with_dynamic_batch`).
    """
    model = _copy_model(model)
    if isinstance(model, GraphModule):
        make_exported_train_eval_(model)
        strip_unused_attributes_(model)
    model.eval()
    remove_mode_sync_(model)
    _unwrap_tensor_subclasses_(model)
    with torch.no_grad():
        return export_with_dynamic_batch(model, example_inputs, max_batch=max_batch)


class ExportError(ValueError):
    """``torch.export`` could not trace a network; the message carries its reason and a hint."""


def export_with_dynamic_batch(
    model: nn.Module, example_inputs: Tensor, *, name: str | None = None, max_batch: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with dimension 0 dynamic; a one-sample example is repeated to two.

    Args:
        model: the network, exported in the mode it is in.
        example_inputs: one batch of inputs.
        name: how error messages call the model; its class name by default.
        max_batch: the largest batch the program accepts (``None``: unbounded); ``1`` exports a static
            batch of one.

    Raises:
        ExportError: (a ``ValueError``) with torch.export's reason and a hint when the model cannot be
            exported.
    """
    if max_batch == 1:
        example_inputs, dynamic_shapes = example_inputs[:1], None
    else:
        if example_inputs.shape[0] < 2:
            # A batch of one would make export specialise the batch size to a constant.
            example_inputs = example_inputs.expand(2, *example_inputs.shape[1:]).clone()
        dynamic_shapes = ({0: torch.export.Dim("batch", max=max_batch)},)
    try:
        return torch.export.export(model, (example_inputs,), dynamic_shapes=dynamic_shapes)
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
    check_program_bytes(data, where, kind="exported program")
    return load_checked_program(data, where)


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


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU (for ExecuTorch lowering); ``model`` itself stays where it is."""
    return _copy_model(model).cpu()


def _unwrap_tensor_subclasses_(model: nn.Module) -> None:
    """Turn torchao's quantized weight tensors into plain tensors so export stores no pickled objects."""
    has_subclass = any(type(p) not in (Tensor, nn.Parameter) for p in model.parameters())
    if has_subclass:
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)


def program_params_and_dtype(program: torch.export.ExportedProgram) -> tuple[int, str]:
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


def check_program_bytes(
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


def load_checked_program(data: bytes, where: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of bytes :func:`check_program_bytes` accepted."""
    import_quantized_ops()
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as err:  # torch raises many types here; the user needs to know what and why
        raise ValueError(f"Could not load {where}: {type(err).__name__}: {err}") from err


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


@contextlib.contextmanager
def config_values(config: Any, **values: Any) -> Iterator[None]:
    """Set entries of a torch config module (``torch._inductor.config``, ``torch._dynamo.config``) for a block.

    What ``config.patch(...)`` does (the values are context-local in torch's config modules, so other threads
    keep theirs), at a fraction of its cost: the patch builds a context object and a context variable on
    every entry, about 0.1 ms each, and around every call of a compiled x86 int8 network of an expert's size
    (at batch 1, 1.25 ms with this function) the two patches of the MoE's experts cost another 0.45 ms.

    Example::

        >>> import torch._inductor.config as inductor_config
        >>> with config_values(inductor_config, freezing=True):
        ...     inductor_config.freezing
        True
    """
    previous = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(config, name, value)


def import_quantized_ops() -> None:
    # Registers torchao's quantized ops for deserialization (int8 PT2E programs call its quantize and
    # dequantize ops) and the x86 int8 inductor lowerings; without the latter, compile silently runs fp32
    # convolutions.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
