"""Experts of the Mixture of Experts: loading them from every supported format and building their records.

An expert arrives as an ``nn.Module``, an ``ExportedProgram``, a ``*.pt2`` artifact or an ``ImageClassifier``
checkpoint (:func:`load_expert_source`) and leaves as an :class:`Expert`: an exported graph the MoE owns, with
its serialized program, MACs, parameters, size and fingerprint (:func:`build_expert`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from lightning_hybridcomp._graph_passes import check_deterministic
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._lightning import init_arguments, training_mode
from lightning_hybridcomp.artifacts import SUFFIX, load_artifact
from lightning_hybridcomp.profiling import count_macs, count_macs_and_params
from lightning_hybridcomp.programs import (
    export_with_dynamic_batch,
    load_program_bytes,
    make_exported_train_eval_,
    program_params_and_dtype,
    serialize_program,
)

__all__ = [
    "EXPERT_FORMATS",
    "Expert",
    "ExpertSource",
    "build_expert",
    "check_class_counts",
    "frozen_graph",
    "load_classifier_checkpoint",
    "load_expert_source",
    "penultimate_features",
    "resolve_input_shape",
    "stored_program",
]

EXPERT_FORMATS = (
    "an nn.Module, a torch.export.ExportedProgram, or a path to a '.pt2' artifact or a '.ckpt' checkpoint"
)


@dataclass(frozen=True)
class ExpertSource:
    """An expert as given, before export: a module or a program, plus the figures a file or checkpoint recorded.

    Figures left ``None`` are measured when the expert is built. :func:`~lightning_hybridcomp.moe.load_moe`
    passes the programs a MoE checkpoint stored this way, with their recorded names and figures.

    Attributes:
        name: how messages and reports call the expert, e.g. ``"experts[0] ('a.pt2')"``.
        module: the expert as a module (exported when built), or ``None`` when ``program`` is given.
        program: the expert as an exported program, or ``None`` when ``module`` is given.
        input_shape: the input shape without the batch dimension, when the source records one.
        macs: MACs per sample (:func:`lightning_hybridcomp.profiling.count_macs` when ``None``).
        params: stored weight elements (counted from the program when ``None``).
        size_bytes: bytes of the expert (its serialized program when ``None``).
        quantized: whether the expert is int8 (also detected from its graph).
    """

    name: str
    module: nn.Module | None = None
    program: ExportedProgram | None = None
    input_shape: tuple[int, ...] | None = None
    macs: int | None = None
    params: int | None = None
    size_bytes: int | None = None
    quantized: bool = False


@dataclass(frozen=True)
class Expert:
    """One expert after building: the exported graph the MoE runs, and what the MoE knows about it.

    Attributes:
        name: as in :class:`ExpertSource`.
        module: the exported graph (eval semantics in both modes), registered in ``MoELightningModule.experts``.
        data: the serialized program, as checkpoints store it.
        macs: MACs per sample.
        params: stored weight elements.
        size_bytes: bytes of the expert.
        quantized: whether the expert is int8 (it then stays frozen).
        fingerprint: hash of the program's weights, to tell a resumed run it got the same expert.
        num_classes: width of the expert's logits.
        compiled: the graph compiled for inference, once ``MoELightningModule.compile_experts_`` made it.
    """

    name: str
    module: nn.Module
    data: bytes
    macs: int
    params: int
    size_bytes: int
    quantized: bool
    fingerprint: str
    num_classes: int
    compiled: nn.Module | None = None

    def load_module(self) -> nn.Module:
        """A fresh, independent copy of the expert's graph, deserialized from :attr:`data`."""
        return frozen_graph(stored_program(self.data, self.name))


def stored_program(data: bytes, name: str) -> ExportedProgram:
    """Deserialize a program the MoE stored, refusing pickles: checkpoints are read with ``weights_only=True``."""
    return load_program_bytes(data, f"the stored program of {name}")


def frozen_graph(program: ExportedProgram) -> nn.Module:
    """The program as a module that Lightning may switch to train mode; its graph keeps eval semantics."""
    return make_exported_train_eval_(program.module(), keep_eval_semantics=True)


def load_expert_source(spec: Any, index: int) -> ExpertSource:
    """Read ``experts[index]`` of the MoE constructor into an :class:`ExpertSource`.

    Raises:
        ValueError: for a missing file, an unsupported suffix, or a file that is not an artifact or an
            ``ImageClassifier`` checkpoint (named).
        TypeError: for a spec of an unsupported type.
    """
    if isinstance(spec, ExpertSource):
        return spec
    if isinstance(spec, ExportedProgram):
        return ExpertSource(name=f"experts[{index}] (ExportedProgram)", program=spec)
    if isinstance(spec, nn.Module):
        return ExpertSource(name=f"experts[{index}] ({type(spec).__name__})", module=spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        name = f"experts[{index}] ({str(spec)!r})"
        if not path.is_file():
            raise ValueError(f"Expected {name} to be an existing file, but {str(path)!r} does not exist.")
        if path.suffix == SUFFIX:
            return _load_pt2(path, name)
        if path.suffix == ".ckpt":
            return load_classifier_checkpoint(path, name)
        raise ValueError(
            f"Expected {name} to be a supported expert format, got a {path.suffix or 'suffix-less'!r} file."
            f" Valid options: {EXPERT_FORMATS}."
        )
    raise TypeError(f"Expected experts[{index}] to be {EXPERT_FORMATS}, got {type(spec).__name__}.")


def _load_pt2(path: Path, name: str) -> ExpertSource:
    try:
        artifact = load_artifact(path)
    except ValueError as err:
        raise ValueError(f"Could not load {name} as a compressed-model artifact: {err}") from err
    meta = artifact.metadata
    return ExpertSource(
        name=name,
        program=artifact.program,
        input_shape=tuple(int(s) for s in meta.input_shape),
        macs=int(meta.macs),
        params=int(meta.params),
        size_bytes=int(meta.size_bytes),
        quantized=str(meta.dtype).lower() == "int8",
    )


def load_classifier_checkpoint(path: Path, name: str) -> ExpertSource:
    """Rebuild an ``ImageClassifier`` from a Lightning checkpoint (hyper-parameters + weights)."""
    checkpoint = read_checkpoint(path, what=name)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"Expected {name} to be a Lightning checkpoint with a 'state_dict', got another file."
        )
    hparams = init_arguments(checkpoint.get("hyper_parameters"))
    if not isinstance(hparams.get("backbone"), str):
        raise ValueError(
            f"Expected {name} to be a checkpoint of `lightning_hybridcomp.models.ImageClassifier` built from a"
            " backbone name (its hyper-parameters rebuild the network), but it has no `backbone` name. Load the"
            " model yourself and pass the module, or save it as a '.pt2' artifact."
        )
    from lightning_hybridcomp.callbacks.pruned_checkpoints import (
        find_pruning_state,
        pruned_model_from_checkpoint,
    )
    from lightning_hybridcomp.models import ImageClassifier

    pruned = find_pruning_state(checkpoint) is not None
    try:
        if pruned:  # the pruned structure is replayed from the records the callback stored
            model = pruned_model_from_checkpoint(checkpoint, ImageClassifier, source=str(path))
        else:
            model = ImageClassifier(**hparams)
            model.load_state_dict(checkpoint["state_dict"])
    except Exception as err:
        raise ValueError(
            f"Could not rebuild {name} as {'a pruned ' if pruned else 'an '}ImageClassifier from its"
            f" hyper-parameters and weights: {type(err).__name__}: {err}"
        ) from err
    shape = (
        int(hparams.get("in_channels", 1)),
        int(hparams.get("image_size", 16)),
        int(hparams.get("image_size", 16)),
    )
    return ExpertSource(name=name, module=model.eval(), input_shape=shape)


def resolve_input_shape(
    sources: Sequence[ExpertSource], input_shape: Sequence[int] | None
) -> tuple[int, ...]:
    """The input shape every expert takes: ``input_shape`` when given, else the one the sources record.

    Raises:
        ValueError: naming the expert whose recorded shape disagrees, or when no shape is known.
    """
    if input_shape is not None:
        given = tuple(int(s) for s in input_shape)
        for source in sources:
            if source.input_shape is not None and source.input_shape != given:
                raise ValueError(
                    f"Expected every expert to take inputs of shape `input_shape`={list(given)}, but {source.name}"
                    f" records an input shape of {list(source.input_shape)}."
                )
        return given
    known = [s for s in sources if s.input_shape is not None]
    if not known:
        raise ValueError(
            "Expected `input_shape` (without the batch dimension, e.g. [1, 16, 16]) when no expert file"
            " records one; module and ExportedProgram experts need it."
        )
    shape = known[0].input_shape or ()
    for source in known[1:]:
        if source.input_shape != shape:
            raise ValueError(
                f"Expected all experts to take the same input shape, but {known[0].name} takes {list(shape)}"
                f" and {source.name} takes {list(source.input_shape or ())}."
            )
    return shape


def build_expert(source: ExpertSource, shape: tuple[int, ...]) -> Expert:
    """Export, probe, measure and serialize one expert; the MoE owns the copy this returns.

    Raises:
        ValueError: naming the expert when it cannot be exported, is not deterministic, rejects inputs of
            ``shape`` or does not return ``[batch, num_classes]`` logits.
    """
    example = torch.randn(2, *shape)
    if source.module is not None:
        # Eval mode throughout: a probe in train mode would update the user's BatchNorm statistics.
        with training_mode(source.module, False):
            _probe(source.module, example, source.name)
            macs, params = count_macs_and_params(source.module, example[:1])
            program = export_with_dynamic_batch(source.module, example, name=source.name)
    else:
        assert source.program is not None  # for mypy: one of the two is always set
        program = source.program
        macs = source.macs if source.macs is not None else -1
        params = source.params if source.params is not None else -1
    check_deterministic(program, f"The program of expert {source.name}")
    # A round trip through bytes gives the MoE its own copy and proves the checkpoint can hold it.
    data = serialize_program(program)
    loaded = stored_program(data, source.name)
    module = frozen_graph(loaded)
    num_classes = int(_probe(module, example, source.name).shape[1])
    _probe(module, example[:1], source.name)  # a batch of one must work too (dynamic batch dimension)
    if macs < 0:
        macs = count_macs(module, example[:1])
    if params < 0:
        # Stored weight elements of the program: int8 weights are constants, not parameters.
        params = program_params_and_dtype(loaded)[0]
    return Expert(
        name=source.name,
        module=module,
        data=data,
        macs=int(macs),
        params=int(params),
        size_bytes=int(source.size_bytes if source.size_bytes is not None else len(data)),
        quantized=source.quantized or _is_quantized_graph(module),
        fingerprint=_fingerprint(loaded),
        num_classes=num_classes,
    )


def check_class_counts(experts: Sequence[Expert]) -> int:
    """The number of classes all experts share.

    Raises:
        ValueError: listing every expert's class count and naming the first that differs.
    """
    counts = [e.num_classes for e in experts]
    if len(set(counts)) > 1:
        odd = next(e for e in experts if e.num_classes != counts[0])
        listing = ", ".join(f"{e.name}: {e.num_classes}" for e in experts)
        raise ValueError(
            f"Expected all experts to output the same number of classes, got {listing}."
            f" {odd.name} differs from {experts[0].name}."
        )
    return counts[0]


def penultimate_features(module: nn.Module, name: str) -> nn.Module:
    """Cut an exported classifier graph at the input of its last linear layer (its penultimate features), in place.

    Raises:
        ValueError: naming the expert when its graph does not end in a linear head.
    """
    graph = getattr(module, "graph", None)
    aten = torch.ops.aten
    linear_targets = {aten.linear.default: 0, aten.mm.default: 0, aten.addmm.default: 1}
    nodes = (
        []
        if graph is None
        else [n for n in graph.nodes if n.op == "call_function" and n.target in linear_targets]
    )
    output = None if graph is None else next(n for n in graph.nodes if n.op == "output")
    if (
        not nodes
        or output is None
        or not (isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1)
    ):
        raise ValueError(
            f"Expected {name} to end in a linear classifier head (an aten linear/mm/addmm node feeding a single"
            " output) for `gate='expert:<index>'`, but none was found. Use gate='cnn' or pass a gate module."
        )
    assert graph is not None  # for mypy: checked above
    last = nodes[-1]
    output.args = ((last.args[linear_targets[last.target]],),)
    graph.eliminate_dead_code()
    module.recompile()  # type: ignore[operator]
    module.delete_all_unused_submodules()  # type: ignore[operator]
    return module


def _probe(module: nn.Module, example: Tensor, name: str) -> Tensor:
    try:
        with torch.no_grad():
            out = module(example)
    except Exception as err:
        raise ValueError(
            f"{name} does not accept inputs of shape {tuple(example.shape)} (batch + `input_shape`):"
            f" {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != example.shape[0]:
        raise ValueError(
            f"Expected {name} to return logits of shape [batch, num_classes], got"
            f" {type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}."
        )
    return out


def _is_quantized_graph(module: nn.Module) -> bool:
    graph = getattr(module, "graph", None)
    if graph is None:
        return False
    return any(node.op == "call_function" and "quantize" in str(node.target) for node in graph.nodes)


def _fingerprint(program: ExportedProgram) -> str:
    """Hash of an exported program's weights (parameters, buffers, constants), in name order."""
    digest = hashlib.sha256()
    tensors = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, Tensor)}}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
