"""Edge deployment on ExecuTorch: a compressed model (module, ``.pt2`` artifact, checkpoint or MoE) to a ``.pte``.

:func:`export_executorch` lowers the network whole to ExecuTorch's XNNPACK backend (fp32, or int8 from the
``xnnpack`` QAT backend or post-training calibration) and writes the program with a JSON side-car;
:func:`load_executorch` runs it in the ExecuTorch runtime and returns logits as ``torch.Tensor``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from lightning_hybridcomp._executorch import xnnpack_quantizer
from lightning_hybridcomp._graph_passes import check_deterministic
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._validation import expect_bool
from lightning_hybridcomp.artifacts import SUFFIX as ARTIFACT_SUFFIX
from lightning_hybridcomp.artifacts import default_example, load_artifact
from lightning_hybridcomp.callbacks.contracts import StructuralCompression
from lightning_hybridcomp.callbacks.quantization import QuantizationAwareTraining
from lightning_hybridcomp.edge_programs import (
    DEFAULT_MAX_BATCH,
    FORMAT_VERSION,
    EdgeMetadata,
    ExecuTorchProgram,
    UndelegatedOperatorsError,
    check_max_batch,
    check_suffix,
    edge_example,
    lower_to_xnnpack,
    read_program,
    set_edge_threads,
    steps_quantizer,
    write_program,
)
from lightning_hybridcomp.moe.checkpoint import CHECKPOINT_KEY
from lightning_hybridcomp.moe.edge import EdgeMoE, export_moe_program
from lightning_hybridcomp.moe.experts import load_classifier_checkpoint
from lightning_hybridcomp.moe.module import MoELightningModule, load_moe
from lightning_hybridcomp.profiling import count_macs
from lightning_hybridcomp.programs import (
    cpu_copy,
    export_for_artifact,
    make_exported_train_eval_,
    program_params_and_dtype,
    strip_unused_attributes_,
)

__all__ = [
    "EdgeMetadata",
    "EdgeMoE",
    "ExecuTorchProgram",
    "UndelegatedOperatorsError",
    "export_executorch",
    "load_executorch",
    "set_edge_threads",
    "xnnpack_ptq",
]

Source = nn.Module | str | os.PathLike[str]


def export_executorch(
    source: Source,
    path: str | os.PathLike[str],
    *,
    example_inputs: Tensor | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    calibration: Tensor | None = None,
    allow_undelegated: bool = False,
    steps: Sequence[str] | None = None,
    architecture: str | None = None,
) -> EdgeMetadata:
    """Lower a model to an ExecuTorch ``.pte`` program on the XNNPACK backend, with a JSON side-car.

    The network is exported in eval mode with its batch dimension bounded by ``max_batch`` (ExecuTorch plans
    its memory for that many samples), lowered whole to XNNPACK, written to ``path`` atomically, and
    described in ``<path>.json`` (:class:`EdgeMetadata`: input shape, classes, MACs, params, compression
    steps, quantizer, batch bound, hash). A network with operators XNNPACK cannot take is refused, naming
    them, unless ``allow_undelegated=True`` (then it warns and the side-car lists them).

    Int8 programs come from ``QuantizationAwareTraining(backend="xnnpack")`` (the scheme of XNNPACK's int8
    kernels), or from post-training quantization with the same quantizer when ``calibration`` is given.

    Args:
        source: a trained ``nn.Module`` or LightningModule (pruned, QAT-converted or plain), a
            :class:`~lightning_hybridcomp.moe.MoELightningModule` (gate and experts become the methods of one
            program, see :mod:`lightning_hybridcomp.moe.edge`), or the path of a ``.pt2`` artifact, an
            ``ImageClassifier`` checkpoint or a MoE checkpoint (``.ckpt``).
        path: destination, ending in ``.pte``.
        example_inputs: a batch of the inputs the model takes; defaults to the artifact's recorded shape or
            the module's ``example_input_array``.
        max_batch: the largest batch the program runs, at least 1.
        calibration: fp32 inputs for post-training int8 quantization with ExecuTorch's ``XNNPACKQuantizer``
            (a few batches, e.g. 256 training images); ``None`` keeps the model's own precision.
        allow_undelegated: write a program with operators outside the XNNPACK delegate (with a warning).
        steps: compression steps to record; by default the artifact's, or those of the pruning and QAT
            callbacks of the module's Trainer.
        architecture: name to record; the model's class (or the artifact's record) by default.

    Raises:
        ValueError: for a path not ending in ``.pte``, a missing or unreadable source file, ``max_batch``
            below 1, ``calibration`` for an int8 model, a MoE or of another sample shape, a network that cannot be
            exported; :class:`UndelegatedOperatorsError` (a ``ValueError``) for operators XNNPACK cannot lower.
        TypeError: for a source of another type, or no example inputs.
        ImportError: without ExecuTorch installed (the message names the extra).

    Example::

        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     meta = export_executorch(net, f"{tmp}/net.pte", example_inputs=torch.randn(1, 1, 8, 8), max_batch=4)
        ...     program = load_executorch(f"{tmp}/net.pte")
        ...     logits = program(torch.randn(3, 1, 8, 8))
        >>> meta.input_shape, meta.num_classes, meta.max_batch, meta.dtype, logits.shape
        ((1, 8, 8), 10, 4, 'float32', torch.Size([3, 10]))
    """
    check_suffix(path)
    check_max_batch(max_batch)
    expect_bool(allow_undelegated, "allow_undelegated")
    if isinstance(source, (str, os.PathLike)):
        source = _read_source(Path(source))
    if isinstance(source, MoELightningModule):
        if calibration is not None:
            raise ValueError(
                "Expected `calibration` to be None for a MoELightningModule: its experts keep the precision they"
                " were built with. Quantize each expert (QAT with backend='xnnpack', or `xnnpack_ptq`) before"
                " building the MoE."
            )
        return export_moe_program(source, path, max_batch=max_batch, allow_undelegated=allow_undelegated)
    if not isinstance(source, nn.Module):
        raise TypeError(
            "Expected `source` to be an nn.Module, a MoELightningModule, or the path of a '.pt2' artifact or"
            f" a '.ckpt' checkpoint, got {type(source).__name__}."
        )
    recorded: dict[str, Any] = getattr(source, "_hybridcomp_edge_record", {})
    name = architecture or recorded.get("architecture") or type(source).__name__
    if example_inputs is None:
        example_inputs = recorded.get("example") if "example" in recorded else default_example(source)
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() < 1 or example_inputs.shape[0] == 0:
        raise TypeError(
            f"Expected `example_inputs` to be a tensor with a batch dimension, got {type(example_inputs).__name__}."
        )
    history = list(steps) if steps is not None else list(recorded.get("steps", _trainer_steps(source)))
    network: nn.Module = source
    if calibration is not None:
        network = xnnpack_ptq(source, example_inputs, calibration, name)
        history.append("ptq:xnnpack")
    example = edge_example(example_inputs.detach().cpu(), max_batch)
    # On a CPU copy: the caller's model stays where it is.
    program = export_for_artifact(cpu_copy(network), example, max_batch=len(example))
    check_deterministic(program, f"The program of {name}")
    params, dtype = program_params_and_dtype(program)
    macs = count_macs(program, example[:1])
    output = next(n for n in program.graph.nodes if n.op == "output").args[0]
    first = output[0] if isinstance(output, (tuple, list)) else output
    num_classes = int(first.meta["val"].shape[-1]) if isinstance(first, torch.fx.Node) else 0
    data, left = lower_to_xnnpack(
        {"forward": program}, max_batch=max_batch, allow_undelegated=allow_undelegated, where=name
    )
    metadata = EdgeMetadata(
        format_version=FORMAT_VERSION,
        kind="classifier",
        architecture=name,
        methods=("forward",),
        input_shape=tuple(int(s) for s in example.shape[1:]),
        input_dtype=str(example.dtype).removeprefix("torch."),
        num_classes=num_classes,
        max_batch=max_batch,
        dtype=dtype,
        macs=macs,
        params=params,
        steps=tuple(history),
        quantizer=steps_quantizer(history),
        undelegated=left,
    )
    return write_program(path, data, metadata)


def load_executorch(path: str | os.PathLike[str]) -> ExecuTorchProgram:
    """Load a ``.pte`` written by :func:`export_executorch` into the ExecuTorch runtime.

    A classifier program returns an :class:`ExecuTorchProgram` (``program(x)`` gives logits), a MoE program
    an :class:`~lightning_hybridcomp.moe.edge.EdgeMoE` (``moe(x)`` gives log mixture probabilities, routed
    top-k on the host). The file is checked first: its header, its length, and its hash against the
    side-car's.

    Raises:
        ValueError: naming the file, if it is missing, not a ``.pte``, truncated or corrupt, or has no side-car.
        ImportError: without ExecuTorch installed (the message names the extra).

    Example::

        >>> program = load_executorch("model.pte")  # doctest: +SKIP
        >>> program(torch.randn(1, 1, 16, 16)).argmax(dim=-1)  # doctest: +SKIP
    """
    program, metadata = read_program(path)
    if metadata.kind == "moe":
        return EdgeMoE(program, metadata, Path(path))
    return ExecuTorchProgram(program, metadata, Path(path))


# --- private ------------------------------------------------------------------------------------------


def _read_source(path: Path) -> nn.Module:
    """The model a source file holds, with what the file records about it for the side-car."""
    if not path.is_file():
        raise ValueError(f"Expected `source` to be an existing file, but {str(path)!r} does not exist.")
    if path.suffix == ARTIFACT_SUFFIX:
        artifact = load_artifact(path)
        module = make_exported_train_eval_(artifact.program.module()).eval()
        meta = artifact.metadata
        dtype = getattr(torch, str(meta.input_dtype), torch.float32)
        object.__setattr__(
            module,
            "_hybridcomp_edge_record",
            {
                "architecture": meta.architecture,
                "steps": meta.steps,
                "example": torch.zeros(1, *meta.input_shape, dtype=dtype),
            },
        )
        return module
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path, what="`source`")
        if isinstance(checkpoint, dict) and CHECKPOINT_KEY in checkpoint:
            return load_moe(path)
        loaded = load_classifier_checkpoint(path, f"the checkpoint {str(path)!r}")
        assert loaded.module is not None and loaded.input_shape is not None
        object.__setattr__(
            loaded.module, "_hybridcomp_edge_record", {"example": torch.zeros(1, *loaded.input_shape)}
        )
        return loaded.module
    raise ValueError(
        f"Expected `source` to be a '.pt2' artifact or a '.ckpt' checkpoint, got {str(path)!r}. An ExecuTorch"
        " program is exported from the model, not converted from another program format."
    )


def _trainer_steps(model: nn.Module) -> list[str]:
    """Compression steps of the pruning and QAT callbacks of the Trainer ``model`` was fitted with."""
    trainer = model._trainer if isinstance(model, pl.LightningModule) else None
    steps: list[str] = []
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, StructuralCompression):
            steps.append(str(callback.step_label))
        elif isinstance(callback, QuantizationAwareTraining) and callback.stage == "converted":
            steps.append(f"qat:{callback.backend}")
    return steps


def xnnpack_ptq(model: nn.Module, example: Tensor, calibration: Tensor, name: str | None = None) -> nn.Module:
    """``model`` quantized to int8 with ExecuTorch's XNNPACKQuantizer, observers calibrated on ``calibration``.

    Post-training quantization (no training): the int8 PT2E graph an ``export_executorch(...,
    calibration=...)`` lowers. ``example`` is one batch of inputs, ``calibration`` a few batches of samples.

    Raises:
        ValueError: if ``calibration`` has another sample shape, or ``model`` is already quantized.
    """
    name = name or type(model).__name__
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not isinstance(calibration, Tensor) or calibration.shape[1:] != example.shape[1:]:
        raise ValueError(
            f"Expected `calibration` to be a tensor of samples shaped like the inputs, {tuple(example.shape[1:])},"
            f" got {getattr(calibration, 'shape', type(calibration).__name__)}."
        )
    if any(t.dtype == torch.int8 for t in [*model.parameters(), *model.buffers()]) or (
        isinstance(model, GraphModule) and any("quantize" in str(n.target) for n in model.graph.nodes)
    ):
        raise ValueError(
            f"Expected `calibration` only for an fp32 model, but {name} is already quantized; export it without"
            " `calibration`."
        )
    quantizer = xnnpack_quantizer(is_qat=False, feature="export_executorch(..., calibration=...)")
    with torch.no_grad():
        graph = export_for_artifact(cpu_copy(model), example.cpu()).module()
    prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for chunk in calibration.cpu().split(256):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    make_exported_train_eval_(converted)
    strip_unused_attributes_(converted)
    with contextlib.suppress(NotImplementedError):
        converted.eval()
    return converted
