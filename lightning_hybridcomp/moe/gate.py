"""The gates of the Mixture of Experts: the modules that score experts for every image.

Every gate is a :class:`Gate` (images in, router logits and the routing-noise scale out), and
:func:`build_gate` makes the one a MoE asks for. The routing maths they feed (top-k, the auxiliary losses)
is in :mod:`.routing` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.export import ExportedProgram

from lightning_hybridcomp._lightning import training_mode
from lightning_hybridcomp.moe.experts import Expert, frozen_graph, penultimate_features
from lightning_hybridcomp.moe.routing import (  # re-exported: the gates' public maths
    TopKGating,
    assignment_loss,
    balanced_assignment,
    dense_gates,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    routing_mask,
    top_k_gate,
    with_other_owners,
)
from lightning_hybridcomp.profiling import count_macs
from lightning_hybridcomp.programs import export_with_dynamic_batch, serialize_program

__all__ = [
    "GATE_CHOICES",
    "BuiltGate",
    "ExpertFeatureGate",
    "Gate",
    "GateNetwork",
    "ModuleGate",
    "TopKGating",
    "assignment_loss",
    "balanced_assignment",
    "build_gate",
    "check_gate_options",
    "check_gate_output",
    "dense_gates",
    "feature_expert_index",
    "gate_hyperparameters",
    "importance_loss",
    "load_balancing_loss",
    "router_z_loss",
    "routing_mask",
    "top_k_gate",
    "with_other_owners",
]

# ---------------------------------------------------------------------------------------------- gate modules


class Gate(nn.Module):
    """Base class of the MoE's gates: ``forward(x)`` maps images to ``(logits, noise_std)``.

    ``logits`` are the ``[B, num_experts]`` router logits the routing decision (:func:`top_k_gate`) is taken
    on; ``noise_std`` is the ``[B, num_experts]`` standard deviation of the routing noise of noisy top-k
    gating (positive, e.g. ``softplus(x W_noise)``), or ``None`` for no noise. Gates return ``None`` in eval
    mode, so evaluation routes deterministically. A subclass sets :attr:`num_experts` through
    ``super().__init__(num_experts)`` and implements ``forward``; ``MoELightningModule(gate=...)`` takes any
    ``Gate`` as it is (a plain ``nn.Module`` is wrapped in :class:`ModuleGate` first).

    Example::

        >>> class LinearGate(Gate):
        ...     def __init__(self, num_experts: int) -> None:
        ...         super().__init__(num_experts)
        ...         self.linear = nn.Linear(64, num_experts)
        ...     def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        ...         return self.linear(x.flatten(1)), None  # never noisy
        >>> logits, noise_std = LinearGate(num_experts=3)(torch.randn(2, 1, 8, 8))
        >>> logits.shape, noise_std
        (torch.Size([2, 3]), None)
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement `forward(x) -> (logits, noise_std)`."
        )


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear head that starts at zero, so that routing starts uniform (Shazeer et al.)."""
    head = nn.Linear(in_features, out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _noisy_heads(
    w_gate: nn.Module, w_noise: nn.Module, features: Tensor, training: bool
) -> tuple[Tensor, Tensor | None]:
    """Shazeer's two heads: logits ``x W_gate`` and, in training only, noise scale ``softplus(x W_noise)``."""
    noise_std = F.softplus(w_noise(features)) if training else None
    return w_gate(features), noise_std


class GateNetwork(Gate):
    """Tiny CNN router: image -> ``(logits, noise_std)`` over the experts; the gate ``gate="cnn"`` builds.

    Two 3x3 conv-ReLU layers (``channels`` and ``2 * channels`` filters, max pooling between them),
    global average pooling, and two linear heads: ``W_gate`` for the logits and ``W_noise`` for the
    noise scale ``softplus(x W_noise)`` of noisy top-k gating. Both heads start at zero, so routing
    starts uniform (Shazeer et al.). The noise head only runs in training mode (``noise_std`` is
    ``None`` in eval mode). Passed as ``MoELightningModule(gate=GateNetwork(...))`` it is the ``"cnn"``
    gate with its own weights: the MoE records ``gate="cnn"`` with its ``channels`` and ``input_size``.

    Args:
        in_channels: channels of the input images.
        num_experts: number of experts to score.
        channels: filters of the first convolution.
        input_size: downsample the input to ``input_size x input_size`` by average pooling first
            (cheaper routing), or ``None`` to use the full resolution.

    Example::

        >>> gate = GateNetwork(in_channels=1, num_experts=3).eval()
        >>> logits, noise_std = gate(torch.randn(5, 1, 16, 16))
        >>> logits.shape, noise_std
        (torch.Size([5, 3]), None)
    """

    def __init__(
        self, in_channels: int, num_experts: int, channels: int = 8, input_size: int | None = None
    ) -> None:
        super().__init__(num_experts)
        self.in_channels = in_channels
        self.channels = channels
        self.input_size = input_size
        self.downsample: nn.Module = (
            nn.AdaptiveAvgPool2d(input_size) if input_size is not None else nn.Identity()
        )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.w_gate = _zero_linear(2 * channels, num_experts)
        self.w_noise = _zero_linear(2 * channels, num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return _noisy_heads(self.w_gate, self.w_noise, self.features(self.downsample(x)), self.training)


class ExpertFeatureGate(Gate):
    """Router on the frozen penultimate features of one expert, with Shazeer's two linear heads.

    Args:
        features: the expert's graph cut before its classifier head
            (:func:`~lightning_hybridcomp.moe.experts.penultimate_features`); it is frozen.
        feature_dim: width of the flattened features.
        num_experts: number of experts to score.
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_experts: int) -> None:
        super().__init__(num_experts)
        self.features = features
        self.features.requires_grad_(False)
        self.w_gate = _zero_linear(feature_dim, num_experts)
        self.w_noise = _zero_linear(feature_dim, num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            features = torch.flatten(self.features(x), 1).float()
        return _noisy_heads(self.w_gate, self.w_noise, features, self.training)


class ModuleGate(Gate):
    """A user router as a :class:`Gate`: ``module(x)`` returns ``[B, N]`` logits, or ``(logits, noise_logits)``.

    The noise scale is ``softplus(noise_logits)``; without noise logits from the module it is ``softplus`` of
    one learned value per expert. No noise in eval mode.

    Args:
        module: the user's router.
        num_experts: number of experts it scores.
    """

    def __init__(self, module: nn.Module, num_experts: int) -> None:
        super().__init__(num_experts)
        self.module = module
        self.noise_logits = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            logits, noise_logits = out[0], out[1]
        else:
            logits, noise_logits = out, self.noise_logits.expand_as(out)
        return logits, (F.softplus(noise_logits) if self.training else None)


# ---------------------------------------------------------------------------------------------- building a MoE's gate

GATE_CHOICES = (
    "'cnn' (tiny CNN on the input), 'expert:<index>' (penultimate features of that expert), a Gate such as"
    " GateNetwork, or an nn.Module"
)


class BuiltGate(NamedTuple):
    """The gate a MoE routes with, as :func:`build_gate` made it.

    Attributes:
        gate: the :class:`Gate`.
        macs: MACs per sample in eval mode.
        program: the serialized program of a user gate module, for checkpoints; ``None`` for gates the
            hyper-parameters rebuild (and for a gate module that could not be exported).
    """

    gate: Gate
    macs: int
    program: bytes | None


def feature_expert_index(gate: Any, num_experts: int | None) -> int | None:
    """The expert index of ``gate="expert:<index>"``, ``None`` for every other valid gate.

    Args:
        gate: the ``gate`` argument of the MoE.
        num_experts: the number of experts, or ``None`` when not known yet (the index is then not bounded).

    Raises:
        TypeError: for a gate that is neither a string nor a module or program.
        ValueError: for an unknown gate name or an expert index out of range.
    """
    if isinstance(gate, (nn.Module, ExportedProgram)):
        return None
    if not isinstance(gate, str):
        raise TypeError(f"Expected `gate` to be one of {GATE_CHOICES}, got {type(gate).__name__}.")
    if gate == "cnn":
        return None
    prefix, _, index = gate.partition(":")
    if prefix == "expert" and index.isdigit() and (num_experts is None or int(index) < num_experts):
        return int(index)
    hint = (
        f" The expert index must be below the number of experts ({num_experts})."
        if prefix == "expert" and index.isdigit()
        else ""
    )
    raise ValueError(f"Expected `gate` to be one of {GATE_CHOICES}, got {gate!r}.{hint}")


def check_gate_options(gate: Any, *, gate_channels: int = 8, gate_input_size: int | None = None) -> None:
    """Refuse the options of the ``"cnn"`` gate with another gate, where they would be ignored.

    Their defaults are accepted with any gate, so configurations that spell them out keep working.

    Raises:
        ValueError: naming the option and the gate.
    """
    if isinstance(gate, str) and gate == "cnn":
        return
    for name, value, default in (
        ("gate_channels", gate_channels, 8),
        ("gate_input_size", gate_input_size, None),
    ):
        if value != default:
            shown = repr(gate) if isinstance(gate, str) else f"a {type(gate).__name__}"
            hint = " (a GateNetwork passed as `gate` has its own)" if isinstance(gate, GateNetwork) else ""
            raise ValueError(
                f"Expected `{name}` only with gate='cnn' (it configures the CNN gate), got {name}={value!r} with"
                f" gate={shown}. Remove `{name}`, or use gate='cnn'{hint}."
            )


def gate_hyperparameters(gate: str | nn.Module | ExportedProgram) -> dict[str, Any]:
    """The plain hyper-parameters a checkpoint records for ``gate``: what rebuilds it without the object.

    A :class:`GateNetwork` is the ``"cnn"`` gate with its own width and input size; any other module or
    program is ``"module"`` (its exported program, or the module itself, is needed to rebuild it).

    Example::

        >>> gate_hyperparameters(GateNetwork(1, 3, channels=4))
        {'gate': 'cnn', 'gate_channels': 4, 'gate_input_size': None}
        >>> gate_hyperparameters(nn.Linear(64, 3)), gate_hyperparameters("expert:0")
        ({'gate': 'module'}, {'gate': 'expert:0'})
    """
    if type(gate) is GateNetwork:
        return {"gate": "cnn", "gate_channels": gate.channels, "gate_input_size": gate.input_size}
    if isinstance(gate, (nn.Module, ExportedProgram)):
        return {"gate": "module"}
    return {"gate": gate}


def build_gate(
    gate: str | nn.Module | ExportedProgram,
    experts: Sequence[Expert],
    input_shape: Sequence[int],
    *,
    channels: int = 8,
    input_size: int | None = None,
) -> BuiltGate:
    """Build the gate a MoE over ``experts`` routes with, count its MACs, and export a user gate module.

    Args:
        gate: as ``MoELightningModule`` takes it (``"cnn"``, ``"expert:<index>"``, a :class:`Gate`, an
            ``nn.Module``), or the ``ExportedProgram`` of a user gate module a checkpoint stored.
        experts: the MoE's experts.
        input_shape: image shape without the batch dimension.
        channels: filters of the ``"cnn"`` gate.
        input_size: input side of the ``"cnn"`` gate, or ``None``.

    Raises:
        ValueError: for a gate module that rejects the input shape or returns the wrong shape, an unknown
            gate name, or a feature expert without a linear head.
    """
    num_experts, example = len(experts), torch.randn(2, *input_shape)
    program: bytes | None = None
    index = feature_expert_index(gate, num_experts)
    if index is not None:
        expert = experts[index]
        features = penultimate_features(expert.load_module(), expert.name)
        with torch.no_grad():
            feature_dim = torch.flatten(features(example), 1).shape[1]
        feature_gate = ExpertFeatureGate(features, feature_dim, num_experts)
        # The cut graph costs at most the whole expert; the head adds one linear layer.
        head_macs = count_macs(feature_gate.w_gate, torch.zeros(1, feature_dim))
        return BuiltGate(feature_gate, expert.macs + head_macs, None)
    built: Gate
    if isinstance(gate, ExportedProgram):
        module = frozen_graph(gate)
        check_gate_output(module, example, num_experts)
        built, program = ModuleGate(module, num_experts), serialize_program(gate)
    elif isinstance(gate, Gate):
        check_gate_output(gate, example, num_experts)
        built = gate
        if type(gate) is not GateNetwork:  # a GateNetwork is rebuilt from the hyper-parameters
            rank_zero_warn(
                f"MoELightningModule: checkpoints do not hold the gate {type(gate).__name__} (a Gate is not"
                " exported, its noise head only runs in training), so loading them needs the gate passed as"
                " `gate=`."
            )
    elif isinstance(gate, nn.Module):
        check_gate_output(gate, example, num_experts)
        built, program = ModuleGate(gate, num_experts), _export_gate(gate, example)
    else:
        built = GateNetwork(int(input_shape[0]), num_experts, channels=channels, input_size=input_size)
    return BuiltGate(built, count_macs(built, example[:1]), program)


def check_gate_output(gate: nn.Module, example: Tensor, num_experts: int) -> None:
    """Run ``gate`` once in eval mode and check it scores ``num_experts`` experts.

    A :class:`Gate` must return ``(logits, noise_std)`` with ``noise_std`` ``None`` or of the shape of the
    logits; any other module ``[B, N]`` logits or a ``(logits, noise_logits)`` pair of that shape.

    Raises:
        ValueError: if the gate rejects ``example`` or returns something else.
    """
    try:
        with training_mode(gate, False), torch.no_grad():
            out = gate(example)
    except Exception as err:
        raise ValueError(
            f"The gate module does not accept inputs of shape {tuple(example.shape)}: {type(err).__name__}: {err}"
        ) from err
    expected = (example.shape[0], num_experts)
    if isinstance(gate, Gate):
        pair = isinstance(out, tuple) and len(out) == 2
        outputs = ([out[0]] + ([] if out[1] is None else [out[1]])) if pair else [out]
        if not pair or any(not isinstance(o, Tensor) or tuple(o.shape) != expected for o in outputs):
            raise ValueError(
                f"Expected the gate {type(gate).__name__} to return (logits, noise_std) with logits of shape"
                f" [batch, {num_experts}] (one per expert) and noise_std None or of that shape, got"
                f" {_shapes(out)}."
            )
        return
    outputs = list(out[:2]) if isinstance(out, (tuple, list)) else [out]
    if any(not isinstance(o, Tensor) or tuple(o.shape) != expected for o in outputs):
        raise ValueError(
            f"Expected the gate module to return logits of shape [batch, {num_experts}] (one per expert), or a"
            f" (logits, noise_logits) pair of that shape, got {_shapes(out)}."
        )


def _shapes(out: Any) -> list[tuple[int, ...] | None]:
    items = list(out[:2]) if isinstance(out, (tuple, list)) else [out]
    return [None if o is None else tuple(getattr(o, "shape", ())) for o in items]


def _export_gate(gate: nn.Module, example: Tensor) -> bytes | None:
    """The serialized program of a user gate module, or ``None`` (with a warning) when it cannot be exported."""
    if hasattr(gate, "graph"):  # already an exported graph: it cannot be exported again
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
