"""How each QuantizationAwareTraining backend prepares, freezes, converts and reverts a network.

``x86_pt2e``: torchao's PT2E flow (export, X86InductorQuantizer, QAT, convert_pt2e) for conv nets;
``xnnpack``: the same flow with ExecuTorch's XNNPACKQuantizer (:mod:`.qat_xnnpack`), for edge programs;
``linear_int8``: torchao's ``QATConfig`` for Linear/Embedding nets. The callback only orchestrates them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.fx import GraphModule

from lightning_hybridcomp._graph_passes import (
    check_deterministic,
    inference_mode_except_batch_norm,
    separate_repeated_module_calls_,
)
from lightning_hybridcomp._lightning import training_mode
from lightning_hybridcomp.programs import (
    export_with_dynamic_batch,
    make_exported_train_eval_,
    set_exported_bn_frozen_,
    strip_unused_attributes_,
)

__all__ = [
    "BACKENDS",
    "PT2E_BACKENDS",
    "LinearInt8Backend",
    "PT2EBackend",
    "QuantizationBackend",
    "make_backend",
]


class QuantizationBackend:
    """How one quantization flow prepares, freezes, converts and reverts a network."""

    #: What to try when :meth:`prepare` fails on a network.
    hint = ""

    def check(self, network: nn.Module) -> None:
        """Raise ``ValueError`` if the backend has nothing to quantize in ``network``."""

    def prepare(self, network: nn.Module, example: Tensor, *, fold_batch_norm: bool = False) -> nn.Module:
        """Insert fake quantization into ``network``.

        Args:
            network: the float network.
            example: one batch of its inputs.
            fold_batch_norm: trace at inference and fold every BatchNorm into the convolution before it, for
                a network whose BatchNorm statistics must not change any more (a Mixture of Experts' experts);
                the prepared graph then keeps eval semantics in both modes (PT2E backends only).
        """
        raise NotImplementedError

    def convert(self, prepared: nn.Module) -> nn.Module:
        raise NotImplementedError

    def calibrate(self, prepared: nn.Module, example: Tensor) -> None:
        """Give observers a shape (their values come from the checkpoint) before a rebuild's conversion."""

    def set_frozen(self, prepared: nn.Module, *, observers: bool, bn: bool) -> None:
        raise NotImplementedError

    def float_forward(
        self,
        prepared: nn.Module | None,
        float_network: nn.Module | None,
        pl_module: pl.LightningModule,
        inputs: Tensor,
    ) -> Tensor:
        raise NotImplementedError

    def revert(self, hosted: nn.Module, float_network: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def qparams(self, converted: nn.Module) -> dict[str, dict[str, float | int]]:
        return {}

    def apply_qparams(self, converted: nn.Module, qparams: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back the values a conversion bakes into the program instead of its state_dict."""


class PT2EBackend(QuantizationBackend):
    hint = (
        "The network's forward must be exportable with `torch.export` (one tensor in, no data-dependent"
        " Python control flow); to quantize only a part, name it with `module=...`; for Linear/Embedding"
        " networks use backend='linear_int8'."
    )

    def quantizer(self) -> Any:
        """The PT2E quantizer (QAT configuration) that annotates the traced graph."""
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
        return quantizer

    def prepare(self, network: nn.Module, example: Tensor, *, fold_batch_norm: bool = False) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_

        quantizer = self.quantizer()  # first: a missing optional dependency fails before any tracing
        # QAT traces BatchNorm in its training form (batch statistics, folded into the conv at conversion)
        # and every other layer as at inference, so that no dropout or drop-path reaches the int8 program.
        # With `fold_batch_norm`, BatchNorm is traced at inference too and folded into its convolution now.
        with training_mode(network, False) if fold_batch_norm else inference_mode_except_batch_norm(network):
            program = export_with_dynamic_batch(network, example)
        # A random op left in this trace is called unconditionally (`F.dropout(x, p)` without `training=`):
        # the mode switch of the prepared graph would turn it off at inference, so that the int8 program
        # would not compute what the float network does.
        check_deterministic(program, f"{type(network).__name__}, traced at inference for fake quantization,")
        graph = program.module()
        if fold_batch_norm:
            _fuse_conv_bn_(graph)
        separate_repeated_module_calls_(graph)
        prepared = prepare_qat_pt2e(graph, quantizer)
        make_exported_train_eval_(prepared, keep_eval_semantics=fold_batch_norm)
        prepared._hybridcomp_observers_frozen = False  # type: ignore[assignment]
        prepared._hybridcomp_calibrating = False  # type: ignore[assignment]
        prepared.register_forward_pre_hook(_sync_observers_hook)
        prepared.train()
        return prepared

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        if not isinstance(prepared, GraphModule):
            raise TypeError(f"Expected a prepared PT2E GraphModule, got {type(prepared).__name__}.")
        make_exported_train_eval_(prepared)
        prepared.eval()
        with _conv_bn_folding_limited_to_present_convs(prepared):
            converted = convert_pt2e(prepared)
        make_exported_train_eval_(converted)
        strip_unused_attributes_(converted)
        converted.eval()
        check_deterministic(converted, "The converted int8 network")
        for param in converted.parameters():
            param.requires_grad_(False)
        return converted

    def calibrate(self, prepared: nn.Module, example: Tensor) -> None:
        prepared.eval()
        prepared._hybridcomp_calibrating = True  # type: ignore[assignment]
        try:
            with torch.no_grad():
                prepared(example)
        finally:
            prepared._hybridcomp_calibrating = False  # type: ignore[assignment]

    def set_frozen(self, prepared: nn.Module, *, observers: bool, bn: bool) -> None:
        prepared._hybridcomp_observers_frozen = observers  # type: ignore[assignment]
        if isinstance(prepared, GraphModule) and bn != getattr(prepared, "_hybridcomp_frozen_bn", False):
            set_exported_bn_frozen_(prepared, bn)

    def float_forward(
        self,
        prepared: nn.Module | None,
        float_network: nn.Module | None,
        pl_module: pl.LightningModule,
        inputs: Tensor,
    ) -> Tensor:
        # The prepared graph shares the float network's parameters and BN buffers, so this is the same model
        # without fake quantization.
        if float_network is None or float_network is pl_module:
            with training_mode(pl_module, False):
                return type(pl_module).forward(pl_module, inputs)
        float_network.eval()
        return float_network(inputs)

    def revert(self, hosted: nn.Module, float_network: nn.Module | None) -> nn.Module:
        if float_network is None:
            raise RuntimeError("QuantizationAwareTraining lost the float network it replaced.")
        return float_network

    def qparams(self, converted: nn.Module) -> dict[str, dict[str, float | int]]:
        assert isinstance(converted, GraphModule)
        values: dict[str, dict[str, float | int]] = {}
        for node in converted.graph.nodes:
            if node.op == "call_function" and "quantized_decomposed" in str(node.target):
                literals = {
                    str(i): a
                    for i, a in enumerate(node.args)
                    if isinstance(a, (int, float)) and not isinstance(a, bool)
                }
                if literals:
                    values[node.name] = literals
        return values

    def apply_qparams(self, converted: nn.Module, qparams: Mapping[str, Mapping[str, Any]]) -> None:
        assert isinstance(converted, GraphModule)
        nodes = {n.name: n for n in converted.graph.nodes}
        missing = sorted(set(qparams) - set(nodes))
        if missing:
            raise RuntimeError(
                f"The checkpoint's int8 program does not match the rebuilt one (missing nodes {missing[:5]}); was it"
                " written by another version of the network?"
            )
        for name, literals in qparams.items():
            args = list(nodes[name].args)
            for index, value in literals.items():
                args[int(index)] = value
            nodes[name].args = tuple(args)
        converted.recompile()


class LinearInt8Backend(QuantizationBackend):
    hint = "For convolutional networks use backend='x86_pt2e'."

    def check(self, network: nn.Module) -> None:
        if not any(type(m) in (nn.Linear, nn.Embedding) for m in network.modules()):
            raise ValueError(
                f"Expected the network ({type(network).__name__}) to contain nn.Linear or nn.Embedding layers for"
                " backend 'linear_int8', found none. Use backend='x86_pt2e' for convolutional networks."
            )

    def prepare(self, network: nn.Module, example: Tensor, *, fold_batch_norm: bool = False) -> nn.Module:
        if fold_batch_norm:
            raise ValueError("backend 'linear_int8' has no BatchNorm folding; use 'x86_pt2e' or 'xnnpack'.")
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
            PerAxis,
            quantize_,
        )
        from torchao.quantization.qat import QATConfig

        self.check(network)
        others = [type(m).__name__ for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if others:
            rank_zero_warn(
                f"QuantizationAwareTraining: backend 'linear_int8' quantizes Linear and Embedding only; {len(others)}"
                " convolution layers stay fp32. Use backend='x86_pt2e' to quantize them too."
            )
        holder = _Holder(network)
        linear_base = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int8, weight_granularity=PerAxis(0)
        )
        quantize_(holder, QATConfig(linear_base, step="prepare"), filter_fn=_is_plain(nn.Linear))
        embedding_base = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
        quantize_(holder, QATConfig(embedding_base, step="prepare"), filter_fn=_is_plain(nn.Embedding))
        return holder.network

    def convert(self, prepared: nn.Module) -> nn.Module:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            IntxWeightOnlyConfig,
            MappingType,
            PerAxis,
            quantize_,
        )

        holder = _Holder(self._to_float_modules(prepared))
        # Asymmetric per-token activations and symmetric per-channel weights, as the fake quantizers simulated.
        config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC)
        quantize_(holder, config, filter_fn=_is_plain(nn.Linear))
        embedding = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
        quantize_(holder, embedding, filter_fn=_is_plain(nn.Embedding))
        holder.network.eval()
        for param in holder.network.parameters():
            param.requires_grad_(False)
        return holder.network

    def set_frozen(self, prepared: nn.Module, *, observers: bool, bn: bool) -> None:
        if bn:
            for module in prepared.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def float_forward(
        self,
        prepared: nn.Module | None,
        float_network: nn.Module | None,
        pl_module: pl.LightningModule,
        inputs: Tensor,
    ) -> Tensor:
        assert prepared is not None
        with _fake_quantizers_disabled(prepared):
            return prepared(inputs)

    def revert(self, hosted: nn.Module, float_network: nn.Module | None) -> nn.Module:
        network = self._to_float_modules(hosted)
        for module in network.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (nn.Linear, nn.Embedding))
                and weight is not None
                and type(weight) is not nn.Parameter
            ):
                # int8 data cannot become fp32 weights again; the checkpoint about to load provides them.
                module.weight = nn.Parameter(torch.zeros(weight.shape, device=weight.device))
        return network

    @staticmethod
    def _to_float_modules(prepared: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

        holder = _Holder(prepared)
        quantize_(
            holder,
            QATConfig(step="convert"),
            filter_fn=lambda m, _: isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)),
        )
        return holder.network


class _Holder(nn.Module):
    """A parent for the network, so that torchao's module swaps also reach a root Linear/Embedding."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network


def _is_plain(kind: type[nn.Module]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: type(module) is kind


@contextlib.contextmanager
def _fake_quantizers_disabled(network: nn.Module) -> Iterator[None]:
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    quantizers = [m for m in network.modules() if isinstance(m, FakeQuantizerBase)]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


@contextlib.contextmanager
def _conv_bn_folding_limited_to_present_convs(graph_module: GraphModule) -> Iterator[None]:
    """Skip convert_pt2e's conv-BN folding searches for convolution kinds the graph does not contain.

    The folding exports 24 pattern graphs for each of conv1d, conv2d, conv_transpose1d and
    conv_transpose2d (about 10 s on a CPU core) whatever the model holds; a conv2d net needs a quarter.
    """
    import torch.nn.functional as F

    try:
        from torchao.quantization.pt2e import qat_utils
    except ImportError:  # another torchao layout: keep its own behaviour
        yield
        return
    helper = getattr(qat_utils, "_fold_conv_bn_qat_helper", None)
    present = {
        n.target._opname
        for n in graph_module.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }
    if helper is None or present & {"convolution", "_convolution"}:
        yield
        return
    kinds = {
        F.conv1d: "conv1d",
        F.conv2d: "conv2d",
        F.conv_transpose1d: "conv_transpose1d",
        F.conv_transpose2d: "conv_transpose2d",
    }

    def fold_present_only(m: GraphModule, conv_fn: Any, example_inputs: Any, is_cuda: bool) -> GraphModule:
        kind = kinds.get(conv_fn)
        if kind is not None and kind not in present:
            return m
        return helper(m, conv_fn, example_inputs, is_cuda=is_cuda)

    qat_utils._fold_conv_bn_qat_helper = fold_present_only
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = helper


def _sync_observers_hook(module: nn.Module, args: Any) -> None:
    """Observers learn activation ranges in training only (not from validation data), unless frozen."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    enabled = getattr(module, "_hybridcomp_calibrating", False) or (
        module.training and not getattr(module, "_hybridcomp_observers_frozen", False)
    )
    for child in module.modules():
        if isinstance(child, FakeQuantizeBase) and bool(child.observer_enabled[0]) != enabled:
            child.observer_enabled[0] = int(enabled)


#: Backend names, as ``QuantizationAwareTraining(backend=...)`` takes them.
BACKENDS = ("x86_pt2e", "linear_int8", "xnnpack")
#: The backends of the PT2E flow (conv nets; BatchNorm folding with ``prepare(fold_batch_norm=True)``).
PT2E_BACKENDS = ("x86_pt2e", "xnnpack")


def make_backend(name: str) -> QuantizationBackend:
    """The backend called ``name`` (one of :data:`BACKENDS`)."""
    if name == "xnnpack":
        from lightning_hybridcomp.callbacks.qat_xnnpack import XNNPACKBackend

        return XNNPACKBackend()
    return PT2EBackend() if name == "x86_pt2e" else LinearInt8Backend()
