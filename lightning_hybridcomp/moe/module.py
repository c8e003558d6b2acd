"""``MoELightningModule``: a learned top-k gate routing each image to a few whole-classifier experts.

Experts (modules, compressed ``*.pt2`` artifacts, ``*.ckpt`` checkpoints) become exported programs at
construction, so a trained MoE checkpoint reloads with :func:`load_moe` without their classes or files.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.export import ExportedProgram
from typing_extensions import override

from lightning_hybridcomp._graph_passes import check_deterministic
from lightning_hybridcomp._io import read_checkpoint
from lightning_hybridcomp._lightning import init_arguments, inputs_from_batch, training_mode
from lightning_hybridcomp.artifacts import compile_artifact, load_artifact
from lightning_hybridcomp.moe.gate import (
    GateNetwork,
    TopKGating,
    dense_gates,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    routing_mask,
    top_k_gate,
)
from lightning_hybridcomp.profiling import count_macs, count_macs_and_params, serialized_size
from lightning_hybridcomp.programs import (
    export_with_dynamic_batch,
    load_program_bytes,
    make_exported_train_eval_,
    program_params_and_dtype,
    serialize_program,
)

__all__ = ["DispatchResult", "MoELightningModule", "load_moe"]

_CHECKPOINT_KEY = "moe"
_FORMAT_VERSION = 1
_SUPPORTED_FORMATS = (
    "an nn.Module, a torch.export.ExportedProgram, or a path to a '.pt2' artifact or a '.ckpt' checkpoint"
)
_GATE_OPTIONS = (
    "'cnn' (tiny CNN on the input), 'expert:<index>' (penultimate features of that expert) or an nn.Module"
)
_LOG_EPS = 1e-12


class DispatchResult(NamedTuple):
    """What the sparse dispatch computed for one batch.

    Attributes:
        probs: ``[B, C]`` mixed class probabilities (``sum_j w_j * softmax(expert_j(x))`` over kept slots).
        keep: ``[B, k]`` bool, ``False`` where a capacity limit dropped the assignment.
        counts: ``[N]`` int64, samples each expert actually ran on.
    """

    probs: Tensor
    keep: Tensor
    counts: Tensor


@dataclass
class _Expert:
    """One expert after loading: an exported graph plus what the MoE needs to know about it."""

    name: str
    module: nn.Module
    data: bytes
    macs: int
    params: int
    size_bytes: int
    quantized: bool
    fingerprint: str
    num_classes: int


@dataclass
class _RawExpert:
    """An expert as given, before export: a module or a program, plus metadata when a file carried it."""

    name: str
    module: nn.Module | None = None
    program: ExportedProgram | None = None
    input_shape: tuple[int, ...] | None = None
    macs: int | None = None
    params: int | None = None
    size_bytes: int | None = None
    quantized: bool = False


def _stored_program(data: bytes, name: str) -> ExportedProgram:
    """Deserialize a program the MoE stored, refusing pickles: checkpoints are read with ``weights_only=True``."""
    return load_program_bytes(data, f"the stored program of {name}")


def _frozen_graph(program: ExportedProgram) -> nn.Module:
    """The program as a module that Lightning may switch to train mode; its graph keeps eval semantics."""
    return make_exported_train_eval_(program.module(), keep_eval_semantics=True)


def _bytes_to_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _tensor_to_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


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


def _load_pt2(path: Path, name: str) -> _RawExpert:
    try:
        artifact = load_artifact(path)
    except ValueError as err:
        raise ValueError(f"Could not load {name} as a compressed-model artifact: {err}") from err
    meta = artifact.metadata
    return _RawExpert(
        name=name,
        program=artifact.program,
        input_shape=tuple(int(s) for s in meta.input_shape),
        macs=int(meta.macs),
        params=int(meta.params),
        size_bytes=int(meta.size_bytes),
        quantized=str(meta.dtype).lower() == "int8",
    )


def _load_classifier_checkpoint(path: Path, name: str) -> _RawExpert:
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
    return _RawExpert(name=name, module=model.eval(), input_shape=shape)


def _load_raw_expert(spec: Any, index: int) -> _RawExpert:
    if isinstance(spec, ExportedProgram):
        return _RawExpert(name=f"experts[{index}] (ExportedProgram)", program=spec)
    if isinstance(spec, nn.Module):
        return _RawExpert(name=f"experts[{index}] ({type(spec).__name__})", module=spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        name = f"experts[{index}] ({str(spec)!r})"
        if not path.is_file():
            raise ValueError(f"Expected {name} to be an existing file, but {str(path)!r} does not exist.")
        if path.suffix == ".pt2":
            return _load_pt2(path, name)
        if path.suffix == ".ckpt":
            return _load_classifier_checkpoint(path, name)
        raise ValueError(
            f"Expected {name} to be a supported expert format, got a {path.suffix or 'suffix-less'!r} file."
            f" Valid options: {_SUPPORTED_FORMATS}."
        )
    raise TypeError(f"Expected experts[{index}] to be {_SUPPORTED_FORMATS}, got {type(spec).__name__}.")


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


def _penultimate_features(module: nn.Module, name: str) -> nn.Module:
    """Cut an exported classifier graph at the input of its last linear layer (its penultimate features)."""
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


class _ExpertFeatureGate(nn.Module):
    """Router on the frozen penultimate features of one expert, with Shazeer's two linear heads."""

    def __init__(self, features: nn.Module, feature_dim: int, num_experts: int) -> None:
        super().__init__()
        self.features = features
        self.features.requires_grad_(False)
        self.w_gate = nn.Linear(feature_dim, num_experts)
        self.w_noise = nn.Linear(feature_dim, num_experts)
        for head in (self.w_gate, self.w_noise):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            features = torch.flatten(self.features(x), 1).float()
        noise_std = F.softplus(self.w_noise(features)) if self.training else None
        return self.w_gate(features), noise_std


class _ModuleGate(nn.Module):
    """A user router: ``module(x)`` returns ``[B, N]`` logits, or ``(logits, noise_logits)``.

    Without noise logits from the module, the noise scale is ``softplus`` of one learned value per expert.
    """

    def __init__(self, module: nn.Module, num_experts: int) -> None:
        super().__init__()
        self.module = module
        self.noise_logits = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            logits, noise_logits = out[0], out[1]
        else:
            logits, noise_logits = out, self.noise_logits.expand_as(out)
        return logits, (F.softplus(noise_logits) if self.training else None)


def _check_non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"Expected `{name}` to be a non-negative finite float, got {value!r}.")
    return float(value)


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"Expected `{name}` to be an integer {bound}, got {value!r}.")
    return value


class MoELightningModule(pl.LightningModule):
    r"""Mixture of Experts over whole classifiers: a small gate picks the top-k experts for each image.

    Only the chosen experts run on an image (each expert runs once per batch, on exactly the samples
    routed to it), and their class probabilities are mixed by the gate weights. Training fits the gate
    (and, with ``freeze_experts=False``, the fp32 experts) on the negative log-likelihood of the mixture
    plus the auxiliary losses of :mod:`lightning_hybridcomp.moe.gate`, each logged on its own
    (``moe/loss/task``, ``moe/loss/balance``, ``moe/loss/importance``, ``moe/loss/z``).

    ``forward(x)`` returns the **log** of the mixed probabilities ``[B, num_classes]``: ``argmax`` is the
    prediction and ``exp`` the mixture. With ``top_k == 1`` the weight is the router's raw probability
    (Switch), so the mixture sums to that probability rather than one.

    How experts live inside the MoE: every expert is turned into a ``torch.export`` program with a dynamic
    batch dimension when the MoE is built (artifacts already are one), serialized, and reloaded from those
    bytes, so the MoE owns an independent copy. The graphs always run with eval semantics (BatchNorm on
    running statistics, no dropout), also while the gate trains and when a trainable expert is fine-tuned.
    Checkpoints carry the serialized programs as ``uint8`` tensors next to the ``state_dict`` (so the expert
    weights are stored twice: as built, in the programs, and current, in the ``state_dict``), which lets
    :func:`load_moe` rebuild the MoE with ``torch.load(weights_only=True)`` and neither the expert files
    nor their classes. Resuming ``fit`` needs the MoE built from the same experts; a different expert is
    an error naming it.

    Validation logs (reduced over all ranks, so every rank sees the same figures):

    * ``moe/expected_macs``: gate MACs + :math:`\sum_i (n_i / n) \cdot \mathrm{MACs}_i`, with :math:`n_i`
      the samples expert :math:`i` ran on and :math:`n` the samples seen;
    * ``moe/expert_load/{i}``: share of routing assignments given to expert :math:`i` (sums to 1);
    * ``moe/routing_entropy``: entropy of those loads divided by :math:`\log N` (1 = balanced, 0 = one expert);
    * ``moe/gate_entropy``: mean entropy (nats) of the router's per-sample probabilities;
    * ``moe/dead_expert_share``: share of experts that received no sample;
    * ``moe/dropped_fraction``: share of assignments a capacity limit dropped;
    * ``moe/samples``: samples the figures cover (all ranks together);
    * ``val/acc`` and ``val/loss``. The test stage logs the same under ``moe/test/...`` and ``test/...``.

    Args:
        experts: at least two classifiers that map ``[B, *input_shape]`` images to ``[B, num_classes]``
            logits: ``nn.Module`` instances, ``torch.export.ExportedProgram``\ s, paths to compressed
            ``*.pt2`` artifacts (``lightning_hybridcomp.artifacts``) or ``*.ckpt`` checkpoints of
            ``lightning_hybridcomp.models.ImageClassifier`` (pruned ones are rebuilt with
            ``load_pruned_model``).
        top_k: experts per image during training, from 1 to the number of experts.
        input_shape: image shape without the batch dimension, e.g. ``[1, 16, 16]``. Taken from the first
            artifact or checkpoint that records it when ``None``; required for module experts.
        gate: ``"cnn"`` (a tiny CNN on the input), ``"expert:<index>"`` (linear heads on the frozen
            penultimate features of that expert: its graph is cut at the input of its last linear layer; the
            gate then costs about that expert's MACs, and the cut is not shared with the expert's own run)
            or an ``nn.Module`` returning ``[B, N]`` logits (or ``(logits, noise_logits)``).
        gate_channels: filters of the first convolution of the ``"cnn"`` gate.
        gate_input_size: downsample the input of the ``"cnn"`` gate to this side first, or ``None``.
        freeze_experts: keep every expert frozen (default); ``False`` fine-tunes the fp32 ones (int8
            experts always stay frozen). Under DDP, fine-tuning needs ``find_unused_parameters=True``,
            because an expert that gets no sample of a batch has no gradient.
        balance_coefficient: :math:`\alpha` of the Switch load-balancing loss.
        importance_coefficient: weight of the CV\ :sup:`2` importance loss (0 turns it off).
        z_loss_coefficient: weight of the router z-loss.
        noisy_gating: add Shazeer's learned Gaussian noise to the router logits in training.
        capacity_factor: ``None`` (default) for no limit, else each expert takes at most
            ``ceil(capacity_factor * B * k / N)`` samples of a batch, keeping the highest gate weights;
            a dropped assignment contributes nothing (a sample with every choice dropped gets an all-zero
            mixture). Counted and logged; it makes outputs depend on the batch composition, so it is
            applied in training only unless ``capacity_in_eval=True``.
        capacity_in_eval: apply ``capacity_factor`` in validation, test and predict as well.
        eval_top_k: experts per image outside training (``None``: ``top_k``). The task loss tells the gate
            which expert is better only when ``k > 1`` (at ``k = 1`` the single weight has no competitor),
            so training at ``top_k=2`` and routing at ``eval_top_k=1`` is the way to a cheap top-1 router.
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.

    Raises:
        ValueError: for fewer than two experts; ``top_k``/``eval_top_k`` outside ``[1, N]``; experts with
            different class counts or that reject ``input_shape`` (named); a negative coefficient; a
            missing expert file or an unsupported format; an unknown gate; invalid sizes or factors.
        TypeError: for an expert of an unsupported type.

    Example::

        >>> experts = [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)) for _ in range(3)]
        >>> moe = MoELightningModule(experts, top_k=2, input_shape=[1, 8, 8]).eval()
        >>> log_probs = moe(torch.randn(4, 1, 8, 8))
        >>> log_probs.shape, torch.allclose(log_probs.exp().sum(dim=-1), torch.ones(4))
        (torch.Size([4, 10]), True)
    """

    def __init__(
        self,
        experts: Sequence[str | os.PathLike[str] | nn.Module | ExportedProgram],
        top_k: int = 2,
        input_shape: list[int] | None = None,
        gate: str | nn.Module = "cnn",
        gate_channels: int = 8,
        gate_input_size: int | None = None,
        freeze_experts: bool = True,
        balance_coefficient: float = 1e-2,
        importance_coefficient: float = 0.0,
        z_loss_coefficient: float = 1e-3,
        noisy_gating: bool = True,
        capacity_factor: float | None = None,
        capacity_in_eval: bool = False,
        eval_top_k: int | None = None,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(experts, (str, os.PathLike, nn.Module)) or not isinstance(experts, Sequence):
            raise TypeError(
                f"Expected `experts` to be a list of experts ({_SUPPORTED_FORMATS}), got {type(experts).__name__}."
            )
        if len(experts) < 2:
            raise ValueError(
                f"Expected `experts` to hold at least two experts, got {len(experts)}. A single model needs no gate."
            )
        num_experts = len(experts)
        _check_int(top_k, "top_k", 1, num_experts)
        if eval_top_k is not None:
            _check_int(eval_top_k, "eval_top_k", 1, num_experts)
        for name, value in (
            ("balance_coefficient", balance_coefficient),
            ("importance_coefficient", importance_coefficient),
            ("z_loss_coefficient", z_loss_coefficient),
            ("weight_decay", weight_decay),
        ):
            _check_non_negative(value, name)
        if not (
            isinstance(learning_rate, (int, float))
            and not isinstance(learning_rate, bool)
            and learning_rate > 0
        ):
            raise ValueError(f"Expected `learning_rate` to be a positive float, got {learning_rate!r}.")
        if capacity_factor is not None and (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float))
            or not capacity_factor > 0
        ):
            raise ValueError(
                f"Expected `capacity_factor` to be a positive float or None (no limit), got {capacity_factor!r}."
            )
        _check_int(gate_channels, "gate_channels", 1)
        if gate_input_size is not None:
            _check_int(gate_input_size, "gate_input_size", 1)
        gate_expert = self._parse_gate(gate, num_experts)
        if input_shape is not None and (
            not isinstance(input_shape, Sequence)
            or not input_shape
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)
        ):
            raise ValueError(
                f"Expected `input_shape` to be a list of positive integers without the batch dimension, e.g."
                f" [1, 16, 16], got {input_shape!r}."
            )

        self.save_hyperparameters(ignore=["experts", "gate"])
        self.top_k = top_k
        self._eval_top_k = eval_top_k
        self.noisy_gating = bool(noisy_gating)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.capacity_in_eval = bool(capacity_in_eval)
        self.balance_coefficient = float(balance_coefficient)
        self.importance_coefficient = float(importance_coefficient)
        self.z_loss_coefficient = float(z_loss_coefficient)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.hparams["gate"] = "module" if isinstance(gate, nn.Module) else gate

        raw = [_load_raw_expert(spec, i) for i, spec in enumerate(experts)]
        shape = self._resolve_input_shape(raw, input_shape)
        if gate == "cnn" and len(shape) != 3:
            raise ValueError(
                f"Expected `input_shape` to be [channels, height, width] for gate='cnn', got {list(shape)}."
                f" Valid gate options: {_GATE_OPTIONS}."
            )
        self.hparams["input_shape"] = list(shape)
        self.example_input_array = torch.zeros(1, *shape)
        records = [self._build_expert(r, shape) for r in raw]
        self.num_classes = self._check_class_counts(records)

        trainable_any = False
        for record in records:
            trainable = not freeze_experts and not record.quantized
            record.module.requires_grad_(trainable)
            trainable_any |= trainable
        if not freeze_experts and any(r.quantized for r in records):
            rank_zero_info(
                "MoELightningModule: int8 experts stay frozen with `freeze_experts=False`: "
                + ", ".join(r.name for r in records if r.quantized)
            )
        self.experts = nn.ModuleList([r.module for r in records])
        self._expert_names = [r.name for r in records]
        self._expert_data = [r.data for r in records]
        self._expert_macs = [r.macs for r in records]
        self._expert_params = [r.params for r in records]
        self._expert_sizes = [r.size_bytes for r in records]
        self._expert_quantized = [r.quantized for r in records]
        self._expert_fingerprints = [r.fingerprint for r in records]

        example = torch.randn(2, *shape)
        self._gate_data: bytes | None = None
        self.gate: nn.Module
        if isinstance(gate, nn.Module):
            self._check_gate_output(gate, example, num_experts)
            self.gate = _ModuleGate(gate, num_experts)
            self._gate_macs = self._count_gate_macs(gate, example[:1])
            self._gate_data = self._try_export_gate(gate, example)
        elif gate_expert is not None:
            features_module = _frozen_graph(
                _stored_program(self._expert_data[gate_expert], self._expert_names[gate_expert])
            )
            features = _penultimate_features(features_module, self._expert_names[gate_expert])
            with torch.no_grad():
                feature_dim = torch.flatten(features(example), 1).shape[1]
            self.gate = _ExpertFeatureGate(features, feature_dim, num_experts)
            # The cut graph costs at most the whole expert; the head adds one linear layer.
            self._gate_macs = self._expert_macs[gate_expert] + feature_dim * num_experts + num_experts
        else:
            self.gate = GateNetwork(shape[0], num_experts, channels=gate_channels, input_size=gate_input_size)
            self._gate_macs = self._count_gate_macs(self.gate, example[:1])
        self._stats: dict[str, Tensor] = {}
        self._compiled_experts: list[nn.Module] | None = None
        self.routing_stats: dict[str, float] = {}
        if not freeze_experts and not trainable_any:
            rank_zero_warn(
                "MoELightningModule: `freeze_experts=False` but no expert is trainable (all are int8)."
            )

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _parse_gate(gate: Any, num_experts: int) -> int | None:
        if isinstance(gate, nn.Module):
            return None
        if not isinstance(gate, str):
            raise TypeError(f"Expected `gate` to be one of {_GATE_OPTIONS}, got {type(gate).__name__}.")
        if gate == "cnn":
            return None
        prefix, _, index = gate.partition(":")
        if prefix == "expert" and index.isdigit() and int(index) < num_experts:
            return int(index)
        hint = (
            f" The expert index must be below the number of experts ({num_experts})."
            if prefix == "expert" and index.isdigit()
            else ""
        )
        raise ValueError(f"Expected `gate` to be one of {_GATE_OPTIONS}, got {gate!r}.{hint}")

    @staticmethod
    def _resolve_input_shape(raw: list[_RawExpert], input_shape: Sequence[int] | None) -> tuple[int, ...]:
        if input_shape is not None:
            given = tuple(int(s) for s in input_shape)
            for r in raw:
                if r.input_shape is not None and r.input_shape != given:
                    raise ValueError(
                        f"Expected every expert to take inputs of shape `input_shape`={list(given)}, but {r.name}"
                        f" records an input shape of {list(r.input_shape)}."
                    )
            return given
        known = [r for r in raw if r.input_shape is not None]
        if not known:
            raise ValueError(
                "Expected `input_shape` (without the batch dimension, e.g. [1, 16, 16]) when no expert file"
                " records one; module and ExportedProgram experts need it."
            )
        shape = known[0].input_shape or ()
        for r in known[1:]:
            if r.input_shape != shape:
                raise ValueError(
                    f"Expected all experts to take the same input shape, but {known[0].name} takes {list(shape)}"
                    f" and {r.name} takes {list(r.input_shape or ())}."
                )
        return shape

    def _build_expert(self, raw: _RawExpert, shape: tuple[int, ...]) -> _Expert:
        example = torch.randn(2, *shape)
        if raw.module is not None:
            # Eval mode throughout: a probe in train mode would update the user's BatchNorm statistics.
            with training_mode(raw.module, False):
                _probe(raw.module, example, raw.name)
                macs, params = count_macs_and_params(raw.module, example[:1])
                program = export_with_dynamic_batch(raw.module, example, name=raw.name)
        else:
            assert raw.program is not None  # for mypy: one of the two is always set
            program = raw.program
            macs = raw.macs if raw.macs is not None else -1
            params = raw.params if raw.params is not None else -1
        check_deterministic(program, f"The program of expert {raw.name}")
        # A round trip through bytes gives the MoE its own copy and proves the checkpoint can hold it.
        data = serialize_program(program)
        loaded = _stored_program(data, raw.name)
        module = _frozen_graph(loaded)
        num_classes = int(_probe(module, example, raw.name).shape[1])
        _probe(module, example[:1], raw.name)  # a batch of one must work too (dynamic batch dimension)
        if macs < 0:
            macs = count_macs(module, example[:1])
        if params < 0:
            # Stored weight elements of the program: int8 weights are constants, not parameters.
            params = program_params_and_dtype(loaded)[0]
        return _Expert(
            name=raw.name,
            module=module,
            data=data,
            macs=int(macs),
            params=int(params),
            size_bytes=int(raw.size_bytes if raw.size_bytes is not None else len(data)),
            quantized=raw.quantized or _is_quantized_graph(module),
            fingerprint=_fingerprint(loaded),
            num_classes=num_classes,
        )

    @staticmethod
    def _check_class_counts(records: list[_Expert]) -> int:
        counts = [r.num_classes for r in records]
        if len(set(counts)) > 1:
            odd = next(r for r in records if r.num_classes != counts[0])
            listing = ", ".join(f"{r.name}: {r.num_classes}" for r in records)
            raise ValueError(
                f"Expected all experts to output the same number of classes, got {listing}."
                f" {odd.name} differs from {records[0].name}."
            )
        return counts[0]

    @staticmethod
    def _check_gate_output(gate: nn.Module, example: Tensor, num_experts: int) -> None:
        try:
            with training_mode(gate, False), torch.no_grad():
                out = gate(example)
        except Exception as err:
            raise ValueError(
                f"The gate module does not accept inputs of shape {tuple(example.shape)}: {type(err).__name__}: {err}"
            ) from err
        outputs = list(out[:2]) if isinstance(out, (tuple, list)) else [out]
        expected = (example.shape[0], num_experts)
        if any(not isinstance(o, Tensor) or tuple(o.shape) != expected for o in outputs):
            shapes = [tuple(getattr(o, "shape", ())) for o in outputs]
            raise ValueError(
                f"Expected the gate module to return logits of shape [batch, {num_experts}] (one per expert), or a"
                f" (logits, noise_logits) pair of that shape, got {shapes}."
            )

    @staticmethod
    def _count_gate_macs(gate: nn.Module, example: Tensor) -> int:
        if hasattr(gate, "graph"):  # an exported gate, as load_moe rebuilds it
            return count_macs(gate, example)
        with training_mode(gate, False):
            return count_macs_and_params(gate, example)[0]

    @staticmethod
    def _try_export_gate(gate: nn.Module, example: Tensor) -> bytes | None:
        if hasattr(gate, "graph"):
            return None
        try:
            with training_mode(gate, False):
                program = export_with_dynamic_batch(gate, example, name="the gate module")
            return serialize_program(program)
        except Exception as err:
            rank_zero_warn(
                f"MoELightningModule: the gate module could not be exported ({err}); checkpoints will not hold"
                " it, so `load_moe` will need the gate passed as `gate=`."
            )
            return None

    # ------------------------------------------------------------------ properties

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_names(self) -> list[str]:
        """How each expert was given (index and path or class), for messages and reports."""
        return list(self._expert_names)

    @property
    def expert_macs(self) -> list[int]:
        """MACs per sample of each expert (artifact metadata, torch-pruning's counter, or aten FLOPs / 2)."""
        return list(self._expert_macs)

    @property
    def expert_sizes(self) -> list[int]:
        """Bytes of each expert: the artifact's size when it records one, else its serialized program."""
        return list(self._expert_sizes)

    def total_params(self) -> int:
        """Parameter elements of all experts plus the gate's own (a feature gate's cut expert not twice)."""
        return sum(self._expert_params) + sum(p.numel() for p in self._gate_own_parameters())

    def total_bytes(self) -> int:
        """Bytes of all experts (:attr:`expert_sizes`) plus the serialized gate's own weights."""
        own = {n: t for n, t in self.gate.state_dict().items() if not self._is_cut_expert(n)}
        return sum(self._expert_sizes) + serialized_size(own)

    def _gate_own_parameters(self) -> list[Tensor]:
        return [p for n, p in self.gate.named_parameters() if not self._is_cut_expert(n)]

    def _is_cut_expert(self, gate_key: str) -> bool:
        # A feature gate holds a copy of one expert's graph; it is counted with the experts.
        return isinstance(self.gate, _ExpertFeatureGate) and gate_key.startswith("features.")

    def compile_experts_(self) -> MoELightningModule:
        """Compile every expert with ``torch.compile`` (inductor, freezing) for fast inference, in place.

        Compiled experts are used outside training only and always run under ``torch.no_grad()``; training
        steps and :meth:`dense_reference` keep using the exported graphs, and the ``state_dict`` does not
        change. This is what makes int8 experts fast on CPU. Each expert compiles on its first call and
        once more when the sub-batch size first changes.

        Returns:
            The MoE itself.
        """
        self._compiled_experts = [compile_artifact(module) for module in self.experts]
        return self

    @property
    def gate_macs(self) -> int:
        """MACs per sample of the gate in eval mode."""
        return self._gate_macs

    @property
    def eval_top_k(self) -> int | None:
        """Experts per image outside training (``None``: ``top_k``); settable, e.g. to 1 after training at 2."""
        return self._eval_top_k

    @eval_top_k.setter
    def eval_top_k(self, value: int | None) -> None:
        if value is not None:
            _check_int(value, "eval_top_k", 1, self.num_experts)
        self._eval_top_k = value
        self.hparams["eval_top_k"] = value  # so checkpoints and load_moe route the same way

    @property
    def active_top_k(self) -> int:
        """Experts per image in the current mode (``top_k`` in training, ``eval_top_k`` otherwise)."""
        if self.training or self.eval_top_k is None:
            return int(self.top_k)
        return int(self.eval_top_k)

    # ------------------------------------------------------------------ routing and dispatch

    def route(self, x: Tensor, k: int | None = None) -> tuple[TopKGating, Tensor]:
        """Run the gate: the routing decision and the clean router logits (noise only in training).

        Args:
            x: ``[B, *input_shape]`` images.
            k: experts per image, default :attr:`active_top_k`.
        """
        logits, noise_std = self.gate(x)
        use_noise = self.training and self.noisy_gating and noise_std is not None
        gating = top_k_gate(
            logits, self.active_top_k if k is None else k, noise_std=noise_std if use_noise else None
        )
        return gating, logits

    def _capacity_keep(self, gating: TopKGating) -> Tensor | None:
        """``[B, k]`` bool mask of the assignments a capacity limit keeps, or ``None`` when none applies."""
        factor = self.capacity_factor
        if factor is None or not (self.training or self.capacity_in_eval):
            return None
        batch, k = gating.indices.shape
        capacity = max(1, math.ceil(factor * batch * k / self.num_experts))
        keep = torch.ones_like(gating.indices, dtype=torch.bool)
        weights = gating.weights.detach()
        for expert in range(self.num_experts):
            rows, slots = (gating.indices == expert).nonzero(as_tuple=True)
            if rows.numel() > capacity:
                # Highest gate weights stay; the stable sort breaks ties by sample order.
                order = torch.sort(weights[rows, slots], descending=True, stable=True).indices
                drop = order[capacity:]
                keep[rows[drop], slots[drop]] = False
        return keep

    def dispatch(self, x: Tensor, gating: TopKGating) -> DispatchResult:
        """Sparse dispatch: each expert runs once, on exactly its samples; deterministic combine.

        Expert outputs are written into a ``[B, k, C]`` tensor by index assignment (every ``(sample, slot)``
        pair is written once, so no order-dependent accumulation) and reduced with the gate weights.

        Args:
            x: ``[B, *input_shape]`` images.
            gating: the routing decision of :meth:`route`.
        """
        keep = self._capacity_keep(gating)
        routed = gating.indices if keep is None else gating.indices.masked_fill(~keep, -1)
        batch, k = gating.indices.shape
        slot_probs = x.new_zeros(batch, k, self.num_classes, dtype=torch.float32)
        counts = torch.bincount(routed[routed >= 0], minlength=self.num_experts)
        compiled = None if self.training else self._compiled_experts
        experts = compiled if compiled is not None else list(self.experts)
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows, slots = (routed == expert).nonzero(as_tuple=True)
            slot_probs[rows, slots] = experts[expert](x[rows]).float().softmax(dim=-1)
        probs = (gating.weights.unsqueeze(-1) * slot_probs).sum(dim=1)
        if keep is None:
            keep = torch.ones_like(gating.indices, dtype=torch.bool)
        return DispatchResult(probs=probs, keep=keep, counts=counts)

    def dense_reference(self, x: Tensor, gating: TopKGating, keep: Tensor | None = None) -> Tensor:
        """Reference for :meth:`dispatch`: run every expert on every sample and mask with the dense gates.

        Costs all experts on all samples; for tests and benchmarks.
        """
        weights = gating.weights if keep is None else gating.weights * keep
        gates = dense_gates(
            TopKGating(gating.indices, weights, gating.probs, gating.logits), self.num_experts
        )
        all_probs = torch.stack([m(x).float().softmax(dim=-1) for m in self.experts])
        return torch.einsum("bn,nbc->bc", gates, all_probs)

    @override
    def forward(self, x: Tensor) -> Tensor:
        gating, _ = self.route(x)
        return self.dispatch(x, gating).probs.clamp_min(_LOG_EPS).log()

    # ------------------------------------------------------------------ training

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = inputs_from_batch(batch), batch[1]
        gating, clean_logits = self.route(x)
        result = self.dispatch(x, gating)
        task = F.nll_loss(result.probs.clamp_min(_LOG_EPS).log(), y)
        mask = routing_mask(gating.indices, self.num_experts)
        balance = load_balancing_loss(gating.probs, mask, self.balance_coefficient)
        importance = importance_loss(dense_gates(gating), self.importance_coefficient)
        z_loss = router_z_loss(clean_logits, self.z_loss_coefficient)
        loss = task + balance + importance + z_loss
        batch_size = x.shape[0]
        for key, value in (
            ("moe/loss/task", task),
            ("moe/loss/balance", balance),
            ("moe/loss/importance", importance),
            ("moe/loss/z", z_loss),
            ("train/loss", loss),
        ):
            self.log(key, value.detach(), on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        if self.capacity_factor is not None:
            dropped = (~result.keep).sum().float()
            self.log(
                "moe/train/dropped", dropped, on_step=True, on_epoch=True, reduce_fx="sum", sync_dist=True
            )
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ evaluation statistics

    def _reset_stats(self) -> None:
        n = self.num_experts
        zeros = {"assigned": n, "executed": n, "scalars": 5}
        self._stats = {
            key: torch.zeros(size, dtype=torch.float64, device=self.device) for key, size in zeros.items()
        }

    def _update_stats(self, x: Tensor, y: Tensor | None) -> None:
        if not self._stats:
            self._reset_stats()
        gating, _ = self.route(x)
        result = self.dispatch(x, gating)
        log_probs = result.probs.clamp_min(_LOG_EPS).log()
        entropy = -(gating.probs * gating.probs.clamp_min(_LOG_EPS).log()).sum(dim=-1)
        zero = torch.zeros((), device=x.device)
        stats = self._stats
        stats["assigned"] += routing_mask(gating.indices, self.num_experts).sum(dim=0).double()
        stats["executed"] += result.counts.double()
        stats["scalars"] += torch.stack(
            [
                torch.tensor(float(x.shape[0]), device=x.device),
                (log_probs.argmax(dim=-1) == y).sum().float() if y is not None else zero,
                F.nll_loss(log_probs, y, reduction="sum") if y is not None else zero,
                entropy.sum(),
                (~result.keep).sum().float(),
            ]
        ).double()

    def _figures(self, reduce: bool) -> dict[str, Any]:
        """Routing figures from the accumulated counts (all-reduced over ranks first when ``reduce``)."""
        flat = torch.cat([self._stats["assigned"], self._stats["executed"], self._stats["scalars"]])
        self._stats = {}
        if reduce and self._trainer is not None:
            # One all-reduce of every count, so each rank computes identical figures.
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        n = self.num_experts
        assigned, executed = flat[:n], flat[n : 2 * n]
        seen, correct, nll, entropy, dropped = flat[2 * n :].tolist()
        samples = max(seen, 1.0)
        load = assigned / assigned.sum().clamp_min(1.0)
        nonzero = load[load > 0]
        return {
            "acc": correct / samples,
            "loss": nll / samples,
            "expected_macs": self._gate_macs
            + float(sum(executed[i].item() / samples * self._expert_macs[i] for i in range(n))),
            "routing_entropy": max(0.0, float(-(nonzero * nonzero.log()).sum() / math.log(n))),
            "gate_entropy": entropy / samples,
            "dead_expert_share": float((assigned == 0).sum().item()) / n,
            "dropped_fraction": dropped / max(float(assigned.sum().item()), 1.0),
            "samples": seen,
            "expert_load": [float(v) for v in load.tolist()],
        }

    def _finish_stats(self, prefix: str, metric_prefix: str) -> dict[str, float]:
        if not self._stats:
            return {}
        figures = self._figures(reduce=True)
        stats = {f"{prefix}/acc": figures.pop("acc"), f"{prefix}/loss": figures.pop("loss")}
        loads = figures.pop("expert_load")
        stats.update({f"{metric_prefix}/{key}": value for key, value in figures.items()})
        stats.update({f"{metric_prefix}/expert_load/{i}": value for i, value in enumerate(loads)})
        return stats

    @torch.no_grad()
    def routing_statistics(self, x: Tensor, batch_size: int = 256) -> dict[str, Any]:
        """Routing figures of the current (evaluation) routing on the images ``x``, in this process only.

        Returns a dict with ``expected_macs``, ``expert_load`` (list, sums to 1), ``routing_entropy``,
        ``gate_entropy``, ``dead_expert_share``, ``dropped_fraction`` and ``samples``: the same figures
        validation logs, without accuracy and loss.

        Args:
            x: ``[n, *input_shape]`` images.
            batch_size: images routed at a time (a capacity limit applies per batch).
        """
        _check_int(batch_size, "batch_size", 1)
        with training_mode(self, False):
            self._reset_stats()
            for chunk in x.split(batch_size):
                self._update_stats(chunk.to(self.device), None)
            figures = self._figures(reduce=False)
        figures.pop("acc")
        figures.pop("loss")
        return figures

    @override
    def on_validation_epoch_start(self) -> None:
        self._reset_stats()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_stats(inputs_from_batch(batch), batch[1])

    @override
    def on_validation_epoch_end(self) -> None:
        stats = self._finish_stats("val", "moe")
        if self.trainer.sanity_checking:
            return
        self._log_stats(stats)

    @override
    def on_test_epoch_start(self) -> None:
        self._reset_stats()

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_stats(inputs_from_batch(batch), batch[1])

    @override
    def on_test_epoch_end(self) -> None:
        self._log_stats(self._finish_stats("test", "moe/test"))

    def _log_stats(self, stats: dict[str, float]) -> None:
        self.routing_stats = stats
        for key, value in stats.items():
            # Values are already global (reduced above); sync_dist only silences the epoch-level warning.
            self.log(key, value, sync_dist=True, prog_bar=key.endswith("/acc"))

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(inputs_from_batch(batch)).exp()

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_entry(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "experts": [_bytes_to_tensor(d) for d in self._expert_data],
            "expert_names": list(self._expert_names),
            "expert_macs": list(self._expert_macs),
            "expert_params": list(self._expert_params),
            "expert_sizes": list(self._expert_sizes),
            "expert_quantized": list(self._expert_quantized),
            "fingerprints": list(self._expert_fingerprints),
            "num_classes": self.num_classes,
            "gate_macs": self._gate_macs,
            "gate_program": None if self._gate_data is None else _bytes_to_tensor(self._gate_data),
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self._checkpoint_entry()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(_CHECKPOINT_KEY)
        if not isinstance(entry, dict):
            raise RuntimeError(
                f"Expected a MoELightningModule checkpoint with a {_CHECKPOINT_KEY!r} entry, but it has none."
            )
        saved = list(entry.get("fingerprints", []))
        names = list(entry.get("expert_names", []))
        if len(saved) != self.num_experts:
            raise RuntimeError(
                f"The checkpoint was trained with {len(saved)} experts ({names}), but this MoE has {self.num_experts}"
                f" ({self._expert_names}). Build the MoE from the same experts, or use `load_moe(path)`."
            )
        for i, (ours, theirs) in enumerate(zip(self._expert_fingerprints, saved)):
            if ours != theirs:
                raise RuntimeError(
                    f"Expert {i} of this MoE, {self._expert_names[i]}, is not the expert the checkpoint was trained"
                    f" with ({names[i] if i < len(names) else 'unknown'}): their weights differ. Pass the same expert"
                    " files in the same order, or use `load_moe(path)`, which needs no expert files."
                )


def load_moe(path: str | os.PathLike[str], *, gate: nn.Module | None = None) -> MoELightningModule:
    """Rebuild a trained :class:`MoELightningModule` from its checkpoint, in eval mode.

    Needs neither the expert files nor the experts' classes: the experts come from the exported programs
    stored in the checkpoint, which is read with ``torch.load(weights_only=True)``.

    Args:
        path: a checkpoint written by ``Trainer.save_checkpoint`` or ``ModelCheckpoint``.
        gate: the gate module, only needed when a user gate module could not be exported at training.

    Raises:
        ValueError: if the file is missing or is not a MoE checkpoint, or a needed gate module is missing.

    Example::

        >>> moe = load_moe("moe.ckpt")  # doctest: +SKIP
        >>> moe(images).argmax(dim=-1)  # doctest: +SKIP
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, what="the MoE checkpoint `path`")
    entry = checkpoint.get(_CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict) or "experts" not in entry:
        raise ValueError(
            f"Expected {str(path)!r} to be a MoELightningModule checkpoint (with a {_CHECKPOINT_KEY!r} entry),"
            " but it is not."
        )
    if entry.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by a newer lightning_hybridcomp (MoE checkpoint format"
            f" {entry['format_version']} > {_FORMAT_VERSION}); upgrade the package."
        )
    names = list(entry.get("expert_names") or [f"experts[{i}]" for i in range(len(entry["experts"]))])
    programs = [_stored_program(_tensor_to_bytes(t), n) for t, n in zip(entry["experts"], names)]
    hparams = init_arguments(checkpoint.get("hyper_parameters"))
    gate_arg: str | nn.Module = hparams.pop("gate", "cnn")
    if gate_arg == "module":
        if gate is not None:
            gate_arg = gate
        elif entry.get("gate_program") is not None:
            gate_arg = _frozen_graph(_stored_program(_tensor_to_bytes(entry["gate_program"]), "the gate"))
        else:
            raise ValueError(
                f"{str(path)!r} was trained with a gate module that could not be exported; pass it as `gate=`."
            )
    model = MoELightningModule(programs, gate=gate_arg, **hparams)
    model._expert_names = list(entry["expert_names"])
    model._expert_macs = [int(m) for m in entry["expert_macs"]]
    model._expert_sizes = [int(s) for s in entry.get("expert_sizes", model._expert_sizes)]
    model._expert_quantized = [bool(q) for q in entry.get("expert_quantized", model._expert_quantized)]
    model._gate_macs = int(entry.get("gate_macs", model._gate_macs))
    if entry.get("gate_program") is not None:
        model._gate_data = _tensor_to_bytes(entry["gate_program"])
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
